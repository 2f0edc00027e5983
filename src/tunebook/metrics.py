"""Task metrics: small, separately tested functions. Rates and text scores are percentages (0-100).

Generated SQL is untrusted input: it runs only in `sandbox.py`'s worker (read-only, length and memory limits, a
time limit that holds even inside one function call).
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import sqlite3
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunebook.sandbox import GOLD_TIME_LIMIT_S, TIME_LIMIT_ERROR, QueryResult, SqlSandbox, default_sandbox

# The report row counting examples a metric could not score (only present when there were any).
UNSCORED = "unscored_rows"
# The folder beside a SQL data file that holds <db_id>.sqlite (`db_path_for` reads it, the SQL builder writes it).
DATABASES_DIR = "databases"


def first_statement(sql: str) -> str:
    """The first statement of `sql` that is not empty, without its semicolon (the text unchanged if it has one
    statement). SQLite's own tokenizer (`sqlite3.complete_statement`) says where a statement ends, so a semicolon
    in a string or a comment does not end one; an explanation after `SELECT …;` is left out."""
    start = 0
    for end, char in enumerate(sql):
        if char == ";" and sqlite3.complete_statement(sql[start:end + 1]):
            statement = sql[start:end].strip()
            if statement:
                return statement
            start = end + 1
    return sql[start:].strip()


def is_ordered(sql: str) -> bool:
    """Whether the query's outermost SELECT has ORDER BY (then row order is part of the answer)."""
    import sqlglot

    sql = first_statement(sql)
    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
    except Exception:
        return bool(re.search(r"\border\s+by\b", sql, re.I))
    return tree is not None and tree.args.get("order") is not None


def _normalise_value(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4) + 0.0
    return value


def same_result(predicted: list[tuple], gold: list[tuple], ordered: bool) -> bool:
    """Result sets compared as multisets (duplicates count); as lists when the gold query orders them."""
    pred = [tuple(_normalise_value(v) for v in row) for row in predicted]
    ref = [tuple(_normalise_value(v) for v in row) for row in gold]
    return pred == ref if ordered else Counter(pred) == Counter(ref)


class GoldFailed(ValueError):
    """The reference query itself fails, so the example cannot be scored."""


def gold_result(db_path: str | Path, gold_sql: str, sandbox: SqlSandbox | None = None) -> QueryResult:
    """The reference query's result, in the sandbox with the reference's longer time limit."""
    return (sandbox or default_sandbox()).query(db_path, gold_sql, GOLD_TIME_LIMIT_S)


def execution_match(db_path: str | Path, predicted_sql: str, gold_sql: str,
                    sandbox: SqlSandbox | None = None) -> tuple[bool, str | None]:
    """(correct, error of the prediction or None). A failing, hostile or runaway prediction is wrong; so is one
    with no query in it (never "the same empty result" as a gold query that returns no rows)."""
    box = sandbox or default_sandbox()
    gold = gold_result(db_path, gold_sql, box)
    if gold.error is not None:
        raise GoldFailed(f"gold SQL failed on {Path(db_path).name}: {gold.error}: {gold_sql}")
    predicted = box.query(db_path, predicted_sql)
    pred_rows, error, gold_rows = predicted.rows, predicted.error, gold.rows
    if error is not None:
        return False, error
    return same_result(pred_rows, gold_rows, is_ordered(gold_sql)), None


def normalise_sql(sql: str) -> str | None:
    """Canonical text of a query via sqlglot (keywords, spacing, identifier case); None if it does not parse."""
    import sqlglot
    from sqlglot.optimizer.normalize_identifiers import normalize_identifiers

    try:
        tree = sqlglot.parse_one(first_statement(sql), read="sqlite")
    except Exception:
        return None
    if tree is None:
        return None
    return normalize_identifiers(tree, dialect="sqlite").sql(dialect="sqlite", comments=False)


def sql_exact_match(predicted: str, gold: str) -> bool:
    pred = normalise_sql(predicted)
    return pred is not None and pred == normalise_sql(gold)


# A fenced block with any info string (```sql, ```sqlite, ```SQL …), closed or left open at the end of the answer.
_FENCE = re.compile(r"```[\w+-]*[ \t]*\n?(.*?)(?:```|\Z)", re.S)


