"""`tunebook eval`: the test split through the base and the fine-tuned model, same prompts, side by side.

Answers are kept as they are generated (journal.py): an interrupted or failed eval, run again, resumes from them.
A report is named by the run it scores (runs.py); an eval of anything other than the recipe's own test selection
and settings (`eval.limit`, `eval.where`, `--data`, `--model base` …) writes a report of its own beside it,
`reports/<run>.<what differs>/`, and never replaces the full one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from tunebook.config import EvalConfig, Recipe, load_recipe, redacted_overrides
from tunebook.data import check_limit_per, read_split, select_rows
from tunebook.errors import RecipeError
from tunebook.exported import gguf_files
from tunebook.generation import decode_answers, generate_ids
from tunebook.journal import Journal
from tunebook.metrics import METRICS, answer_nll, perplexity_of, score
from tunebook.models import load_model, load_tokenizer, resolve_model_path
from tunebook.outputs import (
    ADAPTER_WEIGHTS,
    atomic_dir,
    clean_leftovers,
    eval_journal,
    kept_pass_file,
    report_dir,
    write_text_atomic,
)
from tunebook.progress import progress_bar, rate_updater
from tunebook.prompts import reference_answer, user_message
from tunebook.reporting import VERIFIED, error_table, metrics_table, shape_table, view
from tunebook.runs import Run, check_adapter_is_run, identify, run_lock
from tunebook.tasks import eval_subsets
from tunebook.validate import check_adapter, check_metric_rows, validate_recipe

N_REPORT_EXAMPLES = 5
# Eval settings that change only speed, never the answers: not part of a report's name.
SPEED_ONLY = ("batch_size",)
log = logging.getLogger(__name__)


def task_metrics(recipe: Recipe, predictions: list[str], rows: list[dict], data_file: Path,
                 problems: list[str] | None = None) -> dict[str, float]:
    """The recipe's `eval.metrics` on these predictions (perplexity, which needs the model, apart). A metric that
    fails is left out and named in `problems`: the answers generated are never thrown away for it."""
    return score(recipe.eval.metrics, predictions, rows, data_file, problems if problems is not None else [])


def load_eval_rows(recipe: Recipe, data: str | None) -> tuple[list[dict], Path]:
    data_file = Path(data or recipe.data.test)
    field = "--data" if data else "data.test"
    rows = read_split(data_file, recipe.source, field)
    if recipe.eval.where:
        rows = select_rows(rows, recipe.eval.where, data_file, recipe.source, "eval.where")
    check_limit_per(rows, recipe.eval.limit_per, data_file, recipe.source)
    if recipe.eval.limit and recipe.eval.limit_per:
        taken: dict[str, int] = {}
        kept = []
        for row in rows:
            group = str(row.get(recipe.eval.limit_per))
            if taken.get(group, 0) < recipe.eval.limit:
                taken[group] = taken.get(group, 0) + 1
                kept.append(row)
        rows = kept
    elif recipe.eval.limit:
        rows = rows[: recipe.eval.limit]
    check_metric_rows(recipe, rows, data_file, located=not recipe.eval.where and not recipe.eval.limit_per)
    for name in recipe.eval.metrics:  # what each row needs (a metric's own files) is there: found before generation
        if METRICS[name].check_resources is not None:
            METRICS[name].check_resources(rows, data_file)
    return rows, data_file


def report_name(run: Run, which: str = "both", data: str | None = None) -> str:
    """`<run>` for the recipe's own eval; `<run>.<what differs>` for any other selection or setting."""
    try:
        written: EvalConfig | None = load_recipe(run.recipe.source).eval
    except RecipeError:
        written = None
    parts = []
    for f in dataclasses.fields(EvalConfig):
        value = getattr(run.recipe.eval, f.name)
        if f.name not in SPEED_ONLY and (written is None or value != getattr(written, f.name)):
            parts.append(_label(f.name, value))
    if data:
        parts.append(_label("data", Path(data).stem))
    if which != "both":
        parts.append(which)
    return run.name if not parts else f"{run.name}.{'+'.join(parts)}"


def _label(name: str, value: Any) -> str:
    text = "all" if value is None else str(value)
    if len(text) > 24 or not text.replace("_", "").replace("-", "").isalnum():
        text = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{name}-{text}"


