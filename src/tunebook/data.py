"""Reading and checking the splits.

A split is JSONL (the documented default: one example per line), a `.json` list, or a `.parquet`/`.csv` table
read through `datasets`. Each example is either an instruction row, `{"instruction", "input", "output"}`
("input" optional), or a chat row, `{"messages": [{"role": ..., "content": ...}, ...]}` (system/user/assistant,
ending with the assistant turn that is the answer). One file holds one format. Errors name the file, the line
(the row, for tables) and the field, with the fix.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunebook.errors import RecipeError
from tunebook.prompts import ROLES, is_chat, is_preference, user_message

REQUIRED_FIELDS = ("instruction", "output")
TEXT_FIELDS = ("instruction", "input", "output")
SPLIT_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
INSTRUCTION_EXAMPLE = '{"instruction": "...", "input": "...", "output": "..."}'
CHAT_EXAMPLE = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'


def read_split(path: str | Path, recipe_source: str = "recipe", field_name: str = "data") -> list[dict[str, Any]]:
    """Every example of a split, checked one by one; errors name the file, the line or row, and the field."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(
            recipe_source, field_name, f"data file '{path}' does not exist.",
            "Run `make data` to build the datasets, or fix the path.",
        )
    if path.suffix not in SPLIT_SUFFIXES:
        raise RecipeError(recipe_source, field_name, f"'{path}' is not a split tunebook reads.",
                          f"Use one of {', '.join(SPLIT_SUFFIXES)} (JSONL is the default: one example per line).")
    examples, first_format = [], None
    for where, example in raw_examples(path):
        if not isinstance(example, dict):
            raise RecipeError(str(path), where, "is not a JSON object.", "Write one object per example.")
        kind = "chat" if "messages" in example else "preference" if is_preference(example) else "instruction"
        if first_format is None:
            first_format = (kind, where)
        elif kind != first_format[0]:
            raise RecipeError(str(path), where, f"is a {kind} row, but {first_format[1]} is a {first_format[0]} row.",
                              f"Use one format per file: all {first_format[0]} rows ({FORMAT_EXAMPLES[first_format[0]]}).")
        {"chat": check_chat_row, "preference": check_preference_row,
         "instruction": check_instruction_row}[kind](example, str(path), where)
        examples.append(example)
    if not examples:
        raise RecipeError(recipe_source, field_name, f"'{path}' has no examples.", "Build or fill the split.")
    return examples