def extract_sql(text: str) -> str:
    """The query in a model's answer: the first fenced block if there is one, and of that its first statement
    (an explanation after `SELECT …;` is not part of the query)."""
    match = _FENCE.search(text)
    return first_statement(match.group(1) if match else text)


def sql_metrics(predictions: list[str], references: list[str], db_paths: list[str | Path],
                sandbox: SqlSandbox | None = None) -> dict[str, float]:
    """Execution accuracy, sqlglot exact match, and the share of predictions that fail to parse or run.

    A row whose gold query fails (a database changed since the data was built, a gold query over the time limit
    on a loaded machine) cannot be scored: it is left out of the rates and counted in `unscored_rows`.
    """
    correct = exact = errors = unscored = 0
    kinds: Counter = Counter()
    for pred, gold, db in zip(predictions, references, db_paths, strict=True):
        sql = extract_sql(pred)
        try:
            ok, error = execution_match(db, sql, gold, sandbox)
        except GoldFailed:
            unscored += 1
            continue
        correct += ok
        errors += error is not None
        exact += sql_exact_match(sql, gold)
        kinds[sql_error_kind(error, ok)] += 1
    n = len(predictions) - unscored
    if not n and unscored:  # nothing could be scored: no rates at all, rather than rates of 0
        return {UNSCORED: unscored}
    n = max(n, 1)
    out = {"exec_accuracy": 100 * correct / n, "exact_match": 100 * exact / n, "sql_error_rate": 100 * errors / n,
           **{kind: 100 * kinds[kind] / n for kind in SQL_ERROR_KINDS}}
    if unscored:
        out[UNSCORED] = unscored
    return out


# What went wrong with an answer, read from SQLite's error: grounding (a name the schema lacks) vs logic.
SQL_ERROR_KINDS = ("unknown_table", "unknown_column", "syntax_error", "other_error", "wrong_result")