def evaluate(recipe: Recipe, which: str = "both", data: str | None = None, adapter_dir: Path | None = None,
             gguf: list[str] | None = None, force: bool = False, gguf_verified: bool = False) -> Path:
    """Run the evaluation and write reports/<report name>/ (report.json, report.md, chart.png, predictions.jsonl).

    `gguf` names exported GGUF types (e.g. q8_0, q4_k_m) to run through llama.cpp on the same rows with the same
    prompt tokens and stop tokens, greedy: the report gains a column for each, so it shows what quantisation kept.
    `force` scores an adapter that another run trained (the report records how it differs). `gguf_verified`
    also runs each GGUF with verified decoding (llama.cpp's GBNF sampler; several times slower than plain).
    """
    validate_recipe(recipe)
    run = identify(recipe)
    rows, data_file = load_eval_rows(recipe, data)
    adapter_dir = adapter_dir or run.adapter_dir
    notes: list[str] = []
    if which in ("fine_tuned", "both"):
        check_adapter(adapter_dir, recipe)
        changes = check_adapter_is_run(run, adapter_dir, "evaluate", force)
        if changes:
            notes.append(f"the adapter was trained by a different run: {'; '.join(changes)}")
    ggufs = gguf_files(run, gguf or [], adapter_dir)
    name = report_name(run, which, data)
    with run_lock(run.name, f"eval {run.command}"):
        for note in clean_leftovers(report_dir(name)):
            print(note)
        if name != run.name:
            print(f"report {name}: not the recipe's own eval, so it gets a report of its own "
                  f"({report_dir(run.name)}/ is left as it is)")
        # A stage's report shows the chain: base -> its SFT parent -> the stage.
        chain = ["sft"] if recipe.method != "sft" and which == "both" else []
        kinds = ["base", *chain, "fine_tuned"] if which == "both" else [which]
        key = eval_key(recipe, rows, kinds, adapter_dir)
        model_path = resolve_model_path(recipe.model.name)
        tokenizer = load_tokenizer(str(adapter_dir) if which != "base" else model_path, recipe.model.trust_remote_code)
        beyond = beyond_context(recipe, rows, tokenizer)
        if beyond:
            print(f"note: {beyond}")
            notes.append(beyond)
        results = previous_results(name, rows, kinds, key, "verified" in recipe.eval.decoding) if ggufs else None
        if results:
            print(f"{' and '.join(kinds)}: reusing {report_dir(name)} (same rows, prompts, settings and adapter)")
        else:
            results = hf_passes(recipe, name, key, kinds, rows, tokenizer, adapter_dir, data_file)
        for path in ggufs.values():
            results.update(run_gguf(recipe, name, key, path, tokenizer, rows, data_file, gguf_verified))

        problems: list[str] = []
        for result in results.values():
            result["metrics"] = {**task_metrics(recipe, result["predictions"], rows, data_file, problems),
                                 **result.get("model_metrics", {})}
        subsets = task_subsets(recipe, rows, results, data_file)
        by_shape = {shape: score_subset(recipe, idx, rows, results, data_file)
                    for shape, idx in shape_groups(rows).items()}
        notes += sorted(set(problems))
        notes += [f"{p}: answers reused from the eval of {r['reused_from']}, which ran the same "
                  f"{'base model' if p == 'base' else 'parent adapter'} on the same rows with the same settings on "
                  "this machine; its examples/s are that run's"
                  for p, r in results.items() if r.get("reused_from")]
        out = write_report(name, recipe, rows, results, subsets, data_file, by_shape, key, notes)
        shutil.rmtree(eval_journal(name, "x").parent, ignore_errors=True)  # the report now holds every answer
    return out


