"""The `tunebook` command: validate, data, train, eval, export, demo, bench — each takes a recipe and dotted overrides."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tunebook.errors import RecipeError, SourceMissing


def cmd_validate(args: argparse.Namespace) -> int:
    from tunebook.config import load_recipe
    from tunebook.plan import tier_of
    from tunebook.validate import validate_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    report = validate_recipe(recipe, tier=tier_of(args.tier))
    sizes = ", ".join(f"{k} {len(v)}" for k, v in report.splits.items())
    print(f"{recipe.source}: ok ({recipe.model.name}, task {recipe.task}; {sizes})")
    for note in report.notes:
        print(f"  note: {note}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from tunebook.builders import build_task
    from tunebook.tasks import dataset_builders

    known = dataset_builders()
    unknown = [t for t in args.tasks if t not in known]
    if unknown:
        raise RecipeError("tunebook data", None, f"no dataset builder for {', '.join(map(repr, unknown))}.",
                          f"Built-in datasets: {', '.join(known)}. For your own task, point a recipe's "
                          "data.train/val/test at your files instead (`tunebook new` writes such a recipe).")
    for task in args.tasks:
        stats = build_task(task, Path(args.out), Path(args.sources), args.seed)
        print(f"{task}: {stats['sizes']} -> {args.out}/{task}/")
    return 0


def cmd_sql_rows(args: argparse.Namespace) -> int:
    from tunebook.builders.sql import rows_for_database
    from tunebook.outputs import write_text_atomic

    rows = rows_for_database(Path(args.database), Path(args.questions))
    write_text_atomic(Path(args.out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} rows for {Path(args.database).name} -> {args.out} (tunebook eval RECIPE --data {args.out})")
    return 0


def cmd_new(args: argparse.Namespace) -> int:
    from tunebook.scaffold import new_recipe, next_steps

    out = new_recipe(args.name, args.template, args.task, force=args.force)
    print(f"wrote {out} (from {args.template}, task {args.task})")
    print(next_steps(args.name, args.task))
    return 0


def load_run_recipe(args: argparse.Namespace):
    """The recipe with the command line's overrides and `--name` label."""
    from tunebook.config import load_recipe
    from tunebook.runs import check_label

    recipe = load_recipe(args.recipe, args.overrides)
    recipe.run_label = check_label(getattr(args, "name", None))
    return recipe


def cmd_train(args: argparse.Namespace) -> int:
    from tunebook.outputs import is_main_process
    from tunebook.train import train

    out = train(load_run_recipe(args), force=args.force, force_resume=args.force_resume)
    if is_main_process():
        print_train_summary(out)
    return 0


def print_train_summary(out: Path) -> None:
    from tunebook.outputs import ADAPTER_WEIGHTS, RUN_INFO_FILE

    print(f"adapter: {out}/{ADAPTER_WEIGHTS}")
    print(f"loss curve: {out}/loss_curve.png")
    print(f"run info: {out}/{RUN_INFO_FILE}")


def cmd_eval(args: argparse.Namespace) -> int:
    from tunebook.evaluate import evaluate

    recipe = load_run_recipe(args)
    gguf = None
    if args.gguf:
        gguf = recipe.export.gguf if args.gguf == "exported" else [t.strip() for t in args.gguf.split(",") if t.strip()]
    if args.verified_gguf and not gguf:
        raise RecipeError(recipe.source, "--verified-gguf", "needs GGUF files to run.", "Add --gguf (or --gguf TYPES).")
    print_eval_summary(evaluate(recipe, which=args.model, data=args.data, gguf=gguf, force=args.force,
                                gguf_verified=args.verified_gguf))
    return 0


def print_eval_summary(out: Path) -> None:
    """The report's tables on the console: overall, each subset, by shape; then where the files are."""
    from tunebook.reporting import columns, error_table, metrics_table, shape_table, view

    report = json.loads((out / "report.json").read_text())
    print(metrics_table(report))
    for note in report.get("notes", []):
        print(f"note: {note}")
    main = report["main_metric"]
    for name, subset in report["subsets"].items():
        shown = [f"{header} {metrics[main]:.1f}" for header, metrics in columns(view(subset)) if main in metrics]
        print(f"{name} ({subset['n_examples']} examples), {main}: " + ", ".join(shown))
    errors = error_table(report)
    if errors:
        print("\nwhat kind of answer (percent of rows):\n" + errors)
    if report.get("by_shape"):
        print(f"\nby shape ({main}):\n" + shape_table(report))
    print(f"report: {out}/report.md  chart: {out}/chart.png  predictions: {out}/predictions.jsonl")


