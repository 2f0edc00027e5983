"""Code review data from ruff: its rule documentation and its fixes on real code (the standard library).

Each example is a Python snippet with one problem; the target names the rule, says why it matters (ruff's own
"Why is this bad?" text) and gives the improved code. Snippets from real code are whole functions, fixed by
ruff's own safe fix, and kept only if ruff flags the rule before the fix and not after, and both parse.
Whole rules are held out for test, so the test split asks about problems never seen in training.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import shutil
import subprocess
import tempfile
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

from tunebook import tasks
from tunebook.builders.splits import drop_cross_split_duplicates
from tunebook.builders.stdlib_docs import SKIP_PARTS, stdlib_dir
from tunebook.data import normalise, write_jsonl
from tunebook.metrics import ruff_binary

INSTRUCTION = tasks.REVIEW.instruction
# Formatting, docs, typing-annotation and naming rules make poor review examples; everything else may be used.
SKIP_PREFIXES = ("D", "I0", "COM", "Q0", "W", "E1", "E2", "E3", "E5", "ERA", "ANN", "CPY", "T20", "INP", "TD", "FIX",
                 "EM", "FBT", "ARG", "N8", "S", "PLR2004", "RUF100", "UP009", "EXE", "CPY", "TC", "FA", "PYI")
MAX_PER_RULE = 60
MAX_FUNCTION_LINES = 25


def ruff_rules() -> dict[str, dict[str, Any]]:
    out = subprocess.run([ruff_binary(), "rule", "--all", "--output-format", "json"], capture_output=True, text=True,
                         check=True).stdout
    return {rule["code"]: rule for rule in json.loads(out) if rule.get("code")}


def why(rule: dict[str, Any]) -> str:
    """The first paragraph of the rule's 'Why is this bad?' section (or its summary)."""
    match = re.search(r"## Why is this bad\?\n(.+?)(\n\n|\n##|$)", rule["explanation"], re.S)
    text = match.group(1) if match else rule.get("summary", "")
    return " ".join(re.sub(r"\[([^\]]+)\]\[?[^\]\s]*\]?", r"\1", text).split())


def review_text(rule: dict[str, Any], message: str, fixed: str) -> str:
    return f"{rule['code']} ({rule['name']}): {message.rstrip('.')}. {why(rule)}\n\nImproved code:\n```python\n{fixed.rstrip()}\n```"


def doc_examples(rule: dict[str, Any]) -> list[tuple[str, str]]:
    """(bad, good) pairs from the rule's documentation: '## Example' code then 'Use instead:' code."""
    pairs = []
    for bad, good in re.findall(r"```python\n(.*?)```\s*\n+Use instead:\s*\n+```python\n(.*?)```", rule["explanation"], re.S):
        pairs.append((bad.strip("\n"), good.strip("\n")))
    return pairs


NAME_POOL = ["items", "value", "result", "count", "record", "entry", "total", "data", "node", "payload", "row",
             "config", "buffer", "message", "user", "order", "path_name", "score", "token", "handler", "worker",
             "batch", "cache", "index", "label", "widget", "parser", "report", "account", "sample"]


def defined_names(code: str) -> list[str]:
    """Names the snippet itself binds (assignment targets, defs, arguments): safe to rename consistently."""
    import builtins

    tree = ast.parse(code)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names -= {a.asname or a.name.split(".")[0] for a in node.names}
    return sorted(n for n in names if not hasattr(builtins, n) and n not in ("self", "cls") and not n.startswith("__"))


def rename(code: str, mapping: dict[str, str]) -> str:
    """Rename NAME tokens (not attributes after '.') with tokenize, so strings and comments are untouched."""
    import io
    import tokenize

    out, previous = [], None
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == tokenize.NAME and tok.string in mapping and not (previous and previous.string == "."):
            tok = tok._replace(string=mapping[tok.string])
        out.append(tok)
        if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT):
            previous = tok
    return tokenize.untokenize(out)


def variants(bad: str, good: str, rng: random.Random, n: int) -> list[tuple[str, str]]:
    """Copies of a documentation example with its own identifiers renamed (ruff re-verifies each one)."""
    try:
        names = sorted(set(defined_names(bad)) & set(defined_names(good)) | set(defined_names(bad)))
    except SyntaxError:
        return []
    if not names:
        return []
    out = []
    for _ in range(n):
        pool = rng.sample(NAME_POOL, len(NAME_POOL))
        mapping = {name: pool[i % len(pool)] + ("" if i < len(pool) else str(i)) for i, name in enumerate(names)}
        try:
            out.append((rename(bad, mapping), rename(good, mapping)))
        except Exception:  # tokenize errors on odd snippets: skip the variant
            continue
    return out


def run_ruff(directory: Path, codes: set[str]) -> list[dict[str, Any]]:
    cmd = [ruff_binary(), "check", "--isolated", "--no-cache", "--output-format", "json", "--target-version", "py311",
           "--select", ",".join(sorted(codes)), "--preview", "--exit-zero", str(directory)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ruff failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout or "[]")


def enclosing_function(tree: ast.AST, row: int, end_row: int) -> ast.AST | None:
    best = None
    for node in ast.walk(tree):
        inside = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.lineno <= row <= end_row <= node.end_lineno
        if inside and (best is None or node.lineno >= best.lineno):
            best = node
    return best


def apply_edits(lines: list[str], edits: list[dict[str, Any]]) -> list[str]:
    """Apply ruff fix edits (1-based rows and columns) to a file's lines."""
    text = "".join(lines)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def offset(loc: dict[str, int]) -> int:
        return starts[loc["row"] - 1] + loc["column"] - 1

    for edit in sorted(edits, key=lambda e: offset(e["location"]), reverse=True):
        text = text[: offset(edit["location"])] + (edit["content"] or "") + text[offset(edit["end_location"]):]
    return text.splitlines(keepends=True)