def hf_passes(recipe: Recipe, name: str, key: str, kinds: list[str], rows: list[dict], tokenizer: Any,
              adapter_dir: Path, data_file: Path) -> dict[str, dict[str, Any]]:
    """Base and/or fine-tuned generation with transformers: predictions, perplexity, examples/s; with
    `eval.decoding: [plain, verified]` also a verified pass of the last model (verify.py).

    Each pass resumes from its journal; passes the journals hold whole load no model.
    """
    from tunebook.verify import Tally, hf_verified, verifier_for

    verifier = verifier_for(recipe) if "verified" in recipe.eval.decoding else None
    passes = [*kinds, *([kinds[-1] + VERIFIED] if verifier else [])]
    journals = {p: Journal(eval_journal(name, p), f"{key}:{p}") for p in passes}
    perplexity_wanted = "perplexity" in recipe.eval.metrics

    def complete(p: str) -> bool:
        plain = not p.endswith(VERIFIED)
        return len(journals[p].answers) == len(rows) and not (
            plain and perplexity_wanted and "perplexity" not in journals[p].values)

    kept_keys = {kind: kept_pass_key(recipe, rows, kind) for kind in kinds if kind in ("base", "sft")}
    reused = set()
    for kind, kept_key in kept_keys.items():
        if not journals[kind].answers and reuse_pass(journals[kind], kept_key, len(rows)):
            reused.add(kind)
            print(f"{kind}: all {len(rows)} answers reused from the eval of {journals[kind].values['reused_from']} "
                  f"(same {'base model' if kind == 'base' else 'parent adapter'}, rows, settings and machine)")
    model = load_pass_model(recipe, kinds, adapter_dir) if not all(map(complete, passes)) else None
    system = recipe.data.system_prompt
    results: dict[str, dict[str, Any]] = {}
    plain_ids: dict[str, list[int]] = {}  # the last model's plain greedy answers, which its verified pass reuses
    for p in passes:
        journal, kind = journals[p], p.removesuffix(VERIFIED)
        if complete(p):
            if p not in reused:  # else already said where they came from
                print(f"{p}: all {len(rows)} answers kept from an earlier run of this eval")
        else:
            # The base model is the same weights with the adapter switched off: one load, identical prompts.
            context = model.disable_adapter() if kind == "base" and kinds != ["base"] else contextlib.nullcontext()
            if kind in ("sft", "fine_tuned") and hasattr(model, "set_adapter") and "sft" in model.peft_config:
                model.set_adapter("sft" if kind == "sft" else "default")
            if kind == "fine_tuned" and recipe.model.quantization == "none" and not getattr(model, "merged", False):
                # Generation with the adapter folded into the weights skips two extra small matmuls per LoRA layer
                # and token; the base pass, which needs it unmerged, has already run. (Merging into 4/8-bit weights
                # would requantise them, so QLoRA recipes keep the adapter separate.)
                model.merge_adapter()
                model.merged = True
            with context:
                if p.endswith(VERIFIED):
                    tally = Tally()
                    generate_rest(journal, p, rows, functools.partial(
                        hf_verified, model, tokenizer, data_file=data_file, recipe=recipe, verifier=verifier,
                        tally=tally, plain=plain_ids))
                    journal.set("verified", add_counts(journal.values.get("verified"), tally.as_dict()))
                else:
                    generate_rest(journal, p, rows, functools.partial(
                        plain_batches, model, tokenizer, system, recipe.eval.max_new_tokens, recipe.eval.batch_size,
                        keep_ids=plain_ids if kind == kinds[-1] else None, score=perplexity_wanted))
                    if perplexity_wanted and "perplexity" not in journal.values:
                        journal.set("perplexity", rows_perplexity(journal, model, tokenizer, rows, system,
                                                                  recipe.eval.batch_size))
        results[p] = pass_result(journal, rows)
    for kind, kept_key in kept_keys.items():
        if complete(kind) and "reused_from" not in journals[kind].values:
            keep_pass(journals[kind], kept_key, name, len(rows))
    return results


def rows_perplexity(journal: Journal, model: Any, tokenizer: Any, rows: list[dict], system: str | None,
                    batch_size: int) -> float:
    """Perplexity of the reference answers over all rows: the scores the pass kept beside its answers, and for
    rows it did not score (answers kept from an earlier run) a scoring pass of their own."""
    missing = [i for i in range(len(rows)) if i not in journal.nll]
    nll, tokens = answer_nll(model, tokenizer, [rows[i] for i in missing], system, batch_size) if missing else (0, 0)
    kept = [journal.nll[i] for i in range(len(rows)) if i in journal.nll]
    return perplexity_of(nll + sum(n for n, _ in kept), tokens + sum(t for _, t in kept))


def kept_pass_key(recipe: Recipe, rows: list[dict], kind: str) -> str:
    """What a pass that does not depend on the evaluated adapter answers with: the base model's (`base_pass_key`),
    or for a stage's chain its parent adapter's, which adds that adapter's weights."""
    key = base_pass_key(recipe, rows)
    if kind == "base":
        return key
    from tunebook.runs import parent_adapter_dir

    weights = hashlib.sha256((parent_adapter_dir(recipe) / ADAPTER_WEIGHTS).read_bytes()).hexdigest()
    return hashlib.sha256(f"{key}:{kind}:{weights}".encode()).hexdigest()