def sql_error_kind(error: str | None, correct: bool) -> str:
    """`correct`, `wrong_result` (runs, other rows), or why it does not run: unknown_table / unknown_column (names
    what the schema lacks, or a column of another table), syntax_error, other_error (time limit, refused …)."""
    if error is None:
        return "correct" if correct else "wrong_result"
    text = error.lower()
    if text.startswith("no such table"):
        return "unknown_table"
    if text.startswith(("no such column", "ambiguous column")):
        return "unknown_column"
    if "syntax error" in text or "incomplete input" in text or "unrecognized token" in text or \
            text.startswith("not a query"):
        return "syntax_error"
    return "other_error"


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Equal texts, whitespace aside and in one Unicode form (NFC: `é` typed as one character or as e + accent)."""
    def norm(text: str) -> str:
        return " ".join(unicodedata.normalize("NFC", text).split())

    same = sum(norm(p) == norm(r) for p, r in zip(predictions, references, strict=True))
    return 100 * same / max(len(predictions), 1)


def perplexity(model: Any, tokenizer: Any, examples: list[dict], system_prompt: str | None = None,
               batch_size: int = 8) -> float:
    """exp(mean negative log-likelihood of the reference answer tokens, each conditioned on its prompt)."""
    return perplexity_of(*answer_nll(model, tokenizer, examples, system_prompt, batch_size))


def perplexity_of(nll: float, tokens: int) -> float:
    """Perplexity from a summed negative log-likelihood and the number of tokens it is over."""
    return math.exp(nll / max(tokens, 1))


def reference_ids(tokenizer: Any, example: dict, system_prompt: str | None = None) -> list[int]:
    """The reference answer's token ids as perplexity scores them: the last answer (through its end-of-turn
    marker) after the prompt `encode_prompt` writes. Earlier answers of a chat are part of the prompt."""
    from tunebook.prompts import encode_example

    return [t for t in encode_example(tokenizer, example, system_prompt, all_turns=False)["labels"] if t != -100]


def answer_nll(model: Any, tokenizer: Any, examples: list[dict], system_prompt: str | None = None,
               batch_size: int = 8) -> tuple[float, int]:
    """Summed negative log-likelihood of the reference answers (`reference_ids`) given their prompts, and their
    token count. An eval's plain pass scores them on its own prefilled caches (`continuous.score_references`);
    this is the path for rows it did not generate in this run.

    Prompts that share a long prefix (one database schema for many test questions) are scored as a group whose
    prefix is computed once and cached; the rest are batched by length. The LM head runs only from the earliest
    answer position of a batch on (`logits_to_keep`): a 16 x 900-token batch of full logits over a 49k vocabulary
    would take ~3 GB.
    """
    from tunebook.generation import shared_prefix_batches
    from tunebook.prompts import encode_example

    encoded = [encode_example(tokenizer, ex, system_prompt, all_turns=False) for ex in examples]
    firsts = [next(i for i, t in enumerate(e["labels"]) if t != -100) for e in encoded]
    shared, rest = shared_prefix_batches([e["input_ids"][:f] for e, f in zip(encoded, firsts, strict=True)],
                                         batch_size)
    rest.sort(key=lambda i: len(encoded[i]["input_ids"]))
    groups = shared + [(0, rest[k:k + batch_size]) for k in range(0, len(rest), batch_size)]
    total_nll, total_tokens = 0.0, 0
    for prefix, members in groups:
        nll, tokens = _answer_nll(model, [encoded[i] for i in members], [firsts[i] for i in members], prefix,
                                  tokenizer.pad_token_id)
        total_nll, total_tokens = total_nll + nll, total_tokens + tokens
    return total_nll, total_tokens


def _answer_nll(model: Any, batch: list[dict], firsts: list[int], prefix: int, pad_id: int) -> tuple[float, int]:
    """Summed answer-token NLL and token count of examples that share their first `prefix` tokens (0: none)."""
    import torch

    device = next(model.parameters()).device
    cache = None
    with torch.no_grad():
        if prefix:
            cache = model(input_ids=torch.tensor([batch[0]["input_ids"][:prefix]], device=device), use_cache=True,
                          logits_to_keep=1).cache
            cache.batch_repeat_interleave(len(batch))
        tails = [e["input_ids"][prefix:] for e in batch]
        width = max(len(t) for t in tails)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)  # labels[j]: the token after position j
        mask = torch.zeros((len(batch), prefix + width), dtype=torch.long)
        mask[:, :prefix] = 1
        for row, (e, tail) in enumerate(zip(batch, tails, strict=True)):
            ids[row, :len(tail)] = torch.tensor(tail)
            labels[row, :len(tail) - 1] = torch.tensor(e["labels"][prefix + 1:])
            mask[row, prefix:prefix + len(tail)] = 1
        keep = width - (min(firsts) - 1 - prefix)  # from the position that predicts the earliest answer token
        positions = torch.arange(prefix, prefix + width).expand(len(batch), -1)
        # Positions as a tensor, not a count: the model then gathers them into a contiguous block before the LM
        # head. With a count it slices a strided view, which torch's matmul cannot fold to 2D, so it broadcasts the
        # 49k x 576 head weight across the batch (a copy per row; most of this function's time on a CPU).
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       cache=cache, use_cache=cache is not None,
                       logits_to_keep=torch.arange(width - keep, width, device=device)).logits
        shift_labels = labels[:, width - keep:].to(device)
        nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), shift_labels.reshape(-1),
                                                ignore_index=-100, reduction="sum")
    return nll.item(), int((shift_labels != -100).sum())


# A fence opens at the start of a line with an info string in any case (```Python, ``` py3), and closes at the
# start of a line, or is left open at the end of the answer (cut off by max_new_tokens).
_BLOCK = re.compile(r"^[ \t]*```[ \t]*([^\n`]*)\n(.*?)(?:^[ \t]*```[ \t]*$|\Z)", re.S | re.M)
PYTHON_INFO = ("", "python", "py", "python3", "py3")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(info string in lower case, body) of each fenced block of an answer, in order."""
    return [(info.strip().lower(), body) for info, body in _BLOCK.findall(text)]


def last_code_block(text: str) -> str | None:
    """The last fenced Python block of a text (a review's improved code), or None."""
    blocks = [body for info, body in fenced_blocks(text) if info in PYTHON_INFO]
    return blocks[-1] if blocks else None


