"""Technical Q&A and summarization from the Python standard library's own documentation.

Docstrings are read from the standard library's source with `ast` (nothing is imported, so no module runs);
built-in types' methods (`str.partition`, …) come from their `__doc__`. Whole modules are held out for test.
"""

from __future__ import annotations

import ast
import random
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunebook import tasks
from tunebook.builders.splits import drop_cross_split_duplicates, split_whole_groups, without_special_markers
from tunebook.data import normalise, write_jsonl
from tunebook.errors import SourceMissing

QA_INSTRUCTION = tasks.QA.instruction
SUMMARIZE_INSTRUCTION = tasks.SUMMARIZE.instruction
SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "ensurepip", "turtledemo", "site-packages", "__phello__"}
BUILTIN_TYPES = (str, bytes, bytearray, list, dict, set, frozenset, tuple, int, float, complex, range, memoryview)


def words(text: str) -> int:
    return len(text.split())


def clean(text: str) -> str:
    return " ".join(text.split())


def paragraphs(doc: str) -> list[str]:
    return [clean(p) for p in re.split(r"\n\s*\n", doc.strip()) if p.strip()]


def stdlib_dir() -> Path:
    path = Path(sysconfig.get_paths()["stdlib"])
    if not (path / "os.py").exists():
        raise SourceMissing(f"the Python standard library source is not at {path}; install python3 with its .py files")
    return path


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def documented_objects(root: Path) -> Iterator[tuple[str, str, str, str]]:
    """(module, qualified name, kind, docstring) for public functions, classes and methods, from source."""
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(part in SKIP_PARTS or part.startswith("_") and part != "__init__.py" for part in rel):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = module_name(path, root)
        module_doc = ast.get_docstring(tree)
        if module_doc:
            yield module, module, "module", module_doc
        for node in tree.body:
            yield from _walk(module, node, prefix="")


def _walk(module: str, node: ast.AST, prefix: str) -> Iterator[tuple[str, str, str, str]]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and not node.name.startswith("_"):
        name = prefix + node.name
        doc = ast.get_docstring(node)
        kind = "class" if isinstance(node, ast.ClassDef) else "method" if prefix else "function"
        if doc:
            yield module, name, kind, doc
        if isinstance(node, ast.ClassDef):
            for child in node.body:
                yield from _walk(module, child, prefix=name + ".")


def builtin_objects() -> Iterator[tuple[str, str, str, str]]:
    for typ in BUILTIN_TYPES:
        for attr in sorted(vars(typ)):
            if attr.startswith("_"):
                continue
            doc = getattr(getattr(typ, attr), "__doc__", None)
            if doc:
                # drop the signature line C methods start with ("partition(self, sep, /)")
                lines = doc.strip().splitlines()
                if lines and re.match(rf"^{re.escape(attr)}\(", lines[0]):
                    doc = "\n".join(lines[1:]).strip()
                if doc:
                    yield "builtins", f"{typ.__name__}.{attr}", "method", doc


QUESTION_FORMS = {
    "function": ["What does `{name}()` do?", "What is the purpose of `{name}()`?", "Explain what `{name}()` does."],
    "method": ["What does `{name}()` do?", "What does the `{name}` method do?", "Explain `{name}()`."],
    "class": ["What is `{name}`?", "What does the `{name}` class represent?", "Describe the `{name}` class."],
}


def qa_rows(objects: list[tuple[str, str, str, str]], seed: int) -> list[dict[str, Any]]:
    rows = []
    for module, name, kind, doc in objects:
        if kind == "module":
            continue
        first = paragraphs(doc)[0] if paragraphs(doc) else ""
        if not 6 <= words(first) <= 70 or first.lower().startswith(("deprecated", "xxx", "todo")):
            continue
        full = name if module == "builtins" else f"{module}.{name}"
        rng = random.Random(f"{seed}:{full}")
        question = rng.choice(QUESTION_FORMS[kind]).format(name=full)
        rows.append({"instruction": QA_INSTRUCTION, "input": question, "output": first, "module": module})
    return rows


def first_sentence(text: str) -> tuple[str, str]:
    match = re.match(r"(.+?[.!?])(\s+|$)(.*)", text, re.S)
    return (match.group(1), match.group(3)) if match else (text, "")


