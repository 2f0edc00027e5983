"""`tunebook bench`: side-by-side speed and memory on this machine, written to bench/results.json and bench/results.md.

Every comparison runs in one invocation on the same machine, model and rows; each training figure runs in its
own process (so peak RSS is that run's alone). Timings are medians over steps or repeats, with min and max.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from tunebook import allocator
from tunebook.config import load_recipe, recipe_path
from tunebook.outputs import RUN_INFO_FILE
from tunebook.precision import BF16_FLAGS, cpu_description

RESULTS = Path("bench/results.json")
TABLE = Path("bench/results.md")
FLAGS = ("avx2", "avx512f", *BF16_FLAGS, "amx_tile")


def machine() -> dict[str, Any]:
    """What the numbers depend on: CPU model and flags, cores, threads, library versions."""
    import torch

    name, flags = cpu_description()
    versions = {}
    for package in ("torch", "transformers", "trl", "peft"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {"cpu": name, "flags": [f for f in FLAGS if f in flags], "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else None, "python": platform.python_version(), "versions": versions}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def padded_collator(pad_id: int) -> Any:
    """What the plain baselines use (bench/baseline_train.py, `bench --gpu`): each batch padded to its longest
    row, loss where `labels` says."""
    import torch

    def collate(items: list[dict]) -> dict[str, Any]:
        width = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), width), pad_id)
        labels = torch.full((len(items), width), -100)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = (torch.tensor(item["input_ids"]),
                                                             torch.tensor(item["labels"]), 1)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def bench_recipe(recipe: str, workdir: Path, name: str, overrides: dict[str, Any]) -> Path:
    """A copy of `recipe` named `name` with `overrides` (dotted keys) applied, in `workdir`."""
    raw = yaml.safe_load(recipe_path(recipe).read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        (raw.setdefault(section, {}) or {})[key] = value
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def outputs_beside(recipe_file: Path) -> Path:
    """The models folder a bench run of `recipe_file` writes into (beside it), with the base model linked in, not
    copied."""
    from tunebook import outputs

    models = recipe_file.parent / "models"
    models.mkdir(parents=True, exist_ok=True)
    if not (models / "base").exists() and (outputs.MODELS_DIR / "base").is_dir():
        (models / "base").symlink_to((outputs.MODELS_DIR / "base").resolve())
    return models


def run_tunebook_train(recipe_file: Path) -> dict[str, Any]:
    """`tunebook train` in its own process, with outputs under the recipe's folder; its run_info.json figures."""
    models = outputs_beside(recipe_file)
    code = ("import sys, tunebook.outputs as o; from pathlib import Path; "
            f"o.MODELS_DIR = Path({str(models)!r}); o.LOGS_DIR = Path({str(recipe_file.parent / 'logs')!r}); "
            "from tunebook.cli import main; sys.exit(main(sys.argv[1:]))")
    started = time.perf_counter()
    log = recipe_file.with_suffix(".log")
    with log.open("w") as out:  # a file, not a pipe: nothing the child leaves running can hold the bench up
        done = subprocess.run([sys.executable, "-c", code, "train", str(recipe_file), "--force"],
                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=allocator.preloaded_env(allocator.find()))  # as `tunebook train` starts
    if done.returncode != 0:
        raise RuntimeError(f"tunebook train failed:\n{log.read_text()[-3000:]}")
    info = json.loads((models / "fine-tuned" / recipe_file.stem / RUN_INFO_FILE).read_text())
    return {"tokens": info["tokens_seen"], "train_seconds": info["train_runtime_s"],
            "tokens_per_s": info["train_tokens_per_s"], "peak_rss_mb": info["peak_memory_mb"],
            "dtype": info.get("dtype"), "allocator": (info.get("allocator") or {}).get("name"),
            "wall_seconds": round(time.perf_counter() - started, 1)}


