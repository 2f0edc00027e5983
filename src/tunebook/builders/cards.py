"""Keep the measured facts of a dataset card (sizes, checksums) in step with the files `make data` built."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunebook.data import sha256

BEGIN = "<!-- built:begin (written by `make data`; do not edit by hand) -->"
END = "<!-- built:end -->"


def update_card(card: Path, data_dir: Path, stats: dict[str, Any]) -> None:
    """Rewrite the block between the markers with split sizes, checksums and builder statistics."""
    lines = [BEGIN, "", "| split | examples | sha256 |", "|---|---:|---|"]
    for split in ("train", "val", "test"):
        path = data_dir / f"{split}.jsonl"
        count = sum(1 for line in path.open(encoding="utf-8") if line.strip())
        lines.append(f"| {split} | {count} | `{sha256(path)}` |")
    lines += ["", "Builder statistics:", "", "```json", json.dumps(stats, indent=2, sort_keys=True), "```", "", END]
    text = card.read_text() if card.exists() else f"# {data_dir.name}\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    card.write_text(head + "\n".join(lines) + tail)
