"""Rendering evaluation results as text (the console, report.md, the merged model's card)."""

from __future__ import annotations


def metrics_table(report: dict) -> str:
    """Markdown table: metric | base | fine-tuned | delta (whichever columns the report has)."""
    kinds = [k for k in ("base", "fine_tuned") if report.get(k)]
    keys = list(report[kinds[0]])
    head = "| metric | " + " | ".join(k.replace("_", "-") for k in kinds) + (" | delta |" if len(kinds) == 2 else " |")
    lines = [head, "|---|" + "---:|" * (len(kinds) + (len(kinds) == 2))]
    for key in keys:
        cells = [f"{report[k][key]:.2f}" for k in kinds]
        if len(kinds) == 2:
            cells.append(f"{report['delta'][key]:+.2f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
