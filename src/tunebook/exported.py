"""What an export left on disk, checked before anything uses it: `eval --gguf` and `serve` share it.

A GGUF is only used when it exists, was exported from the adapter the run has now (the adapter's sha256 that
export recorded in verify.json), is not older than that adapter, and loads in llama.cpp.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from tunebook.errors import RecipeError
from tunebook.outputs import ADAPTER_WEIGHTS, adapter_gguf_file, gguf_file, verify_file
from tunebook.runs import Run


def adapter_digest(adapter_dir: Path) -> str | None:
    """sha256 of the adapter's weights (export records it; `eval --gguf` and `serve` check it)."""
    from tunebook.data import sha256

    weights = adapter_dir / ADAPTER_WEIGHTS
    return sha256(weights) if weights.exists() else None


def verification(run_name: str) -> dict[str, Any]:
    """The run's verify.json ({} when there is none or it cannot be read)."""
    try:
        data = json.loads(verify_file(run_name).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def exported_from(run_name: str) -> str | None:
    """The adapter digest an export recorded in verify.json (None for exports that recorded none)."""
    return verification(run_name).get("adapter_sha256")


def checked_file(run: Run, path: Path, adapter_dir: Path, flag: str, use: str) -> Path:
    """`path`, after checking it exists and comes from the adapter in `adapter_dir` (else a one-line error that
    names `flag` and the export to run). `use` says what a stale file would do, e.g. "score another run"."""
    recipe = run.recipe
    export_command = f"tunebook export {run.command}"
    if not path.exists():
        raise RecipeError(recipe.source, flag, f"{path} does not exist.",
                          f"Run `{export_command}` first (it writes export.gguf: "
                          f"{', '.join(recipe.export.gguf) or 'none'}), or name only exported types.")
    if exported_from(run.name) not in (None, adapter_digest(adapter_dir)):
        raise RecipeError(recipe.source, flag, f"{path.name} was exported from another adapter than the one "
                          f"in {adapter_dir}, so it would {use} another training run.", f"Run `{export_command}`.")
    adapter = adapter_dir / ADAPTER_WEIGHTS
    if adapter.exists() and adapter.stat().st_mtime > path.stat().st_mtime:
        raise RecipeError(recipe.source, flag, f"{path.name} is older than the adapter in {adapter_dir}, "
                          f"so it would {use} an earlier training run.", f"Run `{export_command}`.")
    return path


def require_llama_cpp(recipe_source: str, flag: str) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise RecipeError(recipe_source, flag, "llama-cpp-python is not installed.",
                          "Run `make export` once (it builds llama-cpp-python into the venv).")


def check_loads(run: Run, path: Path, lora_path: Path | None = None) -> None:
    """A file llama.cpp refuses is found now, with one line, not after the other work."""
    from tunebook import llamacpp

    try:
        llm = llamacpp.load_gguf(path, n_ctx=64, lora_path=lora_path)
    except Exception as exc:  # llama_cpp raises ValueError/RuntimeError with its own words
        raise RecipeError(str(lora_path or path), None, f"llama.cpp cannot load it ({str(exc).strip()[:200]}).",
                          f"Run `tunebook export {run.command}` again.") from None
    del llm


def gguf_files(run: Run, types: list[str], adapter_dir: Path, flag: str = "--gguf",
               use: str = "score") -> dict[str, Path]:
    """The exported GGUF file of each type, checked to exist, to come from this adapter, and to load in llama.cpp."""
    files = {q: checked_file(run, gguf_file(run.name, q), adapter_dir, flag, use) for q in types}
    if files:
        require_llama_cpp(run.recipe.source, flag)
    for path in files.values():
        check_loads(run, path)
    return files


def adapter_gguf(run: Run, adapter_dir: Path, flag: str = "--adapter", use: str = "serve") -> tuple[Path, Path]:
    """(base GGUF, adapter GGUF) of a run's adapter-only export, checked like `gguf_files`."""
    from tunebook.outputs import base_gguf_file

    lora = checked_file(run, adapter_gguf_file(run.name), adapter_dir, flag, use)
    base_type = verification(run.name).get("adapter", {}).get("base_type", "f16")
    base = base_gguf_file(run.recipe.model.name, base_type)
    if not base.exists():
        raise RecipeError(run.recipe.source, flag, f"the base GGUF {base} that the adapter applies to does not exist.",
                          f"Run `tunebook export {run.command}` (it writes the base file once per base model).")
    require_llama_cpp(run.recipe.source, flag)
    check_loads(run, base, lora)
    return base, lora


def smallest_verified(run: Run) -> str | None:
    """The exported GGUF type with the smallest file among those export checked (None when none was)."""
    checked = verification(run.name).get("checked", {})
    sizes = {q: c.get("size_mb", float("inf")) for q, c in checked.items() if gguf_file(run.name, q).exists()}
    return min(sizes, key=sizes.get) if sizes else None
