"""Where every output lives, and how it gets there whole.

Every command writes into a hidden temp directory beside its final place and renames it into place only when
it is complete, so a crash or a kill leaves the previous output untouched. Temp directories carry the writer's
pid; the next run removes those whose writer is gone (and says so).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

MODELS_DIR = Path("models")
REPORTS_DIR = Path("reports")
LOGS_DIR = Path("logs")

# The files a trained run leaves in its adapter directory (`fine_tuned_dir`).
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RUN_INFO_FILE = "run_info.json"


def base_dir(model_name: str) -> Path:
    return MODELS_DIR / "base" / model_name


def fine_tuned_dir(recipe_name: str) -> Path:
    return MODELS_DIR / "fine-tuned" / recipe_name


def checkpoints_dir(recipe_name: str) -> Path:
    return MODELS_DIR / "checkpoints" / recipe_name


def merged_dir(recipe_name: str) -> Path:
    return MODELS_DIR / "merged" / recipe_name


def gguf_dir(recipe_name: str) -> Path:
    return MODELS_DIR / "gguf" / recipe_name


def gguf_file(run_name: str, qtype: str) -> Path:
    """One exported GGUF file: models/gguf/<run>/<run>-<type>.gguf."""
    return gguf_dir(run_name) / f"{run_name}-{qtype}.gguf"


def adapter_gguf_file(run_name: str) -> Path:
    """The run's LoRA adapter alone as GGUF (llama.cpp applies it to the base GGUF at load time)."""
    return gguf_dir(run_name) / f"{run_name}.adapter-f16.gguf"


def verify_file(run_name: str) -> Path:
    """What export checked, and from which adapter: models/gguf/<run>/verify.json."""
    return gguf_dir(run_name) / "verify.json"


def modelfile_path(run_name: str, adapter: bool = False) -> Path:
    """The Ollama Modelfile over the merged GGUF (`Modelfile`) or over base + adapter (`Modelfile.adapter`)."""
    return gguf_dir(run_name) / ("Modelfile.adapter" if adapter else "Modelfile")


def base_gguf_file(model_name: str, qtype: str) -> Path:
    """The base model as GGUF, shared by every run of that base: models/gguf-base/<model>-<type>.gguf."""
    return MODELS_DIR / "gguf-base" / f"{model_name.strip('/').replace('/', '--')}-{qtype}.gguf"


def report_dir(recipe_name: str) -> Path:
    return REPORTS_DIR / recipe_name


def lock_file(run_name: str) -> Path:
    """The lock a command holds while it writes a run's outputs (see runs.run_lock)."""
    return MODELS_DIR / ".locks" / f"{run_name}.lock"


def pairs_file(run_name: str) -> Path:
    """The preference pairs a DPO stage made from its parent's answers (pairs.py)."""
    return MODELS_DIR / "pairs" / f"{run_name}.jsonl"


def samples_file(run_name: str) -> Path:
    """The parent's sampled answers a DPO stage judged into pairs (pairs.py), kept to re-judge without sampling."""
    return MODELS_DIR / "pairs" / f"{run_name}.samples.jsonl"


def greedy_file(run_name: str) -> Path:
    """The parent's greedy answers to the same prompts (`stage.rejected: greedy`, pairs.py)."""
    return MODELS_DIR / "pairs" / f"{run_name}.greedy.jsonl"


def eval_journal(report_name: str, kind: str) -> Path:
    """The answers an eval pass has generated so far (journal.py), until its report is written."""
    return REPORTS_DIR / ".journal" / report_name / f"{kind}.jsonl"


def kept_pass_file(key: str) -> Path:
    """A finished pass of the base model (or of a stage's parent adapter), kept for any later eval with the same
    model, rows, settings and machine (evaluate.py: reused across runs, seeds and stages)."""
    return REPORTS_DIR / ".kept-passes" / f"{key[:40]}.json"