def stdlib_findings(codes: set[str], limit_files: int | None = None) -> list[tuple[str, str, str, str, str]]:
    """(code, message, bad snippet, fixed snippet, module) from ruff's safe fixes on stdlib functions."""
    root = stdlib_dir()
    files = [p for p in sorted(root.rglob("*.py")) if not (SKIP_PARTS & set(p.relative_to(root).parts))][:limit_files]
    with tempfile.TemporaryDirectory() as tmp:
        for path in files:
            shutil.copy(path, Path(tmp) / "__".join(path.relative_to(root).parts))
        findings = run_ruff(Path(tmp), codes)
        out = []
        for finding in findings:
            fix = finding.get("fix")
            if not fix or fix.get("applicability") != "safe" or not fix.get("edits"):
                continue
            path = Path(finding["filename"])
            source = path.read_text(encoding="utf-8")
            try:
                tree = ast.parse(source)
            except SyntaxError:
                continue
            rows = [finding["location"]["row"], finding["end_location"]["row"]]
            rows += [e["location"]["row"] for e in fix["edits"]] + [e["end_location"]["row"] for e in fix["edits"]]
            func = enclosing_function(tree, min(rows), max(rows))
            if func is None or func.end_lineno - func.lineno + 1 > MAX_FUNCTION_LINES:
                continue
            lines = source.splitlines(keepends=True)
            fixed_lines = apply_edits(lines, fix["edits"])
            delta = len(fixed_lines) - len(lines)
            bad = textwrap.dedent("".join(lines[func.lineno - 1: func.end_lineno]))
            good = textwrap.dedent("".join(fixed_lines[func.lineno - 1: func.end_lineno + delta]))
            if bad != good:
                out.append((finding["code"], finding["message"], bad, good, path.stem))
    return out


def verified(candidates: list[tuple[str, str, str, str, str]]) -> list[tuple[str, str, str, str, str]]:
    """Keep pairs where both parse, ruff flags the rule on the bad code, and not on the improved code."""
    parsed = []
    for cand in candidates:
        try:
            ast.parse(cand[2])
            ast.parse(cand[3])
        except SyntaxError:
            continue
        parsed.append(cand)
    with tempfile.TemporaryDirectory() as tmp:
        bad_dir, good_dir = Path(tmp, "bad"), Path(tmp, "good")
        bad_dir.mkdir()
        good_dir.mkdir()
        for i, (_, _, bad, good, _) in enumerate(parsed):
            (bad_dir / f"s{i}.py").write_text(bad)
            (good_dir / f"s{i}.py").write_text(good)
        codes = {c[0] for c in parsed}
        flagged_bad = {(Path(f["filename"]).stem, f["code"]) for f in run_ruff(bad_dir, codes)}
        flagged_good = {(Path(f["filename"]).stem, f["code"]) for f in run_ruff(good_dir, codes)}
    return [c for i, c in enumerate(parsed) if (f"s{i}", c[0]) in flagged_bad and (f"s{i}", c[0]) not in flagged_good]


def rule_split(code: str, seed: int) -> str:
    x = int(hashlib.sha256(f"{seed}:{code}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if x < 0.16 else "val" if x < 0.23 else "train"


def build_review(out_dir: Path, seed: int = 42, limit_files: int | None = None) -> dict[str, Any]:
    rules = ruff_rules()
    usable = {code for code, rule in rules.items()
              if not code.startswith(SKIP_PREFIXES) and "Removed" not in (rule.get("status") or {})}
    candidates = []
    for code in sorted(usable):
        message = rules[code].get("summary") or rules[code]["name"]
        rng = random.Random(f"{seed}:variants:{code}")
        for bad, good in doc_examples(rules[code]):
            candidates.append((code, message, bad, good, "ruff-docs"))
            candidates += [(code, message, b, g, "ruff-docs-renamed") for b, g in variants(bad, good, rng, 4)]
    fixable = {code for code in usable if rules[code].get("fix_availability") in ("Always", "Sometimes")}
    candidates += [c for c in stdlib_findings(fixable, limit_files) if c[0] in usable]
    kept = verified(candidates)
    per_rule: dict[str, list] = defaultdict(list)
    for cand in kept:
        per_rule[cand[0]].append(cand)
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    seen: set[str] = set()
    for code in sorted(per_rule):
        group = per_rule[code]
        random.Random(f"{seed}:{code}").shuffle(group)
        for rule_code, message, bad, good, source in group[:MAX_PER_RULE]:
            key = normalise(bad)
            if key in seen:
                continue
            seen.add(key)
            splits[rule_split(code, seed)].append({
                "instruction": INSTRUCTION, "input": f"```python\n{bad.rstrip()}\n```",
                "output": review_text(rules[rule_code], message, good), "rule": rule_code, "source": source,
            })
    dropped = drop_cross_split_duplicates(splits)
    for name, rows in splits.items():
        random.Random(f"{seed}-{name}").shuffle(rows)
        write_jsonl(out_dir / f"{name}.jsonl", rows)
    return {"sizes": {n: len(r) for n, r in splits.items()}, "dropped_duplicates": dropped,
            "rules": {n: len({r["rule"] for r in rows}) for n, rows in splits.items()},
            "from_docs": sum(r["source"] == "ruff-docs" for rows in splits.values() for r in rows),
            "from_docs_renamed": sum(r["source"] == "ruff-docs-renamed" for rows in splits.values() for r in rows),
            "ruff": subprocess.run([ruff_binary(), "--version"], capture_output=True, text=True).stdout.strip()}
