"""`tunebook eval`: the test split through the base and the fine-tuned model, same prompts, side by side."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from tunebook.config import Recipe
from tunebook.data import read_jsonl
from tunebook.errors import RecipeError
from tunebook.metrics import perplexity, review_metrics, sql_metrics, text_metrics
from tunebook.models import load_model, load_tokenizer, resolve_model_path
from tunebook.prompts import encode_prompt, stop_token_ids

REPORTS_DIR = Path("reports")
MAIN_METRIC = {"sql": "exec_accuracy", "review": "rougeL", "qa": "rougeL", "summarize": "rougeL"}
N_REPORT_EXAMPLES = 5


def generate(model: Any, tokenizer: Any, examples: list[dict], system_prompt: str | None, max_new_tokens: int,
             batch_size: int, progress: Any = None) -> list[str]:
    """Greedy answers as text (special tokens dropped), in the input order."""
    ids = generate_ids(model, tokenizer, examples, system_prompt, max_new_tokens, batch_size, progress)
    return [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in ids]


def generate_ids(model: Any, tokenizer: Any, examples: list[dict], system_prompt: str | None, max_new_tokens: int,
                 batch_size: int, progress: Any = None) -> list[list[int]]:
    """Greedy answer token ids, batched with left padding and the KV cache, up to the trained end-of-turn token.

    Prompts are sorted by length so each batch pads little; answers come back in the input order.
    """
    import torch

    device = next(model.parameters()).device
    prompts = [encode_prompt(tokenizer, ex, system_prompt) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stops = stop_token_ids(tokenizer, system_prompt)
    outputs: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, use_cache=True, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                temperature=None, top_p=None, top_k=None,
            )
        for row, i in enumerate(idx):
            tokens = out[row, width:].tolist()
            cut = next((n for n, t in enumerate(tokens) if t in stops), None)  # drop the stop and padding after it
            outputs[i] = tokens if cut is None else tokens[: cut + 1]
        if progress is not None:
            progress(len(idx))
    return outputs


def db_path_for(row: dict, data_file: Path) -> Path:
    """A row's SQLite file: its `db_path` (relative to the data file) or databases/<db_id>.sqlite beside it."""
    if row.get("db_path"):
        path = Path(row["db_path"])
        return path if path.is_absolute() else data_file.parent / path
    return data_file.parent / "databases" / f"{row['db_id']}.sqlite"


def task_metrics(task: str, predictions: list[str], rows: list[dict], data_file: Path) -> dict[str, float]:
    references = [r["output"] for r in rows]
    if task == "sql":
        return sql_metrics(predictions, references, [db_path_for(r, data_file) for r in rows])
    scores = text_metrics(predictions, references)
    if task == "review":
        scores.update(review_metrics(predictions, references, [r.get("input", "") for r in rows],
                                     [r.get("rule") for r in rows]))
    return scores


def load_eval_rows(recipe: Recipe, data: str | None) -> tuple[list[dict], Path]:
    data_file = Path(data or recipe.data.test)
    field = "--data" if data else "data.test"
    rows = read_jsonl(data_file, recipe.source, field)
    if recipe.eval.limit:
        rows = rows[: recipe.eval.limit]
    if recipe.task == "sql":
        for number, row in enumerate(rows, start=1):
            if not row.get("db_id") and not row.get("db_path"):
                raise RecipeError(str(data_file), f"example {number}", "has neither 'db_id' nor 'db_path'.",
                                  "SQL examples need the database to execute against.")
            if not db_path_for(row, data_file).exists():
                raise RecipeError(str(data_file), f"example {number}", f"database {db_path_for(row, data_file)} "
                                  "does not exist.", "Run `make data` or fix db_path.")
    return rows, data_file


def train_db_ids(recipe: Recipe) -> set[str]:
    try:
        return {r.get("db_id") for r in read_jsonl(recipe.data.train, recipe.source, "data.train")}
    except RecipeError:
        return set()


def evaluate(recipe: Recipe, which: str = "both", data: str | None = None, adapter_dir: Path | None = None) -> Path:
    """Run the evaluation and write reports/<recipe>/ (report.json, report.md, chart.png, predictions.jsonl)."""
    from peft import PeftModel
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tunebook.train import fine_tuned_dir

    rows, data_file = load_eval_rows(recipe, data)
    adapter_dir = adapter_dir or fine_tuned_dir(recipe)
    if which in ("fine_tuned", "both") and not (adapter_dir / "adapter_config.json").exists():
        raise RecipeError(recipe.source, None, f"no trained adapter in {adapter_dir}.",
                          f"Run `tunebook train {recipe.name}` first, or use --model base.")
    model_path = resolve_model_path(recipe.model.name)
    tokenizer = load_tokenizer(str(adapter_dir) if which != "base" else model_path, recipe.model.trust_remote_code)
    tokenizer.padding_side = "left"
    model = load_model(model_path, recipe.model, for_training=False)
    if which != "base":
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()

    system = recipe.data.system_prompt
    kinds = ["base", "fine_tuned"] if which == "both" else [which]
    results: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        # The base model is the same weights with the adapter switched off: one load, identical prompts.
        context = model.disable_adapter() if kind == "base" and which != "base" else contextlib.nullcontext()
        with context, Progress(TextColumn(f"[bold]{kind}"), BarColumn(), MofNCompleteColumn(),
                               TextColumn("{task.fields[rate]}"), TimeElapsedColumn()) as bar:
            task_id = bar.add_task(kind, total=len(rows), rate="")
            started = time.perf_counter()
            done = [0]

            def advance(n: int, task_id=task_id, started=started, done=done, bar=bar) -> None:
                done[0] += n
                bar.update(task_id, advance=n, rate=f"{done[0] / (time.perf_counter() - started):.2f} ex/s")

            preds = generate(model, tokenizer, rows, system, recipe.eval.max_new_tokens, recipe.eval.batch_size, advance)
            seconds = time.perf_counter() - started
            metrics = task_metrics(recipe.task, preds, rows, data_file)
            metrics["perplexity"] = perplexity(model, tokenizer, rows, system, batch_size=recipe.eval.batch_size)
        results[kind] = {"predictions": preds, "metrics": metrics, "examples_per_s": len(rows) / seconds}

    subsets = {}
    if recipe.task == "sql":
        seen = train_db_ids(recipe)
        unseen = [i for i, r in enumerate(rows) if r.get("db_id") not in seen]
        if unseen and len(unseen) < len(rows):
            subsets["unseen_schema"] = {"n_examples": len(unseen), **{
                kind: task_metrics("sql", [r["predictions"][i] for i in unseen], [rows[i] for i in unseen], data_file)
                for kind, r in results.items()}}
    return write_report(recipe, rows, results, subsets, data_file)


