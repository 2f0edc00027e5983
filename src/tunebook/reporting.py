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


def shape_table(report: dict) -> str:
    """Markdown table of the main metric per example shape: shape | examples | base | fine-tuned | delta."""
    metric = report["main_metric"]
    lines = ["| shape | examples | base | fine-tuned | delta |", "|---|---:|---:|---:|---:|"]
    for shape, entry in report["by_shape"].items():
        base, tuned = entry.get("base", {}).get(metric), entry.get("fine_tuned", {}).get(metric)
        cells = [f"{v:.1f}" if v is not None else "–" for v in (base, tuned)]
        delta = f"{tuned - base:+.1f}" if base is not None and tuned is not None else "–"
        lines.append(f"| {shape} | {entry['n_examples']} | {cells[0]} | {cells[1]} | {delta} |")
    return "\n".join(lines)
