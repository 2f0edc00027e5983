"""Run `tunebook` in a child process that SIGKILLs itself at a chosen point (fault injection for the tests).

    python tests/faults.py MODE STEP_OR_CALL tunebook-args...

Modes:
  train-in-save    killed while the Trainer saves checkpoint-STEP (weights written, optimizer not yet)
  train-between    killed right after step STEP ends (between checkpoints)
  eval-in-write    killed while the report is being written (its temp directory exists)
  export-convert   killed inside the Nth GGUF conversion (N = STEP_OR_CALL)
  export-swap      killed in the middle of putting the new export in place (after N renames)
  train-wait       at step STEP, touches $TUNEBOOK_FAULT_MARK and waits (up to 300 s) for $TUNEBOOK_FAULT_RELEASE
  eval-kill-after  killed after eval has kept N batches of answers (journal.py)
  eval-ctrl-c      Ctrl-C (KeyboardInterrupt) after eval has kept N batches of answers
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(mode: str, n: int) -> None:
    if mode == "train-in-save":
        from transformers import Trainer

        original = Trainer._save_optimizer_and_scheduler

        def save(self, output_dir):
            if self.state.global_step == n:
                die()
            return original(self, output_dir)

        Trainer._save_optimizer_and_scheduler = save
    elif mode == "train-between":
        import tunebook.progress

        original_step = tunebook.progress.RichProgress.on_step_end

        def step_end(self, args, state, control, **kwargs):
            if state.global_step == n:
                die()
            return original_step(self, args, state, control, **kwargs)

        tunebook.progress.RichProgress.on_step_end = step_end
    elif mode == "eval-in-write":
        import tunebook.evaluate

        tunebook.evaluate.markdown_report = lambda *args, **kwargs: die()
    elif mode == "export-convert":
        import tunebook.export

        original_convert = tunebook.export.convert
        calls = [0]

        def convert(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                die()
            return original_convert(*args, **kwargs)

        tunebook.export.convert = convert
    elif mode == "export-swap":
        import tunebook.outputs

        real_replace = os.replace
        calls = [0]

        class PatchedOs:
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def replace(src, dst):
                calls[0] += 1
                if calls[0] > n:
                    die()
                return real_replace(src, dst)

        tunebook.outputs.os = PatchedOs()
    elif mode == "train-wait":
        import tunebook.progress

        original_wait = tunebook.progress.RichProgress.on_step_end

        def wait_at(self, args, state, control, **kwargs):
            if state.global_step == n:
                Path(os.environ["TUNEBOOK_FAULT_MARK"]).touch()
                release = Path(os.environ["TUNEBOOK_FAULT_RELEASE"])
                deadline = time.monotonic() + 300
                while not release.exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
            return original_wait(self, args, state, control, **kwargs)

        tunebook.progress.RichProgress.on_step_end = wait_at
    elif mode in ("eval-kill-after", "eval-ctrl-c"):
        import tunebook.journal

        original_add = tunebook.journal.Journal.add
        kept = [0]

        def add(self, *args, **kwargs):
            original_add(self, *args, **kwargs)
            kept[0] += 1
            if kept[0] == n:
                if mode == "eval-kill-after":
                    die()
                raise KeyboardInterrupt

        tunebook.journal.Journal.add = add
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    from tunebook.cli import main

    install(sys.argv[1], int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