def code_tokens(code: str | None) -> tuple[tuple[int, str], ...] | None:
    """The code as a token sequence (blank lines and indentation width ignored), or None when it does not parse.

    Tokens rather than the AST because many review rules change only tokens: `else: if` → `elif`, a backslash
    continuation → parentheses, a `# noqa` comment. Their before and after have the same AST.
    """
    import ast
    import io
    import tokenize

    if code is None:
        return None
    try:
        ast.parse(code)
        tokens = tokenize.generate_tokens(io.StringIO(code).readline)
        return tuple((t.type, "" if t.type == tokenize.INDENT else t.string.strip()) for t in tokens
                     if t.type not in (tokenize.NL, tokenize.ENDMARKER))
    except (SyntaxError, ValueError, tokenize.TokenError, RecursionError, MemoryError):
        return None  # nested past the parser's depth counts as code that does not parse, not as a crash


def kept_ratio(before: tuple, after: tuple) -> float:
    """How much of the code's words (names, operators, literals; layout tokens aside) an edit kept, in order."""
    def words(tokens: tuple) -> list:
        return [t for t in tokens if t[1]]

    return difflib.SequenceMatcher(None, words(before), words(after), autojunk=False).ratio()


def ruff_binary() -> str:
    """ruff from PATH, or the one installed beside this Python (a venv that is not activated): the review metric's
    checker, and the review builder's source of findings."""
    import shutil
    import sys

    from tunebook.errors import SourceMissing

    beside = Path(sys.executable).parent / "ruff"
    path = shutil.which("ruff") or (str(beside) if beside.exists() else None)
    if path is None:
        raise SourceMissing("the `ruff` executable is not on PATH (it ships with the dev install: `make setup`)")
    return path


@functools.cache
def ruff_rule_codes() -> frozenset[str]:
    """The rule codes this ruff knows (`ruff rule --all`); empty when ruff is not installed."""
    import json
    import subprocess

    ruff = ruff_binary()
    if not ruff:
        return frozenset()
    done = subprocess.run([ruff, "rule", "--all", "--output-format", "json"], capture_output=True, text=True)
    try:
        return frozenset(rule["code"] for rule in json.loads(done.stdout or "[]"))
    except (ValueError, KeyError, TypeError):
        return frozenset()


def review_metrics(
    predictions: list[str], references: list[str], inputs: list[str], rules: list[str | None]
) -> dict[str, float]:
    """Review checks on the improved code in each answer (its last fenced block); percentages of all examples.

    - `code_fixed` (the headline): the improved code equals the reference fix (formatting aside), or it is an
      edit of the input (changed, yet at least half its tokens kept in order) that parses and that ruff no longer
      reports the example's rule on. Handing the code back unchanged, replacing it with unrelated code, or code
      whose rule cannot be checked and that differs from the reference, is not a fix.
    - `fix_parses`: the improved code parses (`ast.parse`).
    - `rule_checked`: the example names a rule this ruff knows, so the rule could be checked at all.
    - `rule_fixed`: the rule was checked on the improved code and is no longer reported (an unchecked example
      never counts). Replacing the snippet with unrelated code also passes this check, hence `code_fixed`.
    - `fix_matches_reference`: its tokens equal the reference fix's: the edit the rule asks for, nothing else.
    - `fix_unchanged`: its tokens equal the input snippet's: the answer hands the code back as it was.
    - `rule_named`: the answer names the example's rule code (e.g. `FURB132`).
    One ruff run covers all answers.
    """
    import json
    import subprocess
    import tempfile

    codes = [last_code_block(p) for p in predictions]
    tokens = [code_tokens(c) for c in codes]
    codes = [c if t is not None else None for c, t in zip(codes, tokens, strict=True)]
    known = ruff_rule_codes()
    checkable = [bool(rule) and rule in known for rule in rules]
    flagged: set[tuple[str, str]] = set()
    selected = sorted({r for r, c, ok in zip(rules, codes, checkable, strict=True) if ok and c is not None})
    if selected:
        with tempfile.TemporaryDirectory() as tmp:
            for i, code in enumerate(codes):
                if code is not None:
                    Path(tmp, f"p{i}.py").write_text(code)
            done = subprocess.run([ruff_binary(), "check", "--isolated", "--no-cache", "--preview", "--exit-zero",
                                   "--output-format", "json", "--select", ",".join(selected), tmp],
                                  capture_output=True, text=True)
            if done.returncode != 0:  # ruff refused the run: nothing was checked
                checkable = [False] * len(rules)
            flagged = {(Path(f["filename"]).stem, f["code"]) for f in json.loads(done.stdout or "[]")}
    ref_tokens = [code_tokens(last_code_block(r)) for r in references]
    input_tokens = [code_tokens(last_code_block(t) or t) for t in inputs]
    same = [t is not None and t == r for t, r in zip(tokens, ref_tokens, strict=True)]
    unchanged = [t is not None and t == i for t, i in zip(tokens, input_tokens, strict=True)]
    rule_fixed = [codes[i] is not None and checkable[i] and (f"p{i}", rules[i]) not in flagged
                  for i in range(len(rules))]
    edit = [t is not None and i is not None and not u and kept_ratio(i, t) >= 0.5
            for t, i, u in zip(tokens, input_tokens, unchanged, strict=True)]
    fixed = [same[i] or (rule_fixed[i] and edit[i]) for i in range(len(rules))]
    n = max(len(predictions), 1)
    return {
        "code_fixed": 100 * sum(fixed) / n,
        "fix_parses": 100 * sum(t is not None for t in tokens) / n,
        "rule_checked": 100 * sum(checkable) / n,
        "rule_fixed": 100 * sum(rule_fixed) / n,
        "fix_matches_reference": 100 * sum(same) / n,
        "fix_unchanged": 100 * sum(unchanged) / n,
        "rule_named": 100 * sum(bool(rule) and re.search(rf"\b{re.escape(rule)}\b", p) is not None
                                for p, rule in zip(predictions, rules, strict=True)) / n,
    }


