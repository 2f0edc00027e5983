"""Reading and checking the JSONL splits (`{"instruction", "input", "output"}` per line)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tunebook.errors import RecipeError

REQUIRED_FIELDS = ("instruction", "output")
TEXT_FIELDS = ("instruction", "input", "output")


def read_jsonl(path: str | Path, recipe_source: str = "recipe", field_name: str = "data") -> list[dict[str, Any]]:
    """Every example of a split, checked line by line; errors name the file, the line and the field."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(
            recipe_source, field_name, f"data file '{path}' does not exist.",
            "Run `make data` to build the datasets, or fix the path.",
        )
    examples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecipeError(
                    str(path), f"line {number}", f"is not valid JSON ({exc.msg} at column {exc.colno}).",
                    "Each line must be one JSON object.",
                ) from None
            if not isinstance(example, dict):
                raise RecipeError(str(path), f"line {number}", "is not a JSON object.", "Write one object per line.")
            for key in REQUIRED_FIELDS:
                if key not in example:
                    raise RecipeError(
                        str(path), f"line {number}: field '{key}'", "is missing.",
                        'Every example needs "instruction" and "output" ("input" is optional).',
                    )
            for key in REQUIRED_FIELDS:
                if example[key] is None:
                    raise RecipeError(
                        str(path), f"line {number}: field '{key}'", "is null.",
                        f'Give "{key}" a string, or remove the line.',
                    )
            for key in TEXT_FIELDS:
                if key in example and example[key] is not None and not isinstance(example[key], str):
                    raise RecipeError(
                        str(path), f"line {number}: field '{key}'", f"is a {type(example[key]).__name__}.",
                        "It must be a string.",
                    )
            if not example["output"].strip():
                raise RecipeError(str(path), f"line {number}: field 'output'", "is empty.", "Give every example an answer.")
            examples.append(example)
    if not examples:
        raise RecipeError(recipe_source, field_name, f"'{path}' has no examples.", "Build or fill the split.")
    return examples


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


def repeat_rows(rows: list[dict], repeat: dict[str, dict[str, int]] | None) -> list[dict]:
    """Each row as many times as `data.repeat` says (the largest factor of the fields it matches), in order."""
    if not repeat:
        return rows
    out = []
    for row in rows:
        times = max((by_value.get(str(row.get(key)), 1) for key, by_value in repeat.items()), default=1)
        out.extend([row] * times)
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
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def normalise(text: str) -> str:
    """Normalised form for duplicate detection across splits (case, whitespace, punctuation-insensitive)."""
    return " ".join("".join(c.lower() if c.isalnum() else " " for c in text).split())


def text_hash(text: str) -> str:
    return hashlib.sha1(normalise(text).encode()).hexdigest()
