"""The `extract` dataset, tunebook's worked example of adding a task: a Python `def` header -> its parameters as JSON.

Inputs are real function and method headers from the Python standard library's source (read with `ast`;
nothing is imported, so no module runs). Each target is computed from the parsed header itself, so it is right
by construction and checkable by `json_match`: the answer must equal it as a JSON value. Whole modules are held
out, so test headers come from modules the model never saw.
"""

from __future__ import annotations

import ast
import json
import random
import sys
from pathlib import Path
from typing import Any

from tunebook.builders.splits import drop_cross_split_duplicates, split_whole_groups
from tunebook.builders.stdlib_docs import SKIP_PARTS, module_name, stdlib_dir
from tunebook.data import write_jsonl
from tunebook.errors import SourceMissing

INSTRUCTION = (
    'Describe this Python function\'s parameters as JSON: {"name": ..., "params": [{"name": ..., "kind": ..., '
    '"default": ..., "annotation": ...}], "returns": ...}. Leave out "default" and "annotation" where the code '
    'has none; "returns" is null without a return annotation.'
)
PER_MODULE = 30  # headers per module at most, so a few huge modules do not dominate
MAX_HEADER_CHARS = 600


def describe(node: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[str, Any]:
    """The JSON target for a parsed function: its name, each parameter's kind, default and annotation, returns."""
    args = node.args
    params: list[dict[str, Any]] = []

    def add(arg: ast.arg, kind: str, default: ast.expr | None = None) -> None:
        entry: dict[str, Any] = {"name": arg.arg, "kind": kind}
        if default is not None:
            entry["default"] = ast.unparse(default)
        if arg.annotation is not None:
            entry["annotation"] = ast.unparse(arg.annotation)
        params.append(entry)

    positional = [*args.posonlyargs, *args.args]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for i, (arg, default) in enumerate(zip(positional, defaults, strict=True)):
        add(arg, "positional_only" if i < len(args.posonlyargs) else "positional_or_keyword", default)
    if args.vararg:
        add(args.vararg, "var_positional")
    for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        add(arg, "keyword_only", default)
    if args.kwarg:
        add(args.kwarg, "var_keyword")
    return {"name": node.name, "params": params, "returns": ast.unparse(node.returns) if node.returns else None}


def headers(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(header source, target) for each public function and method of one file, in source order."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.name.startswith("_"):
            continue
        first_body = node.body[0].lineno
        if first_body <= node.lineno:
            continue  # `def f(): pass` on one line
        header = "\n".join(lines[node.lineno - 1:first_body - 1]).rstrip()
        if "#" in header:
            header = "\n".join(line.split("  #")[0].rstrip() for line in header.splitlines())
        header = dedent_header(header)
        if not header.endswith(":") or len(header) > MAX_HEADER_CHARS:
            continue
        try:  # the header alone must parse back to the same description (what the reader of the input sees)
            reparsed = ast.parse(header + "\n    ...").body[0]
        except SyntaxError:
            continue
        target = describe(node)
        if describe(reparsed) == target:
            out.append((header, target))
    return out


def dedent_header(header: str) -> str:
    lines = header.splitlines()
    indent = len(lines[0]) - len(lines[0].lstrip())
    return "\n".join(line[indent:] if line[:indent].isspace() or not line[:indent] else line for line in lines)


def build_extract(out_dir: Path, seed: int = 42, root: Path | None = None) -> dict[str, Any]:
    """Write data/extract/{train,val,test}.jsonl: ~10% of modules for test, ~5% for val, the rest train."""
    root = root or stdlib_dir()
    if not root.is_dir():
        raise SourceMissing(f"the Python standard library source directory '{root}' does not exist")
    by_module: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(part in SKIP_PARTS or part.startswith("_") and part != "__init__.py" for part in rel):
            continue
        module = module_name(path, root)
        found = headers(path)
        random.Random(f"{seed}:{module}").shuffle(found)
        seen: set[str] = set()
        for header, target in found:
            if header in seen:
                continue
            seen.add(header)
            by_module.setdefault(module, []).append({
                "instruction": INSTRUCTION, "input": f"```python\n{header}\n```",
                "output": json.dumps(target, ensure_ascii=False), "module": module,
            })
            if len(by_module[module]) >= PER_MODULE:
                break
    splits = split_whole_groups(by_module, seed, test=0.10, val=0.05)
    dropped = drop_cross_split_duplicates(splits)
    for name, rows in splits.items():
        random.Random(f"{seed}-{name}").shuffle(rows)
        write_jsonl(out_dir / f"{name}.jsonl", rows)
    return {"sizes": {n: len(r) for n, r in splits.items()},
            "modules": {n: len({r["module"] for r in rows}) for n, rows in splits.items()},
            "dropped_duplicates": dropped, "python": sys.version.split()[0],
            "source": "Python standard library source: function and method headers, parsed with ast"}