def _strict_json(text: str) -> Any:
    """JSON as the standard has it: no NaN or Infinity, no key given twice (Python's reader accepts both)."""
    import json

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in pairs}) != len(pairs):
            raise ValueError("a key given twice")
        return dict(pairs)

    return json.loads(text, parse_constant=no_constant, object_pairs_hook=unique)


def parse_json_answer(text: str) -> tuple[bool, Any]:
    """(parsed, value) of an answer that should be JSON: its first fenced block marked json (or unmarked) that
    parses, else the whole answer, else any other fenced block that parses (a model that echoes a ```python input
    before its ```json answer)."""
    blocks = fenced_blocks(text)
    candidates = [b for info, b in blocks if info in ("json", "jsonc", "")] + [text] + \
                 [b for info, b in blocks if info not in ("json", "jsonc", "")]
    for candidate in candidates:
        try:
            return True, _strict_json(candidate)
        except (ValueError, TypeError, RecursionError):
            continue
    return False, None


def json_equal(a: Any, b: Any) -> bool:
    """Equal as JSON values: key order and number spelling (1, 1.0) aside, but `true` is not `1`."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def json_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """`json_match`: the answer parses as JSON and equals the reference as a JSON value (key order, spacing and
    number spelling aside); `json_valid`: it parses at all."""
    matches = valid = 0
    for pred, ref in zip(predictions, references, strict=True):
        ok, value = parse_json_answer(pred)
        expected_ok, expected = parse_json_answer(ref)
        valid += ok
        matches += ok and expected_ok and json_equal(value, expected)
    n = max(len(predictions), 1)
    return {"json_match": 100 * matches / n, "json_valid": 100 * valid / n}


def db_path_for(row: dict, data_file: Path) -> Path:
    """A row's SQLite file: its `db_path` (relative to the data file) or databases/<db_id>.sqlite beside it."""
    if row.get("db_path"):
        path = Path(row["db_path"])
        return path if path.is_absolute() else data_file.parent / path
    return data_file.parent / DATABASES_DIR / f"{row['db_id']}.sqlite"


# ---------------------------------------------------------------- the named metrics a recipe chooses from

Scorer = Callable[[list[str], list[dict], Path], dict[str, float]]


