"""`tunebook eval`: the test split through the base and the fine-tuned model, same prompts, side by side."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from tunebook.config import Recipe
from tunebook.data import read_split, select_rows
from tunebook.errors import RecipeError
from tunebook.generation import decode_answers, generate
from tunebook.metrics import db_path_for, perplexity, run_sql, score
from tunebook.models import load_model, load_tokenizer, resolve_model_path
from tunebook.outputs import atomic_dir, clean_leftovers, fine_tuned_dir, gguf_dir, report_dir
from tunebook.prompts import reference_answer, user_message
from tunebook.reporting import metrics_table, shape_table
from tunebook.validate import check_adapter, check_metric_rows, validate_recipe

N_REPORT_EXAMPLES = 5


def task_metrics(recipe: Recipe, predictions: list[str], rows: list[dict], data_file: Path) -> dict[str, float]:
    """The recipe's `eval.metrics` on these predictions (perplexity, which needs the model, apart)."""
    return score(recipe.eval.metrics, predictions, rows, data_file)


def load_eval_rows(recipe: Recipe, data: str | None) -> tuple[list[dict], Path]:
    data_file = Path(data or recipe.data.test)
    field = "--data" if data else "data.test"
    rows = read_split(data_file, recipe.source, field)
    if recipe.eval.where:
        rows = select_rows(rows, recipe.eval.where, data_file, recipe.source, "eval.where")
    if recipe.eval.limit:
        rows = rows[: recipe.eval.limit]
    check_metric_rows(recipe, rows, data_file, located=not recipe.eval.where)
    if "sql_execution" in recipe.eval.metrics:
        for number, row in enumerate(rows, start=1):
            db_path = db_path_for(row, data_file)
            if not db_path.exists():
                raise RecipeError(str(data_file), f"example {number}", f"database {db_path} "
                                  "does not exist.", "Run `make data` or fix db_path.")
            # A gold query that fails would make the example unscoreable: found now, not after generation.
            _, error = run_sql(db_path, reference_answer(row))
            if error is not None:
                raise RecipeError(str(data_file), f"example {number}: field 'output'",
                                  f"the gold SQL fails on {db_path.name} ({error}).",
                                  "Fix the query or the database, or remove the example.")
    return rows, data_file


def train_db_ids(recipe: Recipe) -> set[str]:
    """The databases the recipe trained on (after `data.where`)."""
    try:
        rows = read_split(recipe.data.train, recipe.source, "data.train")
        if recipe.data.where:
            rows = select_rows(rows, recipe.data.where, recipe.data.train, recipe.source)
    except RecipeError:
        return set()
    return {r.get("db_id") for r in rows}


def gguf_files(recipe: Recipe, types: list[str], adapter_dir: Path) -> dict[str, Path]:
    """The exported GGUF file of each type, checked to exist, to be newer than the adapter, and to be runnable."""
    import importlib.util

    files = {}
    for qtype in types:
        path = gguf_dir(recipe.name) / f"{recipe.name}-{qtype}.gguf"
        if not path.exists():
            raise RecipeError(recipe.source, "--gguf", f"{path} does not exist.",
                              f"Run `tunebook export {recipe.name}` first (it writes export.gguf: "
                              f"{', '.join(recipe.export.gguf)}), or name only exported types.")
        adapter = adapter_dir / "adapter_model.safetensors"
        if adapter.exists() and adapter.stat().st_mtime > path.stat().st_mtime:
            raise RecipeError(recipe.source, "--gguf", f"{path.name} is older than the adapter in {adapter_dir}, "
                              "so it would score an earlier training run.", f"Run `tunebook export {recipe.name}`.")
        files[qtype] = path
    if files and importlib.util.find_spec("llama_cpp") is None:
        raise RecipeError(recipe.source, "--gguf", "llama-cpp-python is not installed.",
                          "Run `make export` once (it builds llama-cpp-python into the venv).")
    return files


def evaluate(recipe: Recipe, which: str = "both", data: str | None = None, adapter_dir: Path | None = None,
             gguf: list[str] | None = None) -> Path:
    """Run the evaluation and write reports/<recipe>/ (report.json, report.md, chart.png, predictions.jsonl).

    `gguf` names exported GGUF types (e.g. q8_0, q4_k_m) to run through llama.cpp on the same rows with the same
    prompt tokens and stop tokens, greedy: the report gains a column for each, so it shows what quantisation kept.
    """
    validate_recipe(recipe)
    rows, data_file = load_eval_rows(recipe, data)
    adapter_dir = adapter_dir or fine_tuned_dir(recipe.name)
    if which in ("fine_tuned", "both"):
        check_adapter(adapter_dir, recipe)
    ggufs = gguf_files(recipe, gguf or [], adapter_dir)
    for note in clean_leftovers(report_dir(recipe.name)):
        print(note)
    kinds = ["base", "fine_tuned"] if which == "both" else [which]
    key = eval_key(recipe, rows, kinds, adapter_dir)
    model_path = resolve_model_path(recipe.model.name)
    tokenizer = load_tokenizer(str(adapter_dir) if which != "base" else model_path, recipe.model.trust_remote_code)
    results = previous_results(recipe, rows, kinds, key) if ggufs else None
    if results:
        print(f"{' and '.join(kinds)}: reusing {report_dir(recipe.name)} (same rows, prompts, settings and adapter)")
    else:
        results = hf_passes(recipe, kinds, rows, data_file, tokenizer, adapter_dir)
    for qtype, path in ggufs.items():
        results[f"gguf_{qtype}"] = run_gguf(recipe, path, tokenizer, rows, data_file)

    subsets = schema_subsets(recipe, rows, results, data_file)
    by_shape = {shape: score_subset(recipe, idx, rows, results, data_file)
                for shape, idx in sorted(group_indices(rows, "shape").items())}
    return write_report(recipe, rows, results, subsets, data_file, by_shape, key)