class DuplicateField(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateField(key)
        out[key] = value
    return out


def raw_examples(path: Path) -> list[tuple[str, Any]]:
    """(where, example) for each example of a file: `line N` for JSONL, `example N`/`row N` otherwise."""
    if path.suffix == ".jsonl":
        out = []
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is not data
                except UnicodeDecodeError as exc:
                    raise RecipeError(str(path), f"line {number}", f"is not UTF-8 (byte 0x{raw[exc.start]:02x} at "
                                      f"column {exc.start + 1}).", "Save the file as UTF-8.") from None
                if not line.strip():
                    continue
                try:
                    out.append((f"line {number}", json.loads(line, object_pairs_hook=_unique_keys)))
                except DuplicateField as exc:
                    raise RecipeError(str(path), f"line {number}: field '{exc.key}'", "is given twice in one object; "
                                      "JSON readers keep only the last, silently.", "Keep one.") from None
                except json.JSONDecodeError as exc:
                    raise RecipeError(str(path), f"line {number}", f"is not valid JSON ({exc.msg} at column "
                                      f"{exc.colno}).", "Each line must be one JSON object.") from None
        return out
    if path.suffix == ".json":
        from tunebook.config import read_utf8

        try:
            rows = json.loads(read_utf8(path), object_pairs_hook=_unique_keys)
        except DuplicateField as exc:
            raise RecipeError(str(path), f"field '{exc.key}'", "is given twice in one object; JSON readers keep only "
                              "the last, silently.", "Keep one.") from None
        except json.JSONDecodeError as exc:
            raise RecipeError(str(path), f"line {exc.lineno}", f"is not valid JSON ({exc.msg}).",
                              "A .json split is one JSON list of examples (or use JSONL).") from None
        if not isinstance(rows, list):
            raise RecipeError(str(path), None, "is not a JSON list.", "A .json split is a list of examples.")
        return [(f"example {i}", row) for i, row in enumerate(rows, start=1)]
    try:
        table = csv_rows(path) if path.suffix == ".csv" else parquet_rows(path)
    except RecipeError:
        raise
    except Exception as exc:  # pyarrow/csv errors: name the file, not the library's internals
        raise RecipeError(str(path), None, f"cannot be read as {path.suffix[1:]} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]}).", "Check the file, or convert it to JSONL.") from None
    rows = []
    for i, row in enumerate(table, start=1):
        row = {k: v for k, v in row.items() if v is not None}
        if isinstance(row.get("messages"), str):  # a CSV cell holds the conversation as JSON text
            try:
                row["messages"] = json.loads(row["messages"])
            except json.JSONDecodeError:
                raise RecipeError(str(path), f"row {i}: field 'messages'", "is not JSON.",
                                  f"Write the conversation as a JSON list, e.g. {CHAT_EXAMPLE}.") from None
        rows.append((f"row {i}", row))
    return rows


def csv_rows(path: Path) -> list[dict[str, Any]]:
    """A CSV file's rows, every cell the text as written. Python's csv module, not pandas (`datasets`' reader):
    pandas reads `NA`, `None`, `null` or an empty cell as missing, which dropped the field silently, and `42` as a
    number, which no quoting in the file can prevent."""
    import csv

    from tunebook.config import read_utf8

    return list(csv.DictReader(io.StringIO(read_utf8(path), newline="")))


def parquet_rows(path: Path) -> list[dict[str, Any]]:
    from datasets import Dataset

    return Dataset.from_parquet(str(path)).to_list()


PREFERENCE_EXAMPLE = '{"prompt": "...", "chosen": "...", "rejected": "..."}'
FORMAT_EXAMPLES = {"chat": CHAT_EXAMPLE, "instruction": INSTRUCTION_EXAMPLE, "preference": PREFERENCE_EXAMPLE}


def check_preference_row(example: dict[str, Any], path: str, where: str) -> None:
    """TRL's preference format: `prompt`, `chosen`, `rejected`, as plain text or as conversations (the prompt a
    list of turns ending with a user turn, each answer one assistant turn)."""
    for key in ("prompt", "chosen", "rejected"):
        value = example.get(key)
        if isinstance(value, str):
            if not value.strip():
                raise RecipeError(path, f"{where}: field '{key}'", "is empty.", "Give every pair its text.")
            continue
        if key == "prompt" and isinstance(value, list) and value:
            check_chat_row({"messages": [*value, {"role": "assistant", "content": "?"}]}, path, f"{where}: prompt")
            if value[-1].get("role") != "user":
                raise RecipeError(path, f"{where}: field 'prompt'", "does not end with a user turn.",
                                  "End the prompt with the question the answers answer.")
            continue
        if key != "prompt" and isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
                and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str) \
                and value[0]["content"].strip():
            continue
        raise RecipeError(path, f"{where}: field '{key}'", "is missing or not text." if value is None else
                          f"is a {type(value).__name__}, not text or turns.",
                          f"Write e.g. {PREFERENCE_EXAMPLE} (answers may also be "
                          '[{"role": "assistant", "content": "..."}]).')
    if isinstance(example["chosen"], type(example["rejected"])) and example["chosen"] == example["rejected"]:
        raise RecipeError(path, where, "has the same chosen and rejected answer.", "Remove the row: it teaches nothing.")


def check_instruction_row(example: dict[str, Any], path: str, where: str) -> None:
    for key in REQUIRED_FIELDS:
        if key not in example:
            raise RecipeError(path, f"{where}: field '{key}'", "is missing.",
                              f'Every example needs "instruction" and "output" ("input" is optional): '
                              f"{INSTRUCTION_EXAMPLE}, or a chat row: {CHAT_EXAMPLE}.")
        if example[key] is None:
            raise RecipeError(path, f"{where}: field '{key}'", "is null.", f'Give "{key}" a string, or remove the row.')
    for key in TEXT_FIELDS:
        if key in example and example[key] is not None and not isinstance(example[key], str):
            raise RecipeError(path, f"{where}: field '{key}'", f"is a {type(example[key]).__name__}.",
                              "It must be a string.")
    if not example["output"].strip():
        raise RecipeError(path, f"{where}: field 'output'", "is empty.", "Give every example an answer.")
    if not example["instruction"].strip():
        raise RecipeError(path, f"{where}: field 'instruction'", "is empty.",
                          "Give every example its instruction (the task or question; details go in \"input\").")


