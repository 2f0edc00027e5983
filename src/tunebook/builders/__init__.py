"""Dataset builders, one module per dataset; `build_task` runs one and refreshes its card."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

CARDS_DIR = Path("datasets_cards")


def build_task(task: str, data_root: Path, sources: Path, seed: int = 42) -> dict[str, Any]:
    """Build data/<task>/{train,val,test}.jsonl deterministically and update datasets_cards/<task>.md."""
    from tunebook.builders.cards import update_card
    from tunebook.tasks import dataset_builders, load_hook

    builders = dataset_builders()
    if task not in builders:
        raise RuntimeError(f"no builder for dataset '{task}' (known: {', '.join(builders)})")
    builder = load_hook(builders[task])
    out = data_root / task
    extra = {"sources": sources} if "sources" in inspect.signature(builder).parameters else {}
    stats = builder(out, seed=seed, **extra)
    update_card(CARDS_DIR / f"{task}.md", out, stats)
    return stats