def summarize_rows(objects: list[tuple[str, str, str, str]]) -> list[dict[str, Any]]:
    """Document = the docstring without its summary sentence; target = that summary sentence."""
    rows = []
    for module, _name, _kind, doc in objects:
        paras = paragraphs(doc)
        if not paras:
            continue
        summary, rest_of_first = first_sentence(paras[0])
        body = " ".join([rest_of_first, *paras[1:]]).strip() if rest_of_first else " ".join(paras[1:])
        if not 4 <= words(summary) <= 35 or not words(body) >= 15 or ">>>" in summary:
            continue
        body = " ".join(body.split()[:220])  # keeps prompts short enough for CPU training
        rows.append({"instruction": SUMMARIZE_INSTRUCTION, "input": f"Document:\n{body}", "output": summary,
                     "module": module})
    return rows


def topic_rows(seed: int) -> tuple[list[dict], list[dict]]:
    """Q&A and summaries from the language reference (pydoc_data.topics), grouped under 'topics:<name>'."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:
        raise SourceMissing("pydoc_data.topics is missing from this Python") from exc
    qa, summ = [], []
    for key in sorted(topics):
        paras = paragraphs(topics[key])
        paras = [p for p in paras if not set(p) <= set("*=- ")]
        if len(paras) < 3:
            continue
        title, intro = paras[0], paras[1]
        summary, rest = first_sentence(intro)
        if 6 <= words(intro) <= 70:
            qa.append({"instruction": QA_INSTRUCTION, "input": f"In Python, what is {title.lower()} about?",
                       "output": intro, "module": f"topics:{key}"})
        body = " ".join([rest, *paras[2:]]).strip()
        if 5 <= words(summary) <= 35 and words(body) >= 30:
            body = " ".join(body.split()[:220])
            summ.append({"instruction": SUMMARIZE_INSTRUCTION, "input": f"Document:\n{body}", "output": summary,
                         "module": f"topics:{key}"})
    return qa, summ


def assemble(rows: list[dict[str, Any]], out_dir: Path, seed: int, test: float = 0.12, val: float = 0.07) -> dict[str, Any]:
    """Drop rows that write out a special token, split by module, drop normalised duplicates, write the three files.

    Modules are taken in a seeded hash order and whole modules fill test, then val, up to their target
    shares; everything else is train. So no module (and no normalised input) is in two splits.
    """
    rows, marked = without_special_markers(rows)
    unique: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: (r["module"], r["input"])):
        unique.setdefault(normalise(row["input"]), row)
    by_module: dict[str, list[dict]] = {}
    for row in unique.values():
        by_module.setdefault(row["module"], []).append(row)
    splits = split_whole_groups(by_module, seed, test, val)
    dropped = drop_cross_split_duplicates(splits)
    for name, split_rows in splits.items():
        random.Random(f"{seed}-{name}").shuffle(split_rows)
        write_jsonl(out_dir / f"{name}.jsonl", split_rows)
    modules = {name: len({r["module"] for r in split_rows}) for name, split_rows in splits.items()}
    return {"sizes": {n: len(r) for n, r in splits.items()}, "modules": modules, "dropped_duplicates": dropped,
            "dropped_special_tokens": marked,
            "python": sys.version.split()[0], "source": "Python standard library docstrings + pydoc_data.topics"}


def harvest(root: Path | None = None) -> list[tuple[str, str, str, str]]:
    if root is not None and not root.is_dir():
        raise SourceMissing(f"documentation source directory '{root}' does not exist")
    return [*documented_objects(root or stdlib_dir()), *builtin_objects()]


def build_qa(out_dir: Path, seed: int = 42, root: Path | None = None) -> dict[str, Any]:
    objects = harvest(root)
    rows = qa_rows(objects, seed)
    rows += topic_rows(seed)[0] if root is None else []
    return assemble(rows, out_dir, seed)


def build_summarize(out_dir: Path, seed: int = 42, root: Path | None = None) -> dict[str, Any]:
    objects = harvest(root)
    rows = summarize_rows(objects)
    rows += topic_rows(seed)[1] if root is None else []
    return assemble(rows, out_dir, seed, test=0.135, val=0.08)