def check_chat_row(example: dict[str, Any], path: str, where: str) -> None:
    """A conversation: known roles, non-empty text turns, a system turn only first, ending with the answer."""
    messages = example["messages"]
    if not isinstance(messages, list) or not messages:
        raise RecipeError(path, f"{where}: field 'messages'", "is not a non-empty list of turns.",
                          f"Write e.g. {CHAT_EXAMPLE}.")
    for n, message in enumerate(messages, start=1):
        at = f"{where}: messages[{n}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RecipeError(path, at, "is not a turn.", 'Each turn is {"role": ..., "content": ...}.')
        if message["role"] not in ROLES:
            raise RecipeError(path, f"{at}: role", f"{message['role']!r} is not a role tunebook trains.",
                              f"Use one of {', '.join(ROLES)} (rename e.g. 'human' to 'user', 'gpt' to 'assistant').")
        if not isinstance(message["content"], str) or not message["content"].strip():
            raise RecipeError(path, f"{at}: content", "is empty." if isinstance(message["content"], str) else
                              f"is a {type(message['content']).__name__}.", "Give every turn its text, or remove the turn.")
        if message["role"] == "system" and n != 1:
            raise RecipeError(path, f"{at}: role", "a system turn comes after other turns.",
                              "Put the system turn first, or fold it into the user turn.")
    if not any(m["role"] == "user" for m in messages):
        raise RecipeError(path, f"{where}: field 'messages'", "has no user turn.", "Add the user's question.")
    first = 2 if messages[0]["role"] == "system" else 1
    for n, message in enumerate(messages[first - 1:], start=first):
        expected = "a user" if (n - first) % 2 == 0 else "an assistant"
        if message["role"] != expected.split()[1]:
            raise RecipeError(path, f"{where}: messages[{n}]: role", f"is {message['role']} where {expected} turn "
                              "belongs: turns alternate user, assistant, user … (the chat templates of Mistral, "
                              "Llama-2, Gemma and others refuse anything else).",
                              "Merge consecutive turns of one role, and start with the user's.")
    if messages[-1]["role"] != "assistant":
        raise RecipeError(path, f"{where}: field 'messages'",
                          f"ends with a {messages[-1]['role']} turn, not an assistant turn.",
                          "End each conversation with the assistant's answer: it is what the model learns and is "
                          "scored on.")