@dataclass(frozen=True)
class Metric:
    """A metric a recipe names in `eval.metrics`: the report columns it writes and how they are scored.

    `score` gets the predictions, the rows and the data file; None means the evaluator computes it with the
    model (perplexity). `row_problem` says what is wrong with a row this metric cannot score (None: fine).
    """

    columns: tuple[str, ...]
    score: Scorer | None
    row_problem: Callable[[dict], str | None] = lambda row: None
    row_fix: str = ""
    about: str = ""
    # Verified decoding (verify.py): how well one answer passes on its own (answer, row without its reference, data
    # file; 0 = fails, up to `check_best` = passes whole), and the GBNF grammar its answers must follow.
    check: Callable[[str, dict, Path], int] | None = None
    check_best: int = 1
    grammar: Callable[[dict, Path], str | None] | None = None
    # Verified decoding: a failing answer rewritten from the row's own context, never its reference (None: no
    # repair); the rewrite is checked like any answer.
    repair: Callable[[str, dict, Path], str | None] | None = None
    # Eval, before generating: raises RecipeError for the first row whose own files (its database …) are missing
    # or unusable (rows, data file). `row_problem` checks the row's fields; this checks what they point to.
    check_resources: Callable[[list[dict], Path], None] | None = None


def _refs(rows: list[dict]) -> list[str]:
    from tunebook.prompts import reference_answer

    return [reference_answer(r) for r in rows]


# Scripts written without spaces between words: each character is a token (as ROUGE and BLEU do for Chinese).
_UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0e7f"
_WORD = re.compile(rf"[{_UNSPACED}]|(?:(?![{_UNSPACED}])[^\W_])+")


class RougeTokens:
    """rouge-score's own tokens for English (lower case, letter-and-digit runs, Porter stems of words longer than 3
    letters), extended to every script. Its default tokenizer keeps only [a-z0-9]: an answer in Chinese, Russian or
    Arabic scored 0 even when it equalled the reference, and accented letters were dropped (`l'été` = `l'ôté`)."""

    def __init__(self) -> None:
        from nltk.stem import porter

        self.stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        words = _WORD.findall(unicodedata.normalize("NFC", text).lower())
        return [self.stemmer.stem(w) if len(w) > 3 and w.isascii() else w for w in words]


def _rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=RougeTokens())
    totals: Counter = Counter()
    for pred, ref in zip(predictions, references, strict=True):
        for key, score in scorer.score(ref, pred).items():
            totals[key] += score.fmeasure
    n = max(len(predictions), 1)
    return {key: 100 * totals[key] / n for key in ("rouge1", "rouge2", "rougeL")}


def _sacrebleu(kind: str) -> Scorer:
    def score(predictions: list[str], rows: list[dict], data_file: Path) -> dict[str, float]:
        import sacrebleu

        predictions_nfc = [unicodedata.normalize("NFC", p) for p in predictions]
        references = [unicodedata.normalize("NFC", r) for r in _refs(rows)]
        if kind == "chrf":
            return {kind: sacrebleu.corpus_chrf(predictions_nfc, [references]).score}
        # sacrebleu's default tokenizer (13a) splits on spaces, so a Chinese or Japanese sentence is one word and
        # BLEU is 0: its `zh` tokenizer splits those characters (text in other scripts is tokenized as 13a does).
        unspaced = any(re.search(f"[{_UNSPACED}]", r) for r in references)
        return {kind: sacrebleu.corpus_bleu(predictions_nfc, [references], tokenize="zh" if unspaced else "13a").score}

    return score


def _sql_problem(row: dict) -> str | None:
    return None if row.get("db_id") or row.get("db_path") else "has neither 'db_id' nor 'db_path'"


def _json_problem(row: dict) -> str | None:
    from tunebook.prompts import reference_answer

    return None if parse_json_answer(reference_answer(row))[0] else "has a reference answer that is not JSON"


def _sql_runs(answer: str, row: dict, data_file: Path) -> int:
    """2: the query runs and returns rows; 1: it runs and returns nothing; 0: it does not run (or is empty)."""
    sql = extract_sql(answer)
    if not sql:
        return 0
    result = default_sandbox().query(db_path_for(row, data_file), sql)
    return 0 if result.error is not None else 2 if result.rows else 1


def _sql_repair(answer: str, row: dict, data_file: Path) -> str | None:
    """The query with its columns put on the tables that have them (`sql_repair.py`), or None."""
    from tunebook.sql_repair import repair, schema_for

    sql, path = extract_sql(answer), db_path_for(row, data_file)
    return repair(sql, schema_for(path)) if sql and path.is_file() else None