def base_pass_key(recipe: Recipe, rows: list[dict]) -> str:
    """What a base model's plain answers depend on, whichever adapter is evaluated beside it: rows, prompt,
    generation settings, the base weights, and the numerics of this machine (resolved dtype, torch, CPU or GPU)."""
    import torch

    from tunebook.precision import cpu_description, resolve

    path = Path(resolve_model_path(recipe.model.name))
    files = sorted(path.iterdir()) if path.is_dir() else [path] if path.exists() else []
    weights = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        cpu, flags = cpu_description()
        device = f"{cpu} {' '.join(sorted(flags))}"
    return hashlib.sha256(json.dumps(
        [rows, recipe.data.system_prompt, recipe.eval.max_new_tokens, recipe.eval.metrics, recipe.eval.batch_size,
         recipe.model.name, str(path), weights, resolve(recipe.model.dtype).dtype, recipe.model.quantization,
         recipe.model.attn_implementation, torch.__version__, device, torch.get_num_threads()],
        sort_keys=True, default=str).encode()).hexdigest()


def reuse_pass(journal: Journal, key: str, n: int) -> bool:
    """Fill an empty journal from a kept pass with the same `kept_pass_key`; True when it was there."""
    try:
        kept = json.loads(kept_pass_file(key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if kept.get("key") != key or len(kept.get("answers", [])) != n:
        return False
    journal.add(list(range(n)), kept["answers"], kept["seconds"])
    for name, value in {**kept.get("values", {}), "reused_from": kept["report"]}.items():
        journal.set(name, value)
    return True


def keep_pass(journal: Journal, key: str, report: str, n: int) -> None:
    """Keep a finished base or parent pass for later evals of other runs (`reuse_pass`)."""
    write_text_atomic(kept_pass_file(key), json.dumps({
        "key": key, "report": report, "answers": [journal.answers[i] for i in range(n)], "seconds": journal.seconds,
        "values": {k: v for k, v in journal.values.items() if k == "perplexity"}}, ensure_ascii=False))


def plain_batches(model: Any, tokenizer: Any, system: str | None, max_new_tokens: int, batch_size: int,
                  rows: list[dict], progress: Any, on_batch: Any, keep_ids: dict[str, list[int]] | None = None,
                  score: bool = False) -> None:
    """Greedy answers into `on_batch`; with `keep_ids`, also each answer's token ids by `verify.row_key`. With
    `score`, each row's reference answer is scored on the prompt cache its answer was decoded from, and
    `on_batch` gets each row's (summed NLL, tokens) as a third argument: perplexity without a pass of its own."""
    from tunebook.metrics import reference_ids
    from tunebook.verify import row_key

    scores: dict[int, tuple[float, int]] = {}

    def decoded(indices: list[int], ids: list[list[int]]) -> None:
        if keep_ids is not None:
            keep_ids.update((row_key(rows[i]), tokens) for i, tokens in zip(indices, ids, strict=True))
        answers = decode_answers(tokenizer, ids)
        if score:
            on_batch(indices, answers, [scores.pop(i) for i in indices])
        else:
            on_batch(indices, answers)

    references = [reference_ids(tokenizer, row, system) for row in rows] if score else None
    generate_ids(model, tokenizer, rows, system, max_new_tokens, batch_size, progress, on_batch=decoded,
                 references=references, scores=scores)


def pass_result(journal: Journal, rows: list[dict]) -> dict[str, Any]:
    """A pass's answers in row order, its model-side metrics, speed and (verified passes) how it chose."""
    result = {"predictions": [journal.answers[i] for i in range(len(rows))],
              "model_metrics": {k: v for k, v in journal.values.items() if k == "perplexity"},
              "examples_per_s": len(rows) / max(journal.seconds, 1e-9)}
    if "verified" in journal.values:
        result["verified"] = journal.values["verified"]
    if "reused_from" in journal.values:
        result["reused_from"] = journal.values["reused_from"]
    return result


def add_counts(old: dict[str, int] | None, new: dict[str, int]) -> dict[str, int]:
    return {k: (old or {}).get(k, 0) + v for k, v in new.items()}


def load_pass_model(recipe: Recipe, kinds: list[str], adapter_dir: Path) -> Any:
    """The base model for the transformers passes, with the adapter on top unless only the base is wanted (and a
    stage's parent adapter beside it, named `sft`, when the chain is scored)."""
    from peft import PeftModel

    model = load_model(resolve_model_path(recipe.model.name), recipe.model, for_training=False)
    if kinds != ["base"]:
        model = PeftModel.from_pretrained(model, adapter_dir)
    if "sft" in kinds:
        from tunebook.runs import parent_adapter_dir

        model.load_adapter(parent_adapter_dir(recipe), adapter_name="sft")
        model.set_adapter("default")
    return model.eval()


def generate_rest(journal: Journal, label: str, rows: list[dict], run_batches: Any) -> None:
    """Generate the rows the journal does not hold yet, adding each batch to it as it is produced.

    `run_batches(rows, progress, on_batch)` generates answers for `rows`, calling `on_batch(indices, answers)` or,
    when it scores references beside them, `on_batch(indices, answers, nll)`.
    """
    todo = [i for i in range(len(rows)) if i not in journal.answers]
    if not todo:
        print(f"{label}: all {len(rows)} answers kept from an earlier run of this eval")
        return
    if len(todo) < len(rows):
        print(f"{label}: resuming, {len(rows) - len(todo)} of {len(rows)} answers kept from an interrupted run")
    with progress_bar(label) as bar:
        task_id = bar.add_task(label, total=len(rows), completed=len(rows) - len(todo), rate="")
        started = last = time.perf_counter()

        def keep(indices: list[int], answers: list[str], nll: list[tuple[float, int]] | None = None) -> None:
            nonlocal last
            now = time.perf_counter()
            journal.add([todo[i] for i in indices], answers, now - last, nll)
            last = now

        run_batches([rows[i] for i in todo], rate_updater(bar, task_id, started), keep)


def eval_key(recipe: Recipe, rows: list[dict], kinds: list[str], adapter_dir: Path) -> str:
    """What the transformers passes' results depend on: rows, prompt, generation settings, model and adapter."""
    digest = hashlib.sha256(json.dumps([rows, kinds, recipe.data.system_prompt, recipe.eval.max_new_tokens,
                                        recipe.eval.metrics,
                                        recipe.model.name, recipe.model.dtype, recipe.model.quantization],
                                       sort_keys=True, default=str).encode())
    adapter = adapter_dir / ADAPTER_WEIGHTS
    if "fine_tuned" in kinds and adapter.exists():
        digest.update(adapter.read_bytes())
    if "sft" in kinds:
        from tunebook.runs import parent_adapter_dir

        digest.update((parent_adapter_dir(recipe) / ADAPTER_WEIGHTS).read_bytes())
    return digest.hexdigest()


def previous_results(name: str, rows: list[dict], kinds: list[str], key: str,
                     verified: bool = False) -> dict[str, dict] | None:
    """The transformers passes of the current report, when it was made with the same `eval_key` (so `eval --gguf`
    after `eval` adds the GGUF columns without generating everything again); None otherwise."""
    folder = report_dir(name)
    try:
        report = json.loads((folder / "report.json").read_text())
        saved = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return None
    if report.get("eval_key") != key or len(saved) != len(rows):
        return None
    passes = [*kinds, *([kinds[-1] + VERIFIED] if verified else [])]
    out = {}
    for p in passes:
        metrics = report[p] if p in ("base", "sft", "fine_tuned") else report.get("verified", {}).get(p.removesuffix(VERIFIED))
        if metrics is None or f"{p}_prediction" not in saved[0]:
            return None
        out[p] = {"predictions": [r[f"{p}_prediction"] for r in saved],
                  "model_metrics": {k: v for k, v in metrics.items() if k == "perplexity"},
                  "examples_per_s": report["timing"][p]["examples_per_s"]}
        if p.endswith(VERIFIED) and p.removesuffix(VERIFIED) in report.get("verified_choices", {}):
            out[p]["verified"] = report["verified_choices"][p.removesuffix(VERIFIED)]
    return out


def run_gguf(recipe: Recipe, name: str, key: str, path: Path, tokenizer: Any, rows: list[dict],
             data_file: Path, verified: bool = False) -> dict[str, dict]:
    """One exported GGUF through llama.cpp on the eval rows: the prompt tokens and stop tokens of the HF passes,
    greedy; with `verified` also verified decoding (llama.cpp's own GBNF sampler)."""
    from tunebook import llamacpp
    from tunebook.prompts import encode_prompt, stop_token_ids
    from tunebook.verify import Tally, gguf_verified, verifier_for

    qtype = path.stem.rsplit("-", 1)[-1]
    stat = path.stat()
    verifier = verifier_for(recipe) if verified else None
    passes = [f"gguf_{qtype}", *([f"gguf_{qtype}{VERIFIED}"] if verifier else [])]
    journals = {p: Journal(eval_journal(name, p), f"{key}:{p}:{stat.st_size}:{stat.st_mtime_ns}") for p in passes}
    system = recipe.data.system_prompt
    llm = None
    for p in passes:
        journal = journals[p]
        if len(journal.answers) == len(rows):
            print(f"{p}: all {len(rows)} answers kept from an earlier run of this eval")
            continue
        if llm is None:
            longest = max(len(encode_prompt(tokenizer, row, system)) for row in rows) + recipe.eval.max_new_tokens
            llm = llamacpp.load_gguf(path, n_ctx=max(longest, 2 * recipe.data.max_length))
        label = f"GGUF {qtype}" + (" verified" if p.endswith(VERIFIED) else "")
        if p.endswith(VERIFIED):
            tally = Tally()
            generate_rest(journal, label, rows, functools.partial(
                gguf_verified, llm, tokenizer, data_file=data_file, recipe=recipe, verifier=verifier, tally=tally))
            journal.set("verified", add_counts(journal.values.get("verified"), tally.as_dict()))
        else:
            generate_rest(journal, label, rows, functools.partial(
                gguf_batches, llm, tokenizer, system, stop_token_ids(tokenizer, system), recipe.eval.max_new_tokens))
    llm = None  # llama.cpp frees the model with its last reference
    return {p: pass_result(journals[p], rows) for p in passes}


def beyond_context(recipe: Recipe, rows: list[dict], tokenizer: Any) -> str | None:
    """A note when some prompts, with room for `eval.max_new_tokens`, exceed the model's context (a held-out schema
    longer than the model reads): they are answered and scored as generated, and the report says how many."""
    from tunebook.models import architecture_config
    from tunebook.prompts import encode_prompt

    config = architecture_config(recipe.model.name)
    context = getattr(getattr(config, "get_text_config", lambda: config)(), "max_position_embeddings", None)
    if not context:
        return None
    system, room = recipe.data.system_prompt, recipe.eval.max_new_tokens
    lengths = [len(encode_prompt(tokenizer, row, system)) + room for row in rows]
    over = [n for n in lengths if n > context]
    if not over:
        return None
    return (f"{len(over)} of {len(rows)} prompts, with eval.max_new_tokens={room}, are longer than the model's "
            f"context of {context} tokens (the longest {max(over)}): they are answered and scored as generated, "
            "past what the model was trained to read")


def gguf_batches(llm: Any, tokenizer: Any, system: str | None, stops: list[int], max_new_tokens: int,
                 rows: list[dict], progress: Any, on_batch: Any) -> None:
    from tunebook import llamacpp
    from tunebook.prompts import encode_prompt

    ids = [encode_prompt(tokenizer, row, system) for row in rows]
    llamacpp.generate_ids(llm, ids, stops, max_new_tokens, progress,
                          on_batch=lambda idx, answers: on_batch(idx, decode_answers(tokenizer, answers)))


def group_indices(rows: list[dict], key: str) -> dict[str, list[int]]:
    """Row positions by the value of one field (rows without it are left out)."""
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if row.get(key):
            groups.setdefault(str(row[key]), []).append(i)
    return groups


NO_SHAPE = "(no shape)"


def shape_groups(rows: list[dict]) -> dict[str, list[int]]:
    """Row positions by `shape`, sorted; where only some rows have one, the others form a last `(no shape)` group,
    so the shape table always adds up to every row scored."""
    groups = dict(sorted(group_indices(rows, "shape").items()))
    unshaped = [i for i, row in enumerate(rows) if not row.get("shape")]
    if groups and unshaped:
        groups[NO_SHAPE] = unshaped
    return groups


def task_subsets(recipe: Recipe, rows: list[dict], results: dict[str, dict], data_file: Path) -> dict[str, dict]:
    """The subsets of the rows that the recipe's task scores apart (`tasks.Task.subsets`), each scored alone."""
    return {name: score_subset(recipe, idx, rows, results, data_file)
            for name, idx in eval_subsets(recipe, rows, data_file).items()}


def score_subset(recipe: Recipe, indices: list[int], rows: list[dict], results: dict[str, dict],
                 data_file: Path) -> dict:
    """The recipe's metrics on some rows, for every model evaluated, with the row count."""
    return {"n_examples": len(indices), **{
        kind: task_metrics(recipe, [r["predictions"][i] for i in indices], [rows[i] for i in indices], data_file)
        for kind, r in results.items()}}


def write_report(name: str, recipe: Recipe, rows: list[dict], results: dict[str, dict], subsets: dict,
                 data_file: Path, by_shape: dict | None = None, key: str | None = None,
                 notes: list[str] | None = None) -> Path:
    """Write the report directory reports/<name>/ atomically and return it."""
    final = report_dir(name)
    with atomic_dir(final) as tmp:
        write_report_files(tmp, name, recipe, rows, results, subsets, data_file, by_shape or {}, key, notes or [])
    return final


def write_report_files(tmp: Path, name: str, recipe: Recipe, rows: list[dict], results: dict[str, dict],
                       subsets: dict, data_file: Path, by_shape: dict, key: str | None = None,
                       notes: list[str] | None = None) -> None:
    base = results.get("base", {}).get("metrics", {})
    tuned = results.get("fine_tuned", {}).get("metrics", {})
    report = {
        "recipe": recipe.name,
        "report": name,
        "overrides": redacted_overrides(recipe.overrides),
        "notes": notes or [],
        "task": recipe.task,
        "data": str(data_file),
        "n_examples": len(rows),
        "main_metric": recipe.eval.main_metric,
        "metrics": recipe.eval.metrics,
        "decoding": recipe.eval.decoding,
        "base": base,
        "sft": results.get("sft", {}).get("metrics", {}),
        "fine_tuned": tuned,
        "delta": {k: tuned[k] - base[k] for k in tuned if k in base},
        "gguf": {kind.removeprefix("gguf_"): r["metrics"] for kind, r in results.items()
                 if kind.startswith("gguf_") and not kind.endswith(VERIFIED)},
        "verified": {kind.removesuffix(VERIFIED): r["metrics"] for kind, r in results.items() if kind.endswith(VERIFIED)},
        "verified_choices": {kind.removesuffix(VERIFIED): r["verified"] for kind, r in results.items()
                             if kind.endswith(VERIFIED) and "verified" in r},
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
        f"# {report['report']}: base vs fine-tuned",
        "",
        f"Task `{report['task']}`, {report['n_examples']} examples from `{report['data']}`. "
        "Rates and text scores in percent; perplexity of the reference answers (lower is better).",
        "",
        metrics_table(report),
        "",
    ]
    if report.get("notes"):
        parts += [*(f"- note: {note}" for note in report["notes"]), ""]
    for name, subset in report["subsets"].items():
        parts += [f"## Subset: {name} ({subset['n_examples']} examples)", "", metrics_table(view(subset)), ""]
    errors = error_table(report)
    if errors:
        parts += ["## What kind of answer (percent of rows)", "", errors, ""]
    for kind, counts in (report.get("verified_choices") or {}).items():
        parts.append(f"- verified decoding, {kind}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()))
    if report.get("by_shape"):
        parts += ["", f"## By shape ({report['main_metric']})", "", shape_table(report), ""]
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

    from tunebook.metrics import UNSCORED

    keys = [k for k in report["fine_tuned"] if k not in ("perplexity", UNSCORED) and k in report["base"]]
    ppl = all("perplexity" in report[side] for side in ("base", "fine_tuned"))
    fig, axes = plt.subplots(1, 2 if ppl else 1, figsize=(10 if ppl else 8, 3.8), squeeze=False,
                             gridspec_kw={"width_ratios": [max(len(keys), 1), 1] if ppl else [1]})
    ax = axes[0][0]
    xs = range(len(keys))
    ax.bar([x - 0.2 for x in xs], [report["base"][k] for k in keys], 0.4, label="base")
    ax.bar([x + 0.2 for x in xs], [report["fine_tuned"][k] for k in keys], 0.4, label="fine-tuned")
    ax.set_xticks(list(xs), keys, rotation=20)
    ax.set_ylabel("percent")
    ax.legend()
    ax.set_title(f"{report['report']} ({report['n_examples']} examples)")
    if ppl:
        axes[0][1].bar(["base", "fine-tuned"], [report["base"]["perplexity"], report["fine_tuned"]["perplexity"]],
                       color=["C0", "C1"])
        axes[0][1].set_title("perplexity (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