def cmd_export(args: argparse.Namespace) -> int:
    from tunebook.export import export

    print_export_summary(export(load_run_recipe(args), verify=args.verify, force=args.force))
    return 0


def print_export_summary(result: dict) -> None:
    from tunebook.outputs import gguf_dir, merged_dir

    run = result["run"]
    print(f"merged model: {merged_dir(run)}")
    for qtype, check in result["checked"].items():
        agree = check.get("agreement")
        extra = (f", top-1 agreement {agree['top1_agree']}/{agree['positions']} (confident positions "
                 f"{agree['confident_agree']}/{agree['confident_positions']}), exact outputs "
                 f"{agree['exact_outputs']}/{agree['prompts']}") if agree else ""
        print(f"gguf {qtype}: {check['size_mb']} MB, types {check['tensor_types']}{extra}")
    control = result.get("control_base_without_adapter")
    if control:
        print(f"control (base without adapter, f16): top-1 agreement {control['top1_agree']}/{control['positions']}, "
              f"exact outputs {control['exact_outputs']}/{control['prompts']}")
    for note in result.get("notes", []):
        print(f"note: {note}")
    print(f"Modelfile: {gguf_dir(run)}/Modelfile   verification: {gguf_dir(run)}/verify.json")


DEMO_STAGES = ("train", "eval", "export", "eval_gguf")


