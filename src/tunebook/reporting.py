"""Rendering evaluation results as text (the console, report.md, the merged model's card)."""

from __future__ import annotations

VERIFIED = "_verified"  # a pass's name with verified decoding: fine_tuned_verified, gguf_q8_0_verified


def view(entry: dict) -> dict:
    """A subset's or a shape's entry ({"n_examples", "base", "fine_tuned", "gguf_q8_0", "fine_tuned_verified" …})
    in the report's own shape: base, fine_tuned, delta, gguf and verified sections."""
    models = {k: v for k, v in entry.items() if k != "n_examples"}
    out = {"base": models.get("base", {}), "sft": models.get("sft", {}), "fine_tuned": models.get("fine_tuned", {}),
           "gguf": {k.removeprefix("gguf_"): v for k, v in models.items()
                    if k.startswith("gguf_") and not k.endswith(VERIFIED)},
           "verified": {k.removesuffix(VERIFIED): v for k, v in models.items() if k.endswith(VERIFIED)}}
    out["delta"] = {k: out["fine_tuned"][k] - out["base"][k] for k in out["fine_tuned"] if k in out["base"]}
    return out


HEADERS = {"base": "base", "sft": "SFT (parent)", "fine_tuned": "fine-tuned"}


def _header(kind: str) -> str:
    return f"GGUF {kind.removeprefix('gguf_')}" if kind.startswith("gguf_") else kind.replace("_", "-")


def columns(report: dict) -> list[tuple[str, dict]]:
    """(header, metrics) for each model a report (or one of its subsets) scored: base, fine-tuned, each verified
    pass, then each GGUF run through llama.cpp (plain, then verified)."""
    cols = [(HEADERS[k], report[k]) for k in ("base", "sft", "fine_tuned") if report.get(k)]
    verified = report.get("verified") or {}
    cols += [(f"{_header(kind)} verified", m) for kind, m in verified.items() if not kind.startswith("gguf_")]
    for qtype, metrics in (report.get("gguf") or {}).items():
        cols.append((f"GGUF {qtype}", metrics))
        if f"gguf_{qtype}" in verified:
            cols.append((f"GGUF {qtype} verified", verified[f"gguf_{qtype}"]))
    return cols


def metrics_table(report: dict) -> str:
    """Markdown table: metric | base | fine-tuned | delta | GGUF … (whichever columns the report has)."""
    cols = columns(report)
    if not cols:
        return "(no metric could be scored: see the notes)"
    with_delta = bool(report.get("base") and report.get("fine_tuned"))
    at = [name for name, _ in cols].index("fine-tuned") + 1 if with_delta else 0  # delta right after fine-tuned
    heads = [name for name, _ in cols[:at]] + (["delta"] if with_delta else []) + [name for name, _ in cols[at:]]
    lines = ["| metric | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for key in dict.fromkeys(k for _, m in cols for k in m):  # every column's metrics, not only the first's
        cells = [_cell(m.get(key), ".2f") for _, m in cols]
        if with_delta:
            delta = report["delta"].get(key)
            cells.insert(at, "–" if delta is None else f"{delta:+.2f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shape_table(report: dict) -> str:
    """Markdown table of the main metric per example shape: shape | examples | base | fine-tuned | delta | then
    each verified and GGUF column the report has."""
    metric = report["main_metric"]
    extra = [(header, kind) for header, kind in _extra_kinds(report)]
    if report.get("sft"):
        extra.insert(0, (HEADERS["sft"], "sft"))
    lines = ["| shape | examples | base | fine-tuned | delta |" + "".join(f" {h} |" for h, _ in extra),
             "|---|---:|---:|---:|---:|" + "---:|" * len(extra)]
    for shape, entry in report["by_shape"].items():
        base, tuned = entry.get("base", {}).get(metric), entry.get("fine_tuned", {}).get(metric)
        delta = f"{tuned - base:+.1f}" if base is not None and tuned is not None else "–"
        cells = [_cell(base, ".1f"), _cell(tuned, ".1f"), delta]
        cells += [_cell(entry.get(kind, {}).get(metric), ".1f") for _, kind in extra]
        lines.append(f"| {shape} | {entry['n_examples']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _extra_kinds(report: dict) -> list[tuple[str, str]]:
    """(header, result kind) of the columns after base and fine-tuned, in `columns` order."""
    verified = report.get("verified") or {}
    out = [(f"{_header(k)} verified", k + VERIFIED) for k in verified if not k.startswith("gguf_")]
    for qtype in report.get("gguf") or {}:
        out.append((f"GGUF {qtype}", f"gguf_{qtype}"))
        if f"gguf_{qtype}" in verified:
            out.append((f"GGUF {qtype} verified", f"gguf_{qtype}{VERIFIED}"))
    return out


ERROR_KINDS = (("exec_accuracy", "correct"), ("wrong_result", "wrong result"), ("unknown_table", "unknown table"),
               ("unknown_column", "unknown column"), ("syntax_error", "syntax error"), ("other_error", "other error"))


def error_table(report: dict) -> str | None:
    """What kind of answer each model gave, per subset (SQL): correct, wrong result, or why it does not run, in
    percent of the rows; `names nothing that exists` sums unknown tables and columns. None without SQL metrics."""
    entries = [("all rows", report)] + [(name, view(subset)) for name, subset in report.get("subsets", {}).items()]
    lines = []
    for name, entry in entries:
        for header, metrics in columns(entry):
            if "unknown_table" not in metrics:
                continue
            cells = [_cell(metrics.get(key), ".1f") for key, _ in ERROR_KINDS]
            cells.append(_cell(metrics["unknown_table"] + metrics["unknown_column"], ".1f"))
            lines.append(f"| {name} | {header} | " + " | ".join(cells) + " |")
    if not lines:
        return None
    head = "| rows | model | " + " | ".join(label for _, label in ERROR_KINDS) + " | names what does not exist |"
    return "\n".join([head, "|---|---|" + "---:|" * (len(ERROR_KINDS) + 1), *lines])


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)