def demo_times_file(run_name: str) -> Path:
    """Wall time of each stage of the last `tunebook demo` of a run (read by `tunebook bench`). The dot in the
    name keeps it apart from every report folder: recipe and run names have none."""
    return REPORTS_DIR / f"{run_name}.demo-times.json"


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file whole or not at all (a temp file beside it, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    tmp.write_text(text)
    tmp.replace(path)


def log_file(recipe_name: str, command: str) -> Path:
    return LOGS_DIR / recipe_name / f"{command}.log"


# ---------------------------------------------------------------- atomic directories


def temp_sibling(final: Path, kind: str = "tmp") -> Path:
    """A hidden name beside `final` that carries this process's pid: `.name.tmp-1234`."""
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temp directory; on success it replaces `final`, on any error it is removed."""
    tmp = temp_sibling(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in_together([(tmp, final)])


def swap_in_together(pairs: list[tuple[Path, Path]]) -> None:
    """Move finished temp directories (each a sibling of its final path) onto their final paths as one unit.

    The old outputs are first moved into one hidden `.old` directory (a single rename to discard later), the
    new ones are renamed into place, then the `.old` directory is removed. A kill inside this short window
    leaves the `.old` directory behind, and `clean_leftovers` puts the old outputs back; an error inside it
    puts them back at once. A reader never sees new merged weights beside old GGUF files.
    """
    first_final = pairs[0][1]
    old = temp_sibling(first_final, "old")
    shutil.rmtree(old, ignore_errors=True)
    old.mkdir(parents=True)
    # The manifest is complete on disk before anything moves, so a kill at any point can be undone.
    manifest = old / "MANIFEST.tmp"
    with manifest.open("w", encoding="utf-8") as handle:
        handle.write("".join(f"{i}\t{int(final.exists())}\t{final.absolute()}\n" for i, (_, final) in enumerate(pairs)))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(manifest, old / "MANIFEST")
    try:
        for index, (_, final) in enumerate(pairs):
            if final.exists():
                os.replace(final, old / str(index))
        for tmp, final in pairs:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
    except BaseException:
        restore_old(old)
        raise
    trash = temp_sibling(first_final, "trash")
    os.replace(old, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


LEFTOVER_KINDS = ("tmp", "old", "trash")


def clean_leftovers(*finals: Path) -> list[str]:
    """Remove temp directories that killed runs left beside these outputs; undo a half-finished swap.

    Returns one line per thing done, for the console. Directories of a writer that is still running are left
    alone, and so are names that only start like ours (`.sql.v2.tmp-1` belongs to recipe `sql.v2`).
    """
    notes = []
    for final in finals:
        parent = final.parent
        if not parent.is_dir():
            continue
        pattern = re.compile(rf"\.{re.escape(final.name)}\.({'|'.join(LEFTOVER_KINDS)})-(\d+)")
        for path in sorted(parent.iterdir()):
            match = pattern.fullmatch(path.name)
            if match is None or _pid_alive(int(match.group(2))):
                continue
            if match.group(1) == "old" and (path / "MANIFEST").exists():
                restore_old(path)
                notes.append(f"restored the previous outputs from an interrupted swap ({path})")
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            notes.append(f"removed {path} left by an interrupted run")
    return notes


def restore_old(old: Path) -> None:
    """Undo a killed or failed `swap_in_together`: previous outputs go back, new ones without a predecessor go.

    Saved outputs are never deleted: `old` is removed only once nothing numbered is left in it.
    """
    for line in (old / "MANIFEST").read_text(encoding="utf-8").splitlines():
        parts = line.split("\t", 2)
        if len(parts) != 3 or not parts[0].isdigit():
            continue
        index, existed, final = parts
        final_path, saved = Path(final), old / index
        if existed == "1" and not saved.exists():
            continue  # never moved aside: the final path still holds the previous output
        if final_path.exists():
            shutil.rmtree(final_path)
        if saved.exists():
            os.replace(saved, final_path)
    if not any(p.name.isdigit() for p in old.iterdir()):
        shutil.rmtree(old, ignore_errors=True)


def is_main_process() -> bool:
    """Rank 0 under `accelerate launch` (or a plain run): the one process that moves files and talks."""
    return int(os.environ.get("RANK", "0")) == 0


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")
