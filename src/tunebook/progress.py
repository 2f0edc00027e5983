"""A rich progress bar and loss log for the Trainer (replaces tqdm and the plain log printer)."""

from __future__ import annotations

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