def hf_passes(recipe: Recipe, kinds: list[str], rows: list[dict], data_file: Path, tokenizer: Any,
              adapter_dir: Path) -> dict[str, dict[str, Any]]:
    """Base and/or fine-tuned generation with transformers: predictions, metrics (with perplexity), examples/s."""
    from peft import PeftModel

    tokenizer.padding_side = "left"
    model = load_model(resolve_model_path(recipe.model.name), recipe.model, for_training=False)
    if kinds != ["base"]:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    system = recipe.data.system_prompt
    results: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        # The base model is the same weights with the adapter switched off: one load, identical prompts.
        context = model.disable_adapter() if kind == "base" and kinds != ["base"] else contextlib.nullcontext()
        if kind == "fine_tuned" and recipe.model.quantization == "none":
            # Generation with the adapter folded into the weights skips two extra small matmuls per LoRA layer and
            # token; the base pass, which needs it unmerged, has already run. (Merging into 4/8-bit weights would
            # requantise them, so QLoRA recipes keep the adapter separate.)
            model.merge_adapter()
        with context, progress_bar(kind) as bar:
            task_id = bar.add_task(kind, total=len(rows), rate="")
            started = time.perf_counter()
            preds = generate(model, tokenizer, rows, system, recipe.eval.max_new_tokens, recipe.eval.batch_size,
                             rate_updater(bar, task_id, started))
            seconds = time.perf_counter() - started
            metrics = task_metrics(recipe, preds, rows, data_file)
            if "perplexity" in recipe.eval.metrics:
                metrics["perplexity"] = perplexity(model, tokenizer, rows, system, batch_size=recipe.eval.batch_size)
        results[kind] = {"predictions": preds, "metrics": metrics, "examples_per_s": len(rows) / seconds}
    return results


def progress_bar(label: str) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                    TimeElapsedColumn())


def rate_updater(bar: Any, task_id: Any, started: float) -> Any:
    """A progress callback that advances the bar and shows examples/s."""
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        bar.update(task_id, advance=n, rate=f"{done[0] / (time.perf_counter() - started):.2f} ex/s")

    return advance


def eval_key(recipe: Recipe, rows: list[dict], kinds: list[str], adapter_dir: Path) -> str:
    """What the transformers passes' results depend on: rows, prompt, generation settings, model and adapter."""
    import hashlib

    digest = hashlib.sha256(json.dumps([rows, kinds, recipe.data.system_prompt, recipe.eval.max_new_tokens,
                                        recipe.eval.metrics,
                                        recipe.model.name, recipe.model.dtype, recipe.model.quantization],
                                       sort_keys=True, default=str).encode())
    adapter = adapter_dir / "adapter_model.safetensors"
    if "fine_tuned" in kinds and adapter.exists():
        digest.update(adapter.read_bytes())
    return digest.hexdigest()


def previous_results(recipe: Recipe, rows: list[dict], kinds: list[str], key: str) -> dict[str, dict] | None:
    """The transformers passes of the current report, when it was made with the same `eval_key` (so `eval --gguf`
    after `eval` adds the GGUF columns without generating everything again); None otherwise."""
    folder = report_dir(recipe.name)
    try:
        report = json.loads((folder / "report.json").read_text())
        saved = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return None
    if report.get("eval_key") != key or len(saved) != len(rows):
        return None
    return {kind: {"predictions": [r[f"{kind}_prediction"] for r in saved], "metrics": report[kind],
                   "examples_per_s": report["timing"][kind]["examples_per_s"]} for kind in kinds}


