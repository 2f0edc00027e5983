"""Rich progress bars: the Trainer's (steps, loss; replaces tqdm and the plain log printer) and one for work
counted in examples (eval passes, DPO pair sampling)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import TrainerCallback


def progress_bar(label: str) -> Any:
    """A bar for work counted in examples: label, bar, done/total, rate, elapsed."""
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                    TimeElapsedColumn())


def rate_updater(bar: Any, task_id: Any, started: float) -> Any:
    """A progress callback that advances the bar and shows examples/s."""
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        bar.update(task_id, advance=n, rate=f"{done[0] / (time.perf_counter() - started):.2f} ex/s")

    return advance


class RichProgress(TrainerCallback):
    """Shows steps, loss and learning rate; prints each log line above the bar on the main process."""

    def __init__(self) -> None:
        self.console = Console()
        self.progress: Progress | None = None
        self.task: Any = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        shown = {k: v for k, v in logs.items() if k in ("loss", "eval_loss", "learning_rate", "grad_norm")}
        if not shown:
            return
        text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        self.console.print(f"step {state.global_step}: {text}")
        if self.progress is not None and "loss" in shown:
            self.progress.update(self.task, info=f"loss {shown['loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