def run_baseline_train(recipe_file: Path, steps: int, tokens_per_step: int) -> dict[str, Any]:
    script = Path(__file__).resolve().parents[2] / "bench" / "baseline_train.py"
    done = subprocess.run([sys.executable, str(script), str(recipe_file), str(steps), str(tokens_per_step)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"baseline failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_training(recipe: str, steps: int, workdir: Path, repeats: int) -> dict[str, Any]:
    """Plain Trainer + PEFT (padded, fp32) vs tunebook's path as the recipe runs it; same rows, rank and steps.

    The two alternate, `repeats` times each, so a slow spell on a shared machine hits both."""
    common = {"training.max_steps": steps, "training.save_steps": 10_000, "training.logging_steps": 1,
              "data.val_limit": 0, "training.report_to": "none"}
    runs: dict[str, list[dict]] = {"tunebook": [], "baseline": []}
    for _ in range(repeats):
        runs["tunebook"].append(run_tunebook_train(bench_recipe(recipe, workdir, "bench-tunebook", common)))
        # The baseline's batches hold as many tokens as tunebook's packed steps did, on average.
        per_step = round(runs["tunebook"][0]["tokens"] / steps)
        runs["baseline"].append(run_baseline_train(bench_recipe(recipe, workdir, "bench-baseline", common), steps,
                                                   per_step))
    summary = {name: {**{k: v for k, v in found[0].items() if not isinstance(v, (int, float)) or k == "tokens"},
                      **{k: spread([r[k] for r in found]) for k in ("tokens_per_s", "peak_rss_mb")}, "runs": found}
               for name, found in runs.items()}
    ratios = [t["tokens_per_s"] / b["tokens_per_s"] for t, b in zip(runs["tunebook"], runs["baseline"], strict=True)]
    return {"steps": steps, "repeats": repeats, **summary,
            "speedup": round(summary["tunebook"]["tokens_per_s"]["median"]
                             / summary["baseline"]["tokens_per_s"]["median"], 2),
            "speedup_per_pair": spread(ratios)}


def bench_step_profile(recipe: str, workdir: Path) -> dict[str, Any]:
    """Where a training step's time goes on this machine (torch.profiler, bench/profile_step.py): seconds per
    step and the shares of matmuls, attention, elementwise ops and dtype copies, with the recipe's own settings."""
    folder = workdir / "profile"
    folder.mkdir()
    recipe_file = bench_recipe(recipe, folder, "bench-profile", {
        "training.max_steps": 8, "training.save_steps": 10_000, "data.val_limit": 0, "training.report_to": "none"})
    outputs_beside(recipe_file)
    script = Path(__file__).resolve().parents[2] / "bench" / "profile_step.py"
    done = subprocess.run([sys.executable, str(script), str(recipe_file)], capture_output=True, text=True,
                          env=allocator.preloaded_env(allocator.find()))
    if done.returncode != 0:
        raise RuntimeError(f"step profile failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_memory(recipe: str, workdir: Path) -> dict[str, Any]:
    """Peak RSS of a 2-step `tunebook train` in fp32, bf16 and QLoRA (4-bit), each in its own process."""
    out = {}
    for label, model in (("fp32", {"model.dtype": "float32"}), ("bf16", {"model.dtype": "bfloat16"}),
                         ("qlora_4bit", {"model.dtype": "float32", "model.quantization": "4bit"})):
        run = run_tunebook_train(bench_recipe(recipe, workdir, f"bench-mem-{label}", {
            **model, "training.max_steps": 2, "training.save_steps": 10_000, "data.val_limit": 0,
            "training.report_to": "none"}))
        out[label] = {"peak_rss_mb": run["peak_rss_mb"], "tokens_per_s": run["tokens_per_s"]}
    return out


# The old eval path's batch: what the SQL recipe's eval.batch_size was when that path was tunebook's eval.
OLD_EVAL_BATCH = 16


def bench_eval(recipe_name: str, n: int, repeats: int) -> dict[str, Any]:
    """Fine-tuned generation on the recipe's eval rows, in fp32 on every machine (so the outputs can be compared
    token for token): the old path (adapter kept apart, prompts sorted by length and prefilled in full by
    `generate()`, batches of OLD_EVAL_BATCH) vs today's `tunebook eval` (adapter merged, each shared schema prefix
    computed once, groups packed into batches of the recipe's eval.batch_size, finished rows dropped)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from tunebook.data import read_split, select_rows
    from tunebook.generation import generate_ids
    from tunebook.models import load_model, load_tokenizer, resolve_model_path
    from tunebook.outputs import fine_tuned_dir

    recipe = load_recipe(recipe_name, ["model.dtype=float32"])
    path = resolve_model_path(recipe.model.name)
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = "left"
    rows = read_split(recipe.data.test)
    if recipe.eval.where:
        rows = select_rows(rows, recipe.eval.where, recipe.data.test, recipe.source, "eval.where")
    rows = rows[:n]
    model = load_model(path, recipe.model, for_training=False)
    adapter = fine_tuned_dir(recipe.name)
    if (adapter / "adapter_config.json").exists():
        model, source = PeftModel.from_pretrained(model, adapter), str(adapter)
    else:  # a fresh clone: LoRA as initialised (B = 0), so the answers are the base model's, which run longer
        model, source = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **recipe.lora)), "untrained LoRA"
    model.eval()
    args = (tokenizer, rows, recipe.data.system_prompt, recipe.eval.max_new_tokens)

    def timed(batch_size: int, **kwargs: Any) -> tuple[list[float], list[list[int]]]:
        rates, outputs = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            outputs = generate_ids(model, *args, batch_size, **kwargs)
            rates.append(len(rows) / (time.perf_counter() - started))
        return rates, outputs

    old_rates, old = timed(OLD_EVAL_BATCH, share_prefixes=False)
    model.merge_adapter()
    new_rates, new = timed(recipe.eval.batch_size)
    old_s, new_s = spread(old_rates), spread(new_rates)
    return {"examples": len(rows), "repeats": repeats, "adapter": source, "max_new_tokens": recipe.eval.max_new_tokens,
            "dtype": "float32", "old_batch_size": OLD_EVAL_BATCH, "batch_size": recipe.eval.batch_size,
            "old_examples_per_s": old_s, "new_examples_per_s": new_s,
            "speedup": round(new_s["median"] / old_s["median"], 2), "identical_outputs": new == old,
            "same_outputs": sum(a == b for a, b in zip(new, old, strict=True))}


class InProcessSql:
    """The sandbox's connection, limits and authorizer run in this process: the baseline of `bench_sql_scoring`
    (what eval paid before queries moved to a worker that can be killed)."""

    def __init__(self) -> None:
        self.connections: dict[str, Any] = {}
        self.deadline = [float("inf")]
        self.memo: dict[tuple[str, str], Any] = {}

    def query(self, db_path: Any, sql: str, time_limit_s: float | None = None) -> Any:
        from tunebook.sandbox import SQL_TIME_LIMIT_S, execute, open_read_only

        key = (str(db_path), sql)
        if key not in self.memo:
            if key[0] not in self.connections:
                self.connections[key[0]] = open_read_only(db_path, self.deadline)
            self.memo[key] = execute(self.connections[key[0]], self.deadline, sql, time_limit_s or SQL_TIME_LIMIT_S)
        return self.memo[key]


def bench_sql_scoring(recipe_name: str, repeats: int) -> dict[str, Any] | None:
    """What the SQL sandbox's worker costs eval: scoring the recipe's eval rows as `tunebook eval` does (gold check,
    both models, the unseen-schema subsets and every shape), queries in this process vs in the worker (started
    fresh each time, so its start is counted). Predictions: the last report's where it scored the same rows, else
    the gold queries and one wrong query per row."""
    from tunebook.evaluate import group_indices, load_eval_rows
    from tunebook.metrics import db_path_for, sql_metrics
    from tunebook.outputs import report_dir
    from tunebook.prompts import reference_answer
    from tunebook.sandbox import SqlSandbox

    recipe = load_recipe(recipe_name)
    if "sql_execution" not in recipe.eval.metrics:
        return None
    rows, data_file = load_eval_rows(recipe, None)
    gold = [reference_answer(r) for r in rows]
    predictions = {"base": [f"SELECT count(*) FROM ({g}) WHERE 0" for g in gold], "fine_tuned": gold}
    saved = report_dir(recipe.name) / "predictions.jsonl"
    source = "gold queries and a wrong query per row"
    if saved.exists():
        lines = [json.loads(line) for line in saved.read_text().splitlines()]
        if [reference_answer(r) for r in lines] == gold:
            predictions = {kind: [r[f"{kind}_prediction"] for r in lines] for kind in ("base", "fine_tuned")}
            source = str(saved)
    dbs = [db_path_for(r, data_file) for r in rows]
    groups = [list(range(len(rows))), *group_indices(rows, "shape").values(), list(range(len(rows)))]

    def score_all(box: Any) -> float:
        started = time.perf_counter()
        for db, g in zip(dbs, gold, strict=True):
            box.query(db, g)
        for preds in predictions.values():
            for idx in groups:
                sql_metrics([preds[i] for i in idx], [gold[i] for i in idx], [dbs[i] for i in idx], sandbox=box)
        return time.perf_counter() - started

    in_process, worker = [], []
    for _ in range(repeats):
        in_process.append(score_all(InProcessSql()))
        box = SqlSandbox()
        worker.append(score_all(box))
        box.close()
    a, b = spread(in_process), spread(worker)
    return {"examples": len(rows), "predictions": source, "repeats": repeats, "in_process_s": a, "worker_s": b,
            "extra_s": round(b["median"] - a["median"], 3)}


SERVED_TYPES = ("q4_k_m", "q8_0")


def bench_serve(recipe_name: str, n: int) -> dict[str, Any] | None:
    """`tunebook serve` against `tunebook eval --gguf` on the same exported file and the first `n` eval rows:
    eval's examples/s and tokens/s; the server's first-token latency and decode tokens/s, streamed through the
    `openai` client at temperature 0 (rows in eval's order, so both reuse the cached schema prefix alike); and
    how many served answers equal eval's. None when the recipe has no exported file of these types."""
    import importlib.util

    if importlib.util.find_spec("openai") is None or importlib.util.find_spec("llama_cpp") is None:
        return None
    from openai import OpenAI

    from tunebook import llamacpp
    from tunebook.evaluate import load_eval_rows
    from tunebook.generation import decode_answers
    from tunebook.outputs import gguf_file
    from tunebook.prompts import encode_prompt, stop_token_ids, user_message
    from tunebook.serve import in_background, served_models

    recipe = load_recipe(recipe_name)
    types = [q for q in SERVED_TYPES if gguf_file(recipe.name, q).exists()]
    if not types:
        return None
    rows = load_eval_rows(recipe, None)[0][:n]
    out: dict[str, Any] = {"examples": len(rows), "max_tokens": recipe.eval.max_new_tokens}
    for qtype in types:
        (served,) = served_models([recipe], qtype)
        tokenizer, system = served.tokenizer, recipe.data.system_prompt
        prompts = [encode_prompt(tokenizer, r, system) for r in rows]
        order = sorted(range(len(rows)), key=lambda i: prompts[i])
        llm = llamacpp.load_gguf(served.gguf, n_ctx=served.n_ctx)
        started = time.perf_counter()
        ids = llamacpp.generate_ids(llm, prompts, stop_token_ids(tokenizer, system), recipe.eval.max_new_tokens)
        eval_s = time.perf_counter() - started
        del llm
        evaluated = decode_answers(tokenizer, ids)
        tokens = sum(len(a) for a in ids)
        first, decode_s, answers = [], 0.0, [""] * len(rows)
        with in_background([served]) as url:
            client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
            served_started = time.perf_counter()
            for i in order:
                t0 = time.perf_counter()
                t_first = None
                for chunk in client.chat.completions.create(
                        model=served.name, temperature=0, max_tokens=recipe.eval.max_new_tokens, stream=True,
                        messages=[{"role": "user", "content": user_message(rows[i])}]):
                    if chunk.choices and chunk.choices[0].delta.content:
                        t_first = t_first or time.perf_counter()
                        answers[i] += chunk.choices[0].delta.content
                done = time.perf_counter()
                first.append((t_first or done) - t0)
                decode_s += done - (t_first or done)
            served_s = time.perf_counter() - served_started
        same = sum(a.strip() == e for a, e in zip(answers, evaluated, strict=True))
        out[qtype] = {"eval_examples_per_s": round(len(rows) / eval_s, 2), "eval_tokens_per_s": round(tokens / eval_s, 1),
                      "served_examples_per_s": round(len(rows) / served_s, 2),
                      "first_token_s": spread(first),
                      "served_decode_tokens_per_s": round(max(tokens - len(rows), 0) / max(decode_s, 1e-9), 1),
                      "same_answers": same, "size_mb": round(served.gguf.stat().st_size / 2**20, 1)}
    return out


def demo_stages(recipe: str) -> dict[str, Any] | None:
    """The stage times of the last `tunebook demo` of this recipe (make demo), if one ran here."""
    from tunebook.outputs import demo_times_file

    path = demo_times_file(Path(recipe).stem)
    if not path.exists():
        return None
    recorded = json.loads(path.read_text())
    same = recorded.get("machine", {}).get("cpu") == machine()["cpu"]
    return {**{k: recorded[k] for k in ("finished", "stage_seconds", "total_seconds")}, "same_cpu_model": same}


def targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The targets, each with what was measured, whether it was met and by how much it was missed: training 2x the
    plain baseline, eval 3x the old path, peak RSS 3 GiB, `make demo` in 15 minutes where the CPU has AVX-512 and
    20 where it has only AVX2 (the AMD EPYC VMs of issue 27; the Zen 4 ones have AVX-512 and the 15-minute one)."""
    demo_minutes = 15.0 if "avx512f" in results["machine"]["flags"] else 20.0
    out: dict[str, dict[str, Any]] = {}

    def check(name: str, measured: float | None, goal: float, higher_is_better: bool = True) -> None:
        if measured is None:
            out[name] = {"target": goal, "measured": None, "met": None}
            return
        met = measured >= goal if higher_is_better else measured <= goal
        short = 0.0 if met else round(abs(goal - measured) / goal * 100, 1)
        out[name] = {"target": goal, "measured": round(measured, 2), "met": met, "missed_by_percent": short}

    t, e, d = results.get("training"), results.get("eval"), results.get("demo")
    check("training_speedup", t and t["speedup"], 2.0)
    check("eval_speedup", e and e["speedup"], 3.0)
    check("training_peak_rss_gib", t and t["tunebook"]["peak_rss_mb"]["median"] / 1024, 3.0, higher_is_better=False)
    check("demo_minutes_after_install", d and d["total_seconds"] / 60, demo_minutes, higher_is_better=False)
    return out


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, flags {', '.join(m['flags']) or '-'};"
             f" torch {m['versions'].get('torch')}, transformers {m['versions'].get('transformers')}, "
             f"trl {m['versions'].get('trl')}. Recipe `{results['recipe']}`. Medians of the repeats [min–max].", "",
             "| measure | baseline | tunebook | ratio |", "|---|---:|---:|---:|"]

    def fmt(s: dict[str, float], unit: str = "") -> str:
        return f"{s['median']:g}{unit} [{s['min']:g}–{s['max']:g}]"

    t = results.get("training")
    if t:
        lines.append(f"| training tokens/s ({t['steps']} steps × {t['repeats']}) | {fmt(t['baseline']['tokens_per_s'])} "
                     f"(Trainer+PEFT, padded, fp32) | {fmt(t['tunebook']['tokens_per_s'])} "
                     f"({(t['tunebook'].get('dtype') or {}).get('dtype', '?')}, "
                     f"{t['tunebook'].get('allocator') or 'glibc'} malloc) | **{t['speedup']}x** |")
        lines.append(f"| training peak RSS (MB) | {fmt(t['baseline']['peak_rss_mb'])} | "
                     f"{fmt(t['tunebook']['peak_rss_mb'])} | |")
    e = results.get("eval")
    if e:
        if "old_batch_size" in e:
            old, new = (f"adapter apart, full prefill, batches of {e['old_batch_size']}",
                        f"merged, shared prefixes, continuous batching of {e['batch_size']}")
        else:  # a run from before continuous batching
            old, new = "adapter apart, full prefill", "merged, shared prefixes"
        lines.append(f"| fine-tuned eval examples/s, {e.get('dtype', 'recipe dtype')} ({e['examples']} rows × "
                     f"{e['repeats']}) | {fmt(e['old_examples_per_s'])} ({old}) | {fmt(e['new_examples_per_s'])} "
                     f"({new}) | **{e['speedup']}x** (same outputs {e['same_outputs']}/{e['examples']}) |")
    q = results.get("sql_scoring")
    if q:
        lines.append(f"| scoring {q['examples']} SQL rows as eval does, s | {fmt(q['in_process_s'])} (queries in "
                     f"this process) | {fmt(q['worker_s'])} (sandbox worker, started fresh) | +{q['extra_s']} s |")
    v = results.get("serve")
    for qtype in SERVED_TYPES if v else ():
        if qtype in v:
            x = v[qtype]
            lines.append(f"| GGUF {qtype} ({x['size_mb']} MB), {v['examples']} rows: examples/s | {x['eval_examples_per_s']} "
                         f"(`eval --gguf`) | {x['served_examples_per_s']} (`serve`, openai client, streamed) | "
                         f"same answers {x['same_answers']}/{v['examples']} |")
            lines.append(f"| GGUF {qtype}: served first token s; decode tokens/s | eval {x['eval_tokens_per_s']} "
                         f"tokens/s (prefill included) | {fmt(x['first_token_s'])} s; {x['served_decode_tokens_per_s']} "
                         "tokens/s | |")
    p = results.get("profile")
    if p:
        shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in p["shares"].items())
        lines.append(f"| where a training step's time goes (torch.profiler, 2 steps) | | {p['seconds_per_step']} s "
                     f"per step: {shares} | |")
    for label, entry in (results.get("memory") or {}).items():
        lines.append(f"| peak RSS, 2-step train, {label} | | {entry['peak_rss_mb']:.0f} MB | |")
    d = results.get("demo")
    if d:
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in d["stage_seconds"].items())
        lines.append(f"| `make demo` stages (run {d['finished']}) | | {stages} | total {d['total_seconds']:.0f} s |")
    lines += ["", "| target | measured | met |", "|---|---:|---|"]
    for name, entry in results.get("targets", {}).items():
        verdict = "–" if entry["met"] is None else ("yes" if entry["met"] else f"no (by {entry['missed_by_percent']}%)")
        lines.append(f"| {name}: {entry['target']} | {entry['measured']} | {verdict} |")
    return "\n".join(lines) + "\n"


PARTS = ("training", "profile", "eval", "sql_scoring", "memory", "serve")


def run(recipe: str = "smollm2-sql", steps: int = 12, eval_examples: int = 48, quick: bool = False,
        repeats: int = 3, only: list[str] | None = None) -> dict:
    """Run the benchmark and write bench/results.json and bench/results.md (atomically).

    `only` runs some parts and keeps the other parts of the last results of this machine and recipe."""
    from tunebook.outputs import write_text_atomic

    repeats = 1 if quick else repeats
    out_json, out_md = (RESULTS, TABLE) if not quick else (RESULTS.with_name("quick.json"), TABLE.with_name("quick.md"))
    results: dict[str, Any] = {"recipe": recipe, "machine": machine(), "quick": quick}
    wanted = set(only or PARTS)
    if wanted - set(PARTS):
        from tunebook.errors import RecipeError

        raise RecipeError("tunebook bench", "--only", f"no part named {', '.join(sorted(wanted - set(PARTS)))}.",
                          f"Parts: {', '.join(PARTS)}.")
    kind = machine_kind(results["machine"])
    recorded = {} if quick else recorded_runs(out_json)
    last = recorded.get(kind, {})
    if only and last.get("recipe") == recipe:
        results.update({k: v for k, v in last.items() if k in PARTS and k not in wanted})
    with tempfile.TemporaryDirectory() as tmp:
        if "training" in wanted:
            results["training"] = bench_training(recipe, steps, Path(tmp), repeats)
        if "profile" in wanted:
            results["profile"] = bench_step_profile(recipe, Path(tmp))
        if "eval" in wanted:
            results["eval"] = bench_eval(recipe, eval_examples, repeats)
        if "sql_scoring" in wanted:
            results["sql_scoring"] = bench_sql_scoring(recipe, repeats)
        if "memory" in wanted and not quick:
            results["memory"] = bench_memory(recipe, Path(tmp))
        if "serve" in wanted:
            results["serve"] = bench_serve(recipe, eval_examples)
    results["demo"] = demo_stages(recipe)
    results["targets"] = targets(results)
    if quick:
        write_text_atomic(out_json, json.dumps(results, indent=2))
        write_text_atomic(out_md, markdown(results))
        return results
    recorded[kind] = results
    write_text_atomic(out_json, json.dumps({"by_machine": recorded}, indent=2))
    write_text_atomic(out_md, "\n".join(f"## {k}\n\n{markdown(v)}" for k, v in sorted(recorded.items())))
    return results


def record_gpu(result: dict[str, Any], results: Path = RESULTS) -> Path:
    """Write `tunebook bench --gpu`'s result: under the GPU's kind in bench/results.json (and its table in
    bench/results.md); a `--tiny` smoke run to bench/gpu-tiny.json only."""
    from tunebook.gpu_bench import markdown as gpu_markdown
    from tunebook.outputs import write_text_atomic

    if result["tiny"]:
        path = results.with_name("gpu-tiny.json")
        write_text_atomic(path, json.dumps(result, indent=2))
        return path
    recorded = recorded_runs(results)
    kind = machine_kind({**machine(), "gpu": result["device"]})
    recorded[kind] = {**recorded.get(kind, {}), "machine": machine(), "gpu_training": result}
    write_text_atomic(results, json.dumps({"by_machine": recorded}, indent=2))
    write_text_atomic(results.with_suffix(".md"), "\n".join(
        f"## {k}\n\n" + (markdown(v) if "recipe" in v else "") + (gpu_markdown(v["gpu_training"])
                                                                    if "gpu_training" in v else "")
        for k, v in sorted(recorded.items())))
    return results


def machine_kind(m: dict[str, Any]) -> str:
    """The kind of machine a run's numbers hold for, e.g. `intel-avx512-amx`, `amd-avx2`, `gpu-nvidia-h100`: a
    run replaces only the last run of its own kind in bench/results.json."""
    if m.get("gpu"):
        return "gpu-" + "-".join(m["gpu"].lower().split()[:3])
    name = m["cpu"].lower()
    vendor = "amd" if "amd" in name else "intel" if "intel" in name else "cpu"
    isa = "avx512" if "avx512f" in m["flags"] else "avx2" if "avx2" in m["flags"] else "x86"
    return f"{vendor}-{isa}" + ("-amx" if "amx_tile" in m["flags"] else "")


def recorded_runs(path: Path) -> dict[str, dict[str, Any]]:
    """The last run of each machine kind in bench/results.json (a file from before kinds were kept is one run)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if "by_machine" in data:
        return data["by_machine"]
    return {machine_kind(data["machine"]): data} if "machine" in data else {}