def example_location(path: str | Path, index: int) -> str:
    """Where the index-th example (0-based) of a split is, in the words `read_split` uses (`line N`, `row N`)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return f"{'example' if path.suffix == '.json' else 'row'} {index + 1}"
    seen = -1
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            seen += bool(line.strip())
            if seen == index:
                return f"line {number}"
    return f"example {index + 1}"


def select_rows(rows: list[dict], where: dict[str, list], path: str | Path, recipe_source: str,
                name: str = "data.where") -> list[dict]:
    """The rows whose fields hold one of the allowed values (`data.where`, `eval.where`); an error when none is left."""
    for key, values in where.items():
        present = {str(row[key]) for row in rows if key in row}
        if not present:
            raise RecipeError(recipe_source, f"{name}.{key}", f"no row of {path} has a field '{key}'.",
                              f"Name a field the rows carry, or remove `{name}`.")
        wanted = {str(v) for v in values}
        rows = [row for row in rows if str(row.get(key)) in wanted]
        if not rows:
            raise RecipeError(recipe_source, f"{name}.{key}", f"no row of {path} has {key} in {values}.",
                              f"Its rows have {key}: {', '.join(sorted(present)[:10])}.")
    return rows


def refuse_special_markers(rows: list[dict], path: str | Path, tokenizer: Any) -> None:
    """A row whose text contains one of the model's special tokens written out (`<|im_end|>` in an answer about
    chat templates) would tokenize to the marker itself, so training would teach the model to end its turn
    there: an error naming the file, the line and the field, before any model loads."""
    from tunebook.prompts import special_markers, text_fields

    markers = special_markers(tokenizer)
    for i, row in enumerate(rows):
        for field, text in text_fields(row):
            found = next((m for m in markers if m in text), None)
            if found is not None:
                raise RecipeError(str(path), f"{locate_row(path, row, i)}: field '{field}'",
                                  f"contains {found!r}, one of the model's special tokens, as text: it would be read "
                                  "as the token itself (an answer cut short, a turn ended early).",
                                  "Remove it or write it differently (e.g. with a space inside).")


def locate_row(path: str | Path, row: dict, fallback: int) -> str:
    """Where a row stands in its file (`line N`), found by its content: rows may have been selected first."""
    for where, example in raw_examples(Path(path)):
        if example == row:
            return where
    return f"example {fallback + 1}"


def check_limit_per(rows: list[dict], field: str | None, path: str | Path, recipe_source: str) -> None:
    """`eval.limit_per` must name a field of the test rows: a misspelt one would put every row in one group and
    keep only the first `eval.limit` of them, silently dropping whole subsets from the report."""
    if not field or any(field in row for row in rows):
        return
    import difflib

    fields = sorted({key for row in rows for key in row})
    hint = difflib.get_close_matches(field, fields, n=1)
    raise RecipeError(recipe_source, "eval.limit_per", f"no row of {path} has a field '{field}'.",
                      (f"Did you mean '{hint[0]}'? " if hint else "") + f"Its rows have: {', '.join(fields)}.")


def repeat_rows(rows: list[dict], repeat: dict[str, dict[str, int]] | None) -> list[dict]:
    """Each row as many times as `data.repeat` says (the largest factor of the fields it matches), in order."""
    if not repeat:
        return rows
    out = []
    for row in rows:
        times = max((by_value.get(str(row.get(key)), 1) for key, by_value in repeat.items()), default=1)
        out.extend([row] * times)
    return out


def shared_paragraphs(texts: list[str]) -> str:
    """The whole paragraphs (up to and including a blank line) that every text opens with; "" when none."""
    common = os.path.commonprefix(texts)
    end = common.rfind("\n\n")
    return common[:end + 2] if end >= 0 else ""


def share_context(rows: list[dict], by: str, turns: int, fits: Callable[[list[dict]], bool],
                  seed: int) -> list[dict]:
    """Rows that share `by` and their input's opening paragraphs, as conversations of up to `turns` questions.

    `data.share_context`: a text-to-SQL row spends ~90% of its tokens on the schema, so reading one schema once
    for several questions gives the model more answers per token of training. The first question carries its
    whole input; each later user turn carries only the paragraphs that differ (e.g. `Question: ...`). A
    conversation grows only while `fits(messages)`, so none is dropped for length that would not be anyway.
    Chat rows, rows without `by` and rows with no shared paragraph stay as they are. Deterministic for a seed.
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    out: list[dict] = []
    for row in rows:
        if is_chat(row) or by not in row:
            out.append(row)
        else:
            groups.setdefault((str(row[by]), row["instruction"]), []).append(row)
    rng = random.Random(seed)
    for members in groups.values():
        rng.shuffle(members)
        shared = shared_paragraphs([row.get("input") or "" for row in members])
        if len(members) == 1 or not shared:
            out.extend(members)
            continue
        start = 0
        while start < len(members):
            first = members[start]
            messages = [{"role": "user", "content": user_message(first)}, {"role": "assistant", "content": first["output"]}]
            end = start + 1
            while end < len(members) and len(messages) < 2 * turns:
                row = members[end]
                question = row["input"][len(shared):].strip()
                more = messages + [{"role": "user", "content": question}, {"role": "assistant", "content": row["output"]}]
                if not question or not fits(more):
                    break
                messages, end = more, end + 1
            merged = members[start:end]
            fields = {k: v for k, v in first.items() if k not in TEXT_FIELDS and all(m.get(k) == v for m in merged)}
            out.append({"messages": messages, **fields} if end - start > 1 else first)
            start = end
    return out


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write rows atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # two builders at once never share a temp file
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def normalise(text: str) -> str:
    """Normalised form for duplicate detection across splits (case, whitespace, punctuation-insensitive)."""
    return " ".join("".join(c.lower() if c.isalnum() else " " for c in text).split())
