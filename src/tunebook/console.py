"""What the console shows: tunebook's own progress and results. Library output goes to a log file.

Libraries talk a lot (bitsandbytes' kernel probes, transformers' deprecation warnings and weight-loading
bars, llama.cpp's per-tensor quantizer log). `setup_console` sends Python logging, warnings and progress bars
of the libraries to `logs/<recipe>/<command>.log`; `-v` shows them on the console as well. Output that C code
writes straight to the stderr file descriptor is captured by `native_output_to_log` around the calls that make it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

_state: dict[str, Path | bool | None] = {"log": None, "verbose": False}


def setup_console(log_path: Path | None, verbose: bool) -> None:
    """Route library logging and warnings to `log_path` (and to stderr when `verbose`). Call before importing
    the ML libraries: some of them log while they are imported."""
    _state.update(log=log_path, verbose=verbose)
    if not verbose:
        # Read by huggingface_hub, transformers and datasets when they are imported.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        # Every other library's tqdm bar (e.g. TRL's "Computing reference log probs"); tunebook's bars are rich's.
        # tqdm reads it when it is imported.
        os.environ.setdefault("TQDM_DISABLE", "1")
        if not Path("/proc/driver/nvidia/version").exists():
            # Without it DeepSpeed, which transformers imports when installed, warns on stdout at every import
            # that it is "Setting accelerator to CPU".
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # Append-only, never truncated: two commands of one recipe at once keep both logs (and C-level output
        # written beside the handler survives). Each command opens with a header line.
        from tunebook.config import redacted_overrides

        with log_path.open("a", encoding="utf-8") as handle:
            handle.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: tunebook "
                         f"{' '.join(redacted_overrides(sys.argv[1:]))}\n")
        handler = logging.FileHandler(log_path, mode="a", encoding="utf-8")
        handler.setFormatter(formatter)
        root.addHandler(handler)
    if verbose or log_path is None:
        stream = logging.StreamHandler(sys.stderr)
        stream.setLevel(logging.INFO if verbose else logging.WARNING)
        stream.setFormatter(formatter)
        root.addHandler(stream)
    logging.captureWarnings(True)
    # tunebook's own loggers speak through print(); libraries' loggers at INFO would flood the file.
    for name in ("transformers", "datasets", "huggingface_hub", "accelerate", "peft", "trl", "bitsandbytes",
                 "torch", "urllib3", "filelock", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    route_transformers_logging()


def route_transformers_logging() -> None:
    """transformers keeps its own stderr handler and does not propagate; make it use ours."""
    if "transformers" not in sys.modules and importlib_find("transformers") is None:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.set_verbosity(logging.INFO if _state["verbose"] else logging.WARNING)
    if not _state["verbose"]:
        hf_logging.disable_progress_bar()


def importlib_find(name: str):
    import importlib.util

    return importlib.util.find_spec(name)


def log_path() -> Path | None:
    """The current command's library log, if any."""
    value = _state["log"]
    return value if isinstance(value, Path) else None


@contextlib.contextmanager
def native_output_to_log() -> Iterator[None]:
    """Send what C code writes to the stderr/stdout descriptors into the log file (nothing changes with -v)."""
    path = log_path()
    if path is None or _state["verbose"]:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("a", encoding="utf-8") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
