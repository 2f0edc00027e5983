"""Rendering evaluation results as text (the console, report.md, the merged model's card)."""

from __future__ import annotations


def columns(report: dict) -> list[tuple[str, dict]]:
    """(header, metrics) for each model a report (or one of its subsets) scored: base, fine-tuned, then each GGUF
    run through llama.cpp."""
    cols = [(k.replace("_", "-"), report[k]) for k in ("base", "fine_tuned") if report.get(k)]
    cols += [(f"GGUF {qtype}", metrics) for qtype, metrics in (report.get("gguf") or {}).items()]
    return cols


def metrics_table(report: dict) -> str:
    """Markdown table: metric | base | fine-tuned | delta | GGUF … (whichever columns the report has)."""
    cols = columns(report)
    if not cols:
        return "(no metric could be scored: see the notes)"
    with_delta = bool(report.get("base") and report.get("fine_tuned"))
    heads = [name for name, _ in cols[:2]] + (["delta"] if with_delta else []) + [name for name, _ in cols[2:]]
    lines = ["| metric | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for key in cols[0][1]:
        cells = [_cell(m.get(key), ".2f") for _, m in cols]
        if with_delta:
            delta = report["delta"].get(key)
            cells.insert(2, "–" if delta is None else f"{delta:+.2f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shape_table(report: dict) -> str:
    """Markdown table of the main metric per example shape: shape | examples | base | fine-tuned | delta | GGUF …"""
    metric = report["main_metric"]
    quants = list(report.get("gguf") or {})
    lines = ["| shape | examples | base | fine-tuned | delta |" + "".join(f" GGUF {q} |" for q in quants),
             "|---|---:|---:|---:|---:|" + "---:|" * len(quants)]
    for shape, entry in report["by_shape"].items():
        base, tuned = entry.get("base", {}).get(metric), entry.get("fine_tuned", {}).get(metric)
        delta = f"{tuned - base:+.1f}" if base is not None and tuned is not None else "–"
        cells = [_cell(base, ".1f"), _cell(tuned, ".1f"), delta]
        cells += [_cell(entry.get(f"gguf_{q}", {}).get(metric), ".1f") for q in quants]
        lines.append(f"| {shape} | {entry['n_examples']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)