def cmd_demo(args: argparse.Namespace) -> int:
    """train -> eval -> export -> eval of the smallest quantised GGUF file, each stage timed
    (reports/<run>.demo-times.json)."""
    import time

    from tunebook.bench import machine
    from tunebook.config import UNQUANTISED_GGUF_TYPES
    from tunebook.evaluate import evaluate
    from tunebook.export import export
    from tunebook.outputs import demo_times_file, write_text_atomic
    from tunebook.runs import identify
    from tunebook.train import train

    recipe = load_run_recipe(args)
    # The file that ships smallest: what quantisation costs, measured on it (`tunebook eval --gguf` runs the rest).
    quantised = ([t for t in recipe.export.gguf if t not in UNQUANTISED_GGUF_TYPES] or recipe.export.gguf)[-1:]
    stages = {
        "train": lambda: print_train_summary(train(recipe)),
        "eval": lambda: print_eval_summary(evaluate(recipe)),
        "export": lambda: print_export_summary(export(recipe)),
        "eval_gguf": lambda: print_eval_summary(evaluate(recipe, gguf=quantised)),
    }
    seconds: dict[str, float] = {}
    for stage in DEMO_STAGES:
        print(f"\n== {stage.replace('_', ' ')} ==")
        started = time.perf_counter()
        stages[stage]()
        seconds[stage] = round(time.perf_counter() - started, 1)
    total = round(sum(seconds.values()), 1)
    write_text_atomic(demo_times_file(identify(recipe).name), json.dumps(
        {"recipe": recipe.name, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stage_seconds": seconds,
         "total_seconds": total, "machine": machine()}, indent=2))
    print("\ndemo stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items())
          + f"; total {total:.0f}s (install and data build not counted)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from tunebook.config import load_recipe
    from tunebook.plan import plan, render

    recipe = load_recipe(args.recipe, args.overrides)
    result = plan(recipe, gpus=args.gpus, gpu_memory_gib=args.gpu_memory, tier_file=args.tier)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    from tunebook.app import AppError, launch

    try:
        launch(args.recipes, host=args.host, port=args.port, share=args.share)
    except AppError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tunebook.config import load_recipe
    from tunebook.serve import serve

    recipes = [load_recipe(name) for name in args.recipes]
    serve(recipes, qtype=args.gguf, adapter=args.adapter, host=args.host, port=args.port)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tunebook.bench import RESULTS, TABLE, markdown, record_gpu, run

    if args.gpu:
        from tunebook.gpu_bench import bench_gpu
        from tunebook.gpu_bench import markdown as gpu_markdown

        result = bench_gpu(tiny=args.tiny, steps=args.steps if args.steps != 12 else 6)
        print(gpu_markdown(result))
        print(f"results: {record_gpu(result)}")
        return 0
    results = run(args.recipe, steps=args.steps, eval_examples=args.eval_examples, quick=args.quick,
                  repeats=args.repeats, only=args.only.split(",") if args.only else None)
    print(markdown(results))
    where = (RESULTS, TABLE) if not args.quick else (RESULTS.with_name("quick.json"), TABLE.with_name("quick.md"))
    print(f"results: {where[0]}  table: {where[1]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunebook", description=__doc__)
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true",
                         help="show library logs, warnings and progress bars on the console too")
    sub = parser.add_subparsers(dest="command", required=True)

    def recipe_command(name: str, help_text: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, parents=[verbose])
        p.add_argument("recipe", help="recipe path or name (e.g. smollm2-sql)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.learning_rate=1e-4 lora.r=32")
        p.set_defaults(func=func)
        return p

    def run_name_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--name", metavar="LABEL", default=None,
                       help="give this run its own outputs, <recipe>@LABEL (default: the recipe's name, or "
                            "<recipe>@<fingerprint> when overrides change the run)")

    va = recipe_command("validate", "check a recipe and its data before any model loads", cmd_validate)
    va.add_argument("--tier", default=None, metavar="FILE",
                    help="also check the recipe against this accelerate config (e.g. accelerate_configs/fsdp.yaml)")
    tr = recipe_command("train", "fine-tune with LoRA/QLoRA via trl.SFTTrainer", cmd_train)
    tr.add_argument("--force", action="store_true",
                    help="train from scratch even if this run finished or has checkpoints (they are moved aside)")
    tr.add_argument("--force-resume", action="store_true",
                    help="resume a checkpoint even though the recipe or data changed since it was written")
    run_name_option(tr)
    ev = recipe_command("eval", "base vs fine-tuned report on the test split", cmd_eval)
    ev.add_argument("--data", help="evaluate on this JSONL instead of data.test (SQL rows may carry db_path)")
    ev.add_argument("--model", choices=["base", "fine_tuned", "both"], default="both")
    ev.add_argument("--gguf", nargs="?", const="exported", metavar="TYPES",
                    help="also run the exported GGUF files through llama.cpp on the same rows: every type in "
                         "export.gguf, or a comma list (e.g. q8_0,q4_k_m)")
    ev.add_argument("--force", action="store_true",
                    help="evaluate the adapter even if another run trained it (the report says how it differs)")
    ev.add_argument("--verified-gguf", action="store_true",
                    help="also run the GGUF files with verified decoding (llama.cpp's GBNF grammar; slower)")
    run_name_option(ev)
    ex = recipe_command("export", "merged model, GGUF files and an Ollama Modelfile", cmd_export)
    ex.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                    help="compare GGUF greedy outputs with the merged model (needs llama-cpp-python)")
    ex.add_argument("--force", action="store_true",
                    help="export the adapter even if another run trained it (verify.json says how it differs)")
    run_name_option(ex)
    pl = recipe_command("plan", "memory per device and the tier to launch, before anything loads", cmd_plan)
    pl.add_argument("--gpus", type=int, default=1, help="GPUs to spread over (default 1)")
    pl.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                    help="memory of each GPU in GiB (default: a CPU plan for the CPU recipes, else 80)")
    pl.add_argument("--tier", default=None, metavar="FILE", help="an accelerate config (default: recommend one)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    run_name_option(recipe_command("demo", "train, eval, export, then eval the quantised GGUF files; stage times "
                                   "recorded", cmd_demo))
    app = sub.add_parser("app", help="base vs fine-tuned side by side in the browser (Gradio)", parents=[verbose])
    app.add_argument("recipes", nargs="*", help="recipes to offer (default: every recipe in recipes/)")
    app.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    app.add_argument("--port", type=int, default=None, help="port (default 7860, or the next free one)")
    app.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    app.set_defaults(func=cmd_app, overrides=[])
    serve = sub.add_parser("serve", help="an OpenAI-compatible endpoint over the exported GGUF (llama.cpp's server)",
                           parents=[verbose])
    serve.add_argument("recipes", nargs="+", help="recipes whose exports to serve (each is a model name)")
    serve.add_argument("--gguf", default=None, metavar="TYPE",
                       help="the exported type to serve, e.g. q8_0 (default: the smallest one export checked)")
    serve.add_argument("--adapter", action="store_true",
                       help="serve the base GGUF with each recipe's LoRA adapter GGUF (one base in memory)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.set_defaults(func=cmd_serve, overrides=[])
    bench = sub.add_parser("bench", help="training and eval speed vs plain baselines on this machine",
                           parents=[verbose])
    bench.add_argument("recipe", nargs="?", default="smollm2-sql")
    bench.add_argument("--steps", type=int, default=12, help="training steps per timed run")
    bench.add_argument("--eval-examples", type=int, default=48)
    bench.add_argument("--repeats", type=int, default=3, help="runs of each measurement (medians, min and max)")
    bench.add_argument("--quick", action="store_true", help="a smoke run (writes bench/quick.*, not results)")
    bench.add_argument("--gpu", action="store_true",
                       help="QLoRA training of the seed models (random weights, real size) vs plain Trainer + PEFT")
    bench.add_argument("--tiny", action="store_true", help="with --gpu: tiny configs, a smoke run on any machine")
    bench.add_argument("--only", default=None, metavar="PARTS",
                       help="comma-separated parts to run (training, eval, sql_scoring, memory, serve); the others "
                            "are kept from this machine's last results")
    bench.set_defaults(func=cmd_bench, overrides=[])
    new = sub.add_parser("new", help="a new recipe for your own task, copied from an existing recipe",
                         parents=[verbose])
    new.add_argument("name", help="the new recipe's name (written to recipes/NAME.yaml)")
    new.add_argument("--from", dest="template", default="smollm2-qa", help="the recipe to copy (default smollm2-qa)")
    new.add_argument("--task", required=True, help="your task's name; data goes to data/TASK/")
    new.add_argument("--force", action="store_true", help="replace recipes/NAME.yaml if it exists")
    new.set_defaults(func=cmd_new, overrides=[])
    rows = sub.add_parser("sql-rows", help="eval rows for your own SQLite database, in the training rows' form",
                          parents=[verbose])
    rows.add_argument("database", help="a SQLite file")
    rows.add_argument("questions", help='JSONL: {"question": "...", "sql": "..."} per line (more fields travel along)')
    rows.add_argument("--out", required=True, help="the JSONL to write (then: tunebook eval RECIPE --data OUT)")
    rows.set_defaults(func=cmd_sql_rows, overrides=[])
    data = sub.add_parser("data", help="build datasets into data/<task>/", parents=[verbose])
    data.add_argument("tasks", nargs="+")
    data.add_argument("--out", default="data")
    data.add_argument("--sources", default="build/sources")
    data.add_argument("--seed", type=int, default=42)
    data.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tunebook.console import log_path, setup_console
    from tunebook.outputs import log_file

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow options (`tunebook eval R --data F eval.limit=5`), which argparse leaves over.
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if argv is None:  # started from the shell: training commands restart once on an allocator that frees memory
        from tunebook.allocator import prepare

        try:
            prepare(args.command, sys.argv[1:])
        except RecipeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    name = args.command if args.command in ("data", "bench", "new", "app", "serve", "sql-rows") else Path(args.recipe).stem
    setup_console(log_file(name, args.command), args.verbose)
    try:
        return args.func(args)
    except (RecipeError, SourceMissing) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ntunebook {args.command}: interrupted. Outputs already in place were left as they were; run the "
              "same command again to continue (eval keeps the answers it generated, train resumes from its last "
              "checkpoint with training.resume_from_checkpoint: auto).", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            raise
        logging.getLogger("tunebook").exception("unexpected error")
        print(f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}\n"
              f"  (the full traceback is in {log_path()}; rerun with -v to see it here)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