def _sql_databases_ready(rows: list[dict], data_file: Path) -> None:
    """Every row's database exists and its gold query runs there (one over the time limit may only mean a loaded
    machine: it is scored, or counted unscored, later). A failing gold query would leave the row unscoreable."""
    from tunebook.errors import RecipeError
    from tunebook.prompts import reference_answer

    for number, row in enumerate(rows, start=1):
        db_path = db_path_for(row, data_file)
        if not db_path.exists():
            raise RecipeError(str(data_file), f"example {number}", f"database {db_path} "
                              "does not exist.", "Run `make data` or fix db_path.")
        error = gold_result(db_path, reference_answer(row)).error
        if error is not None and error != TIME_LIMIT_ERROR:
            raise RecipeError(str(data_file), f"example {number}: field 'output'",
                              f"the gold SQL fails on {db_path.name} ({error}).",
                              "Fix the query or the database, or remove the example.")


def _sql_grammar(row: dict, data_file: Path) -> str | None:
    from tunebook.sql_grammar import schema_grammar

    path = db_path_for(row, data_file)
    return schema_grammar(path) if path.is_file() else None


def _code_parses(answer: str, row: dict, data_file: Path) -> bool:
    return code_tokens(last_code_block(answer)) is not None


def _code_fixed(predictions: list[str], rows: list[dict], data_file: Path) -> dict[str, float]:
    from tunebook.prompts import user_message

    return review_metrics(predictions, _refs(rows), [user_message(r) for r in rows], [r.get("rule") for r in rows])


METRICS: dict[str, Metric] = {
    "exact_match": Metric(("exact_match",), lambda p, rows, f: {"exact_match": exact_match(p, _refs(rows))},
                          about="the answer equals the reference, whitespace aside"),
    "rouge": Metric(("rouge1", "rouge2", "rougeL"), lambda p, rows, f: _rouge(p, _refs(rows)),
                    about="ROUGE-1/2/L F1 (rouge-score, stemmed)"),
    "bleu": Metric(("bleu",), _sacrebleu("bleu"), about="corpus BLEU (sacrebleu)"),
    "chrf": Metric(("chrf",), _sacrebleu("chrf"), about="corpus chrF (sacrebleu)"),
    "perplexity": Metric(("perplexity",), None, about="of the reference answers under the model (lower is better)"),
    "sql_execution": Metric(
        ("exec_accuracy", "exact_match", "sql_error_rate", *SQL_ERROR_KINDS),
        lambda p, rows, f: sql_metrics(p, _refs(rows), [db_path_for(r, f) for r in rows]),
        row_problem=_sql_problem,
        row_fix="Give each row its database: 'db_id' (databases/<db_id>.sqlite beside the split) or 'db_path'",
        about="runs the SQL on the row's database: same result set as the gold query; sqlglot exact match; errors",
        check=_sql_runs, check_best=2, grammar=_sql_grammar, repair=_sql_repair, check_resources=_sql_databases_ready,
    ),
    "code_fixed": Metric(("code_fixed", "fix_parses", "rule_checked", "rule_fixed", "fix_matches_reference",
                          "fix_unchanged", "rule_named"), _code_fixed,
                         about="the improved code fixes the row's `rule` (ruff) or equals the reference fix",
                         check=_code_parses),
    "json_match": Metric(("json_match", "json_valid"), lambda p, rows, f: json_metrics(p, _refs(rows)),
                         row_problem=_json_problem, row_fix="Make each reference answer valid JSON",
                         about="the answer parses as JSON and equals the reference",
                         check=lambda answer, row, data_file: parse_json_answer(answer)[0]),
}


def score(names: list[str], predictions: list[str], rows: list[dict], data_file: Path,
          problems: list[str] | None = None) -> dict[str, float]:
    """The named metrics' columns, in order (perplexity, which needs the model, is left to the caller).

    A metric that fails (a scorer's tool missing, a bug) leaves its columns out and says why in `problems`
    instead of throwing away the answers it was given; without `problems` the failure is raised.
    """
    import logging

    out: dict[str, float] = {}
    for name in names:
        if METRICS[name].score is None:
            continue
        try:
            out.update(METRICS[name].score(predictions, rows, data_file))
        except Exception as exc:
            if problems is None:
                raise
            logging.getLogger(__name__).exception("metric %s failed", name)
            problems.append(f"metric {name} could not be scored ({type(exc).__name__}: {str(exc)[:200]})")
    return out