def run_gguf(recipe: Recipe, path: Path, tokenizer: Any, rows: list[dict], data_file: Path) -> dict:
    """One exported GGUF through llama.cpp on the eval rows: the prompt tokens and stop tokens of the HF passes."""
    from tunebook import llamacpp
    from tunebook.prompts import encode_prompt, stop_token_ids

    system = recipe.data.system_prompt
    prompts = [encode_prompt(tokenizer, row, system) for row in rows]
    longest = max(len(p) for p in prompts) + recipe.eval.max_new_tokens
    llm = llamacpp.load_gguf(path, n_ctx=max(longest, 2 * recipe.data.max_length))
    with progress_bar(f"GGUF {path.stem.rsplit('-', 1)[-1]}") as bar:
        task_id = bar.add_task(path.name, total=len(rows), rate="")
        started = time.perf_counter()
        ids = llamacpp.generate_ids(llm, prompts, stop_token_ids(tokenizer, system), recipe.eval.max_new_tokens,
                                    rate_updater(bar, task_id, started))
        seconds = time.perf_counter() - started
    del llm
    preds = decode_answers(tokenizer, ids)
    return {"predictions": preds, "metrics": task_metrics(recipe, preds, rows, data_file),
            "examples_per_s": len(rows) / seconds}


def group_indices(rows: list[dict], key: str) -> dict[str, list[int]]:
    """Row positions by the value of one field (rows without it are left out)."""
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if row.get(key):
            groups.setdefault(str(row[key]), []).append(i)
    return groups


def schema_subsets(recipe: Recipe, rows: list[dict], results: dict[str, dict], data_file: Path) -> dict[str, dict]:
    """For rows that name their database (`db_id`): those whose database was never seen in training, and among
    them the real (Spider) schemas, scored on their own."""
    if not any(r.get("db_id") for r in rows):
        return {}
    seen = train_db_ids(recipe)
    unseen = [i for i, r in enumerate(rows) if r.get("db_id") not in seen]
    groups = {}
    if unseen and len(unseen) < len(rows):
        groups["unseen_schema"] = unseen
    real = [i for i in unseen if rows[i].get("source") == "spider"]
    if real:
        groups["unseen_real_schema"] = real
    return {name: score_subset(recipe, idx, rows, results, data_file) for name, idx in groups.items()}


def score_subset(recipe: Recipe, indices: list[int], rows: list[dict], results: dict[str, dict],
                 data_file: Path) -> dict:
    """The recipe's metrics on some rows, for every model evaluated, with the row count."""
    return {"n_examples": len(indices), **{
        kind: task_metrics(recipe, [r["predictions"][i] for i in indices], [rows[i] for i in indices], data_file)
        for kind, r in results.items()}}


def write_report(recipe: Recipe, rows: list[dict], results: dict[str, dict], subsets: dict, data_file: Path,
                 by_shape: dict | None = None, key: str | None = None) -> Path:
    """Write the report directory atomically and return it."""
    final = report_dir(recipe.name)
    with atomic_dir(final) as tmp:
        write_report_files(tmp, recipe, rows, results, subsets, data_file, by_shape or {}, key)
    return final


def write_report_files(tmp: Path, recipe: Recipe, rows: list[dict], results: dict[str, dict], subsets: dict,
                       data_file: Path, by_shape: dict, key: str | None = None) -> None:
    base = results.get("base", {}).get("metrics", {})
    tuned = results.get("fine_tuned", {}).get("metrics", {})
    report = {
        "recipe": recipe.name,
        "task": recipe.task,
        "data": str(data_file),
        "n_examples": len(rows),
        "main_metric": recipe.eval.main_metric,
        "metrics": recipe.eval.metrics,
        "base": base,
        "fine_tuned": tuned,
        "delta": {k: tuned[k] - base[k] for k in tuned if k in base},
        "gguf": {kind.removeprefix("gguf_"): r["metrics"] for kind, r in results.items() if kind.startswith("gguf_")},
        "subsets": subsets,
        "by_shape": by_shape,
        "timing": {kind: {"examples_per_s": round(r["examples_per_s"], 3)} for kind, r in results.items()},
        "eval_key": key,
        "examples": [
            {"prompt": user_message(rows[i]), "reference": reference_answer(rows[i]),
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
        sub = {"base": subset.get("base", {}), "fine_tuned": subset.get("fine_tuned", {}),
               "gguf": {k.removeprefix("gguf_"): v for k, v in subset.items() if k.startswith("gguf_")}}
        sub["delta"] = {k: sub["fine_tuned"][k] - sub["base"][k] for k in sub["fine_tuned"] if k in sub["base"]}
        parts += [f"## Subset: {name} ({subset['n_examples']} examples)", "", metrics_table(sub), ""]
    if report.get("by_shape"):
        parts += [f"## By shape ({report['main_metric']})", "", shape_table(report), ""]
    parts += ["## Speed", ""]
    parts += [f"- {kind}: {t['examples_per_s']:.2f} examples/s" for kind, t in report["timing"].items()]
    parts += ["", "## Examples", ""]
    for i, ex in enumerate(report["examples"], start=1):
        parts += [f"### {i}", "", "```text", ex["prompt"], "```", "", f"- reference: `{ex['reference']}`"]
        parts += [f"- {kind.replace('_', ' ')}: `{ex[kind]}`" for kind in ex if kind not in ("prompt", "reference")]
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