def write_report(recipe: Recipe, rows: list[dict], results: dict[str, dict], subsets: dict, data_file: Path) -> Path:
    """Write the report directory atomically and return it."""
    from tunebook.train import replace_dir

    final = REPORTS_DIR / recipe.name
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    base = results.get("base", {}).get("metrics", {})
    tuned = results.get("fine_tuned", {}).get("metrics", {})
    report = {
        "recipe": recipe.name,
        "task": recipe.task,
        "data": str(data_file),
        "n_examples": len(rows),
        "main_metric": MAIN_METRIC[recipe.task],
        "base": base,
        "fine_tuned": tuned,
        "delta": {k: tuned[k] - base[k] for k in tuned if k in base},
        "subsets": subsets,
        "timing": {kind: {"examples_per_s": round(r["examples_per_s"], 3)} for kind, r in results.items()},
        "examples": [
            {"prompt": _user_turn(rows[i]), "reference": rows[i]["output"],
             **{kind: results[kind]["predictions"][i] for kind in results}}
            for i in range(min(N_REPORT_EXAMPLES, len(rows)))
        ],
    }
    (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    with (tmp / "predictions.jsonl").open("w", encoding="utf-8") as handle:
        for i, row in enumerate(rows):
            record = {**row, **{f"{kind}_prediction": r["predictions"][i] for kind, r in results.items()}}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    (tmp / "report.md").write_text(markdown_report(report))
    if base and tuned:
        chart(report, tmp / "chart.png")
    replace_dir(tmp, final)
    return final


def _user_turn(row: dict) -> str:
    from tunebook.prompts import user_message

    return user_message(row)


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


def markdown_report(report: dict) -> str:
    parts = [
        f"# {report['recipe']}: base vs fine-tuned",
        "",
        f"Task `{report['task']}`, {report['n_examples']} examples from `{report['data']}`. "
        "Rates and text scores in percent; perplexity of the reference answers (lower is better).",
        "",
        metrics_table(report),
        "",
    ]
    for name, subset in report["subsets"].items():
        sub = {"base": subset.get("base", {}), "fine_tuned": subset.get("fine_tuned", {})}
        sub["delta"] = {k: sub["fine_tuned"][k] - sub["base"][k] for k in sub["fine_tuned"] if k in sub["base"]}
        parts += [f"## Subset: {name} ({subset['n_examples']} examples)", "", metrics_table(sub), ""]
    parts += ["## Speed", ""]
    parts += [f"- {kind}: {t['examples_per_s']:.2f} examples/s" for kind, t in report["timing"].items()]
    parts += ["", "## Examples", ""]
    for i, ex in enumerate(report["examples"], start=1):
        parts += [f"### {i}", "", "```text", ex["prompt"], "```", "", f"- reference: `{ex['reference']}`"]
        parts += [f"- {kind}: `{ex[kind]}`" for kind in ("base", "fine_tuned") if kind in ex]
        parts.append("")
    return "\n".join(parts)


def chart(report: dict, path: Path) -> None:
    """Grouped bars, base vs fine-tuned, per metric (perplexity on its own axis: lower is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in report["fine_tuned"] if k != "perplexity"]
    fig, (ax, ax_ppl) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [max(len(keys), 1), 1]})
    xs = range(len(keys))
    ax.bar([x - 0.2 for x in xs], [report["base"][k] for k in keys], 0.4, label="base")
    ax.bar([x + 0.2 for x in xs], [report["fine_tuned"][k] for k in keys], 0.4, label="fine-tuned")
    ax.set_xticks(list(xs), keys, rotation=20)
    ax.set_ylabel("percent")
    ax.legend()
    ax.set_title(f"{report['recipe']} ({report['n_examples']} examples)")
    ax_ppl.bar(["base", "fine-tuned"], [report["base"]["perplexity"], report["fine_tuned"]["perplexity"]],
               color=["C0", "C1"])
    ax_ppl.set_title("perplexity (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
