"""`tunebook app`: base vs fine-tuned, side by side and streaming, in the browser (Gradio).

A thin layer over what eval already has: prompts from `prompts.py` (the training template and stop tokens),
generation from `generation.py`, SQL through eval's sandbox (`metrics.query_table`), the report, chart and loss
curve that `tunebook eval`/`train` wrote. The functions below do the work and are tested on their own;
`build_ui` only lays them out.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunebook.config import DEFAULT_MAX_NEW_TOKENS, RECIPES_DIR, Recipe, load_recipe
from tunebook.errors import RecipeError
from tunebook.outputs import ADAPTER_WEIGHTS, RUN_INFO_FILE, fine_tuned_dir, gguf_dir, report_dir

N_EXAMPLES = 6
SIDES = ("base", "fine_tuned")
# Server-side bounds on one request, whatever the page or an API client sends.
MAX_NEW_TOKENS = 1024
MAX_PROMPT_TOKENS = 4096
MAX_INPUT_CHARS = 50_000
QUEUE_SIZE = 16


class AppError(Exception):
    """A problem the page shows as a message (bad input, a missing model)."""


@dataclass
class Loaded:
    """One recipe's model, loaded once: the fine-tuned side is the adapter switched on, the base side off."""

    recipe: Recipe
    tokenizer: Any
    model: Any
    has_adapter: bool
    # Held for each forward pass: the adapter on/off switch is the model's own state, shared by all requests.
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Settings:
    """Generation settings; the recipe's eval settings are the defaults."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def bounded(self) -> Settings:
        """The settings clamped to what the server allows (a client can send anything)."""
        return Settings(max(1, min(int(self.max_new_tokens), MAX_NEW_TOKENS)),
                        max(0.0, min(float(self.temperature), 2.0)), max(0.05, min(float(self.top_p), 1.0)),
                        max(1.0, min(float(self.repetition_penalty), 2.0)))


@dataclass
class AppSession:
    """The recipes the app offers and the one model it holds (loaded lazily, on first use)."""

    names: list[str] = field(default_factory=list)
    loaded: Loaded | None = None
    loaded_name: str | None = None
    _loading: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if not self.names:
            self.names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))

    def recipe(self, name: str) -> Recipe:
        if name not in self.names:
            raise AppError(f"'{name}' is not one of this app's recipes ({', '.join(self.names)}).")
        try:
            return load_recipe(name)
        except RecipeError as exc:
            raise AppError(str(exc)) from None

    def load(self, name: str) -> Loaded:
        """The recipe's model, loading it (and dropping the previous one) only when it changes."""
        with self._loading:
            if self.loaded is not None and self.loaded_name == name:
                return self.loaded
            recipe = self.recipe(name)
            self.loaded, self.loaded_name = None, None  # the previous model goes before the next one loads
            self.loaded, self.loaded_name = load_pair(recipe), name
            return self.loaded


def recipe_status(recipe: Recipe) -> dict[str, Any]:
    """What exists for a recipe: the adapter, exported GGUF files, the report; and what to run when it is missing."""
    adapter = fine_tuned_dir(recipe.name) / ADAPTER_WEIGHTS
    ggufs = sorted(p.name for p in gguf_dir(recipe.name).glob("*.gguf")) if gguf_dir(recipe.name).exists() else []  # merged files and the adapter file
    return {"adapter": adapter.exists(), "gguf": ggufs, "report": (report_dir(recipe.name) / "report.json").exists(),
            "train_command": f"make train RECIPE={recipe.command_name}"}


def adapter_warning(recipe: Recipe) -> str | None:
    """Why the adapter on disk is not the recipe's run (trained from another version of it), or None."""
    from tunebook.runs import adapter_mismatch, identify

    try:
        changes = adapter_mismatch(identify(recipe))
    except (RecipeError, OSError):
        return None
    return f"the adapter was not trained by this recipe as it is now ({'; '.join(changes)})" if changes else None


def status_line(recipe: Recipe) -> str:
    status = recipe_status(recipe)
    parts = [f"**{recipe.name}** — {recipe.model.name}, task `{recipe.task}`."]
    if status["adapter"]:
        parts.append(f"Adapter: `{fine_tuned_dir(recipe.name)}`.")
        warning = adapter_warning(recipe)
        if warning:
            parts.append(f"**Warning:** {warning}; retrain with `{status['train_command']} ARGS=--force`.")
    else:
        parts.append(f"No adapter yet: only the base model answers. Train one with `{status['train_command']}`.")
    if status["gguf"]:
        parts.append(f"Exported GGUF: {', '.join(status['gguf'])} in `{gguf_dir(recipe.name)}`.")
    return " ".join(parts)


def load_pair(recipe: Recipe) -> Loaded:
    """Base model (+ the adapter when trained), as eval loads them."""
    from tunebook.models import load_model, load_tokenizer, resolve_model_path
    from tunebook.validate import check_adapter

    adapter_dir = fine_tuned_dir(recipe.name)
    has_adapter = (adapter_dir / ADAPTER_WEIGHTS).exists()
    try:
        if has_adapter:
            check_adapter(adapter_dir, recipe)
        model_path = resolve_model_path(recipe.model.name)
        tokenizer = load_tokenizer(str(adapter_dir) if has_adapter else model_path, recipe.model.trust_remote_code)
        model = load_model(model_path, recipe.model, for_training=False)
    except RecipeError as exc:
        raise AppError(str(exc)) from None
    except OSError as exc:
        raise AppError(f"cannot load {recipe.model.name}: {exc}. Run `make setup`, or check model.name in "
                       f"{recipe.source}.") from None
    if has_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    return Loaded(recipe, tokenizer, model, has_adapter)


def eval_examples(recipe: Recipe, n: int = N_EXAMPLES) -> list[dict]:
    """The first rows eval scores (after `eval.where`), to click; none when the test split is not built."""
    from tunebook.evaluate import load_eval_rows

    try:
        rows, _ = load_eval_rows(recipe, None)
    except RecipeError:
        return []
    return rows[:n]


def example_label(row: dict) -> str:
    from tunebook.prompts import user_message

    text = user_message(row).strip().splitlines()[-1]
    return text if len(text) <= 90 else text[:87] + "..."


def build_request(instruction: str, input_text: str, conversation: str) -> dict:
    """The example to answer: a chat conversation (JSON list of turns) when one is given, else instruction + input."""
    from tunebook.data import check_chat_row

    if len(instruction) + len(input_text) + len(conversation) > MAX_INPUT_CHARS:
        raise AppError(f"The question is longer than this app accepts ({MAX_INPUT_CHARS} characters).")
    if conversation and conversation.strip():
        try:
            messages = json.loads(conversation)
        except json.JSONDecodeError as exc:
            raise AppError(f"The conversation is not valid JSON ({exc.msg}, line {exc.lineno}). Write a list of "
                           '{"role": ..., "content": ...} turns.') from None
        if isinstance(messages, dict) and "messages" in messages:
            messages = messages["messages"]
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") == "assistant":
            messages = messages[:-1]  # a pasted example with its answer: ask for the answer instead
        probe = {"messages": [*messages, {"role": "assistant", "content": "?"}]} if isinstance(messages, list) \
            else {"messages": messages}
        try:
            check_chat_row(probe, "the conversation", "turns")
        except RecipeError as exc:
            raise AppError(str(exc).replace("the conversation: turns: ", "The conversation: ")) from None
        if messages[-1]["role"] != "user":
            raise AppError("The conversation must end with a user turn: the models answer it.")
        return {"messages": messages}
    if not instruction.strip() and not input_text.strip():
        raise AppError("Write an instruction (and an input if the task has one), or pick a test example.")
    return {"instruction": instruction.strip() or input_text.strip(),
            "input": input_text.strip() if instruction.strip() else ""}


def stream_answers(loaded: Loaded, request: dict, settings: Settings) -> Iterator[dict[str, str]]:
    """{side: answer so far} after each token, base and fine-tuned side by side (base only without an adapter).

    Settings are clamped to the server's bounds and a prompt longer than MAX_PROMPT_TOKENS is refused. Each forward
    pass holds the model's lock, so concurrent requests interleave token by token without switching each other's
    adapter off.
    """
    from tunebook.generation import stream_side_by_side
    from tunebook.prompts import encode_prompt

    settings = settings.bounded()
    prompt_tokens = len(encode_prompt(loaded.tokenizer, request, loaded.recipe.data.system_prompt))
    if prompt_tokens > MAX_PROMPT_TOKENS:
        raise AppError(f"The prompt is {prompt_tokens} tokens; this app answers prompts of up to {MAX_PROMPT_TOKENS}.")
    sides = SIDES if loaded.has_adapter else ("base",)
    yield from stream_side_by_side(
        loaded.model, loaded.tokenizer, request, loaded.recipe.data.system_prompt, settings.max_new_tokens, sides,
        temperature=settings.temperature, top_p=settings.top_p, repetition_penalty=settings.repetition_penalty,
        lock=loaded.lock)


def verified_answer(loaded: Loaded, request: dict, db_path: Path, max_new_tokens: int) -> tuple[str, str]:
    """The fine-tuned model's answer with verified decoding, as eval's `fine-tuned verified` column gives it (a
    grammar of the database, the query must run and return rows, then schema repair and sampled candidates:
    `verify.py`), and how it was chosen. SQL recipes only; the model's lock is held for the whole decode."""
    from tunebook.verify import Tally, hf_verified, verifier_for

    verifier = verifier_for(loaded.recipe)
    if verifier is None or not loaded.has_adapter:
        raise AppError("Verified decoding needs a trained adapter and a task whose answers can be checked (SQL).")
    recipe = dataclasses.replace(loaded.recipe, eval=dataclasses.replace(
        loaded.recipe.eval, max_new_tokens=max(1, min(int(max_new_tokens), MAX_NEW_TOKENS))))
    got: dict[int, str] = {}
    tally = Tally()
    with loaded.lock:
        hf_verified(loaded.model, loaded.tokenizer, [{**request, "db_path": str(db_path)}], None,
                    lambda idx, answers: got.update(zip(idx, answers, strict=True)), data_file=db_path,
                    recipe=recipe, verifier=verifier, tally=tally)
    how = next(name for name, count in tally.as_dict().items() if count)
    return got[0], how.replace("_", " ")


def sql_databases(recipe: Recipe) -> list[str]:
    """The databases the app offers for a SQL recipe: the SQLite files beside its test split."""
    folder = databases_folder(recipe)
    return sorted(p.stem for p in folder.glob("*.sqlite")) if "sql_execution" in recipe.eval.metrics else []


def databases_folder(recipe: Recipe) -> Path:
    from tunebook.metrics import db_path_for

    return db_path_for({"db_id": "x"}, Path(recipe.data.test)).parent


def sql_database(recipe: Recipe, db_id: str | None) -> Path | None:
    """The SQLite file of one of the recipe's own databases; any other name (a path, `..`) is refused.

    The id comes from the page, so from anyone who can reach it: it must be one of `sql_databases(recipe)`, and
    the file it names must lie inside the recipe's databases folder. The message never shows a path.
    """
    if not db_id:
        return None
    refusal = AppError("That database is not one of this recipe's databases. Pick one from the list.")
    if db_id not in sql_databases(recipe):
        raise refusal
    folder = databases_folder(recipe).resolve()
    path = (folder / f"{db_id}.sqlite").resolve()
    if not path.is_relative_to(folder) or not path.is_file():
        raise refusal
    return path


def sql_result(db_path: Path, answer: str, gold: str | None) -> dict[str, Any]:
    """One answer's query run in eval's sandbox: columns, rows, error, and whether it matches the gold result."""
    from tunebook.metrics import extract_sql, gold_result, is_ordered, same_result
    from tunebook.sandbox import query_table

    sql = extract_sql(answer)
    if not sql:
        return {"sql": sql, "columns": [], "rows": [], "error": "no query: the answer is empty", "matches_gold": None}
    columns, rows, error = query_table(db_path, sql)
    verdict = None
    if gold and error is None:
        expected = gold_result(db_path, gold)
        verdict = None if expected.error else same_result(rows, expected.rows, is_ordered(gold))
    return {"sql": sql, "columns": columns, "rows": rows or [], "error": error, "matches_gold": verdict}


def sql_verdict(result: dict[str, Any]) -> str:
    if result["error"] and "not authorized" in result["error"]:
        return "The sandbox refused the query: it allows only reading (no writes, no schema changes, no ATTACH)."
    if result["error"]:
        return f"The query does not run: {result['error']}"
    head = f"{len(result['rows'])} rows."
    if result["matches_gold"] is None:
        return head + " (no gold answer to compare with)"
    return head + (" ✓ **matches the gold answer**" if result["matches_gold"] else " ✗ **differs from the gold answer**")


def report_view(recipe: Recipe) -> dict[str, Any]:
    """The eval report's tables, chart and the training loss curve and highlights, where they exist."""
    from tunebook.reporting import metrics_table, shape_table

    folder, trained = report_dir(recipe.name), fine_tuned_dir(recipe.name)
    parts = []
    report_file = folder / "report.json"
    if report_file.exists():
        report = json.loads(report_file.read_text())
        parts += [f"### Eval report ({report['n_examples']} examples, headline `{report['main_metric']}`)", "",
                  metrics_table(report)]
        if report.get("by_shape"):
            parts += ["", f"#### By shape ({report['main_metric']})", "", shape_table(report)]
    else:
        parts.append(f"No eval report yet: `make eval RECIPE={recipe.command_name}` writes one.")
    info_file = trained / RUN_INFO_FILE
    if info_file.exists():
        info = json.loads(info_file.read_text())
        keys = [("global_steps", "steps"), ("tokens_seen", "tokens"), ("train_tokens_per_s", "tokens/s"),
                ("train_runtime_s", "training s"), ("eval_loss_before", "eval loss before"),
                ("eval_loss_after", "eval loss after"), ("peak_memory_mb", "peak memory MB"), ("device", "device")]
        rows = [f"| {label} | {_fmt(info[k])} |" for k, label in keys if info.get(k) is not None]
        parts += ["", f"### Training ({RUN_INFO_FILE})", "", "| | |", "|---|---:|", *rows]
    chart, curve = folder / "chart.png", trained / "loss_curve.png"
    return {"markdown": "\n".join(parts), "chart": str(chart) if chart.exists() else None,
            "loss_curve": str(curve) if curve.exists() else None}


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- the page


def build_ui(session: AppSession) -> Any:
    """The Gradio Blocks page over an AppSession."""
    import gradio as gr

    first = session.names[0]
    with gr.Blocks(title="tunebook: base vs fine-tuned") as page:
        gr.Markdown("# tunebook — base vs fine-tuned, side by side")
        with gr.Row():
            recipe_box = gr.Dropdown(recipe_choices(session), value=first, label="recipe", scale=1)
            status = gr.Markdown(elem_id="recipe-status")
        rows_state, picked_state = gr.State([]), gr.State(None)
        examples = gr.Radio([], label="test examples (click one)", elem_id="examples")
        with gr.Row():
            instruction = gr.Textbox(label="instruction", lines=2, elem_id="instruction")
            # Custom values pass Gradio (its check would use the empty choices it was built with, not the recipe's);
            # `sql_database` accepts only the recipe's own databases, whatever a client sends.
            db_box = gr.Dropdown([], label="database (SQL)", visible=False, allow_custom_value=True)
        input_box = gr.Textbox(label="input", lines=6, elem_id="input")
        with gr.Accordion("chat conversation (JSON; used instead of instruction + input when filled)", open=False):
            conversation = gr.Code(language="json", label="conversation", elem_id="conversation")
        with gr.Accordion("generation settings", open=False):
            max_new = gr.Slider(1, MAX_NEW_TOKENS, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="max new tokens")
            temperature = gr.Slider(0, 2, value=0, step=0.05, label="temperature (0 = greedy, as eval)")
            top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="top-p")
            penalty = gr.Slider(1, 2, value=1, step=0.05, label="repetition penalty")
        verified_box = gr.Checkbox(False, label="also verified decoding (SQL: names only what the database has, the "
                                   "query must run; as eval's `fine-tuned verified`)", visible=False,
                                   elem_id="verified")
        go = gr.Button("Generate", variant="primary", elem_id="generate")
        run_status = gr.Markdown(elem_id="run-status")
        with gr.Row():
            with gr.Column():
                gr.Markdown("### base")
                base_out = gr.Textbox(label="base answer", lines=8, elem_id="base-answer")
                base_verdict = gr.Markdown()
                base_table = gr.Dataframe(label="base result", interactive=False)
            with gr.Column():
                gr.Markdown("### fine-tuned")
                tuned_out = gr.Textbox(label="fine-tuned answer", lines=8, elem_id="tuned-answer")
                tuned_verdict = gr.Markdown()
                tuned_table = gr.Dataframe(label="fine-tuned result", interactive=False)
                verified_out = gr.Markdown(elem_id="verified-answer")
        with gr.Accordion("eval report and training", open=False):
            report_md = gr.Markdown()
            with gr.Row():
                chart = gr.Image(label="eval chart", type="filepath")
                curve = gr.Image(label="loss curve", type="filepath")

        # Callbacks return {component: value}; a component left out keeps what it shows.
        def recipe_changed(name: str) -> dict:
            cleared = {instruction: "", input_box: "", conversation: ""}
            try:
                recipe = session.recipe(name)
            except AppError as exc:
                return {**cleared, status: f"**error:** {exc}", examples: gr.update(choices=[], value=None),
                        db_box: gr.update(choices=[]), verified_box: gr.update(visible=False),
                        max_new: DEFAULT_MAX_NEW_TOKENS, report_md: "",
                        chart: None, curve: None, rows_state: []}
            rows = eval_examples(recipe)
            view = report_view(recipe)
            databases = sql_databases(recipe)
            return {**cleared, status: status_line(recipe),
                    examples: gr.update(choices=[example_label(r) for r in rows], value=None),
                    db_box: gr.update(choices=databases, value=None, visible=bool(databases)),
                    verified_box: gr.update(visible=bool(databases)),
                    max_new: recipe.eval.max_new_tokens, report_md: view["markdown"], chart: view["chart"],
                    curve: view["loss_curve"], rows_state: rows}

        def example_picked(label: str | None, rows: list[dict]) -> dict:
            row = next((r for r in rows if example_label(r) == label), None)
            if row is None:
                return {picked_state: None}
            from tunebook.prompts import chat_messages, reference_answer

            picked = {db_box: row.get("db_id"), picked_state: {"row": row, "gold": reference_answer(row)}}
            if "messages" in row:
                conversation_json = json.dumps(chat_messages(row), indent=1, ensure_ascii=False)
                return {**picked, instruction: "", input_box: "", conversation: conversation_json}
            return {**picked, instruction: row["instruction"], input_box: row.get("input") or "", conversation: ""}

        blank = {"headers": ["result"], "data": [[""]]}

        def answers_view(texts: dict[str, str], run: str, verdicts: tuple[str, str] = ("", ""),
                         tables: tuple[dict, dict] = (blank, blank), verified: str = "") -> dict:
            return {base_out: texts.get("base", ""), tuned_out: texts.get("fine_tuned", ""), run_status: run,
                    base_verdict: verdicts[0], tuned_verdict: verdicts[1], base_table: tables[0],
                    tuned_table: tables[1], verified_out: verified}

        def answer(name, instruction_text, input_text, conversation_json, db_id, picked, max_new_tokens,
                   temperature_value, top_p_value, penalty_value, verified=False):
            try:
                request = build_request(instruction_text or "", input_text or "", conversation_json or "")
                recipe = session.recipe(name)
                db_path = sql_database(recipe, db_id) if sql_databases(recipe) else None
                no_adapter = f"_No adapter yet: train one with `{recipe_status(recipe)['train_command']}`._"
                started = time.perf_counter()
                yield answers_view({}, "_loading the model (once per recipe)…_")
                loaded = session.load(name)
                settings = Settings(int(max_new_tokens), float(temperature_value), float(top_p_value),
                                    float(penalty_value))
                first_token, texts = None, {}
                for texts in stream_answers(loaded, request, settings):
                    first_token = first_token or time.perf_counter() - started
                    yield answers_view({"fine_tuned": no_adapter, **texts}, "_generating…_")
                total = time.perf_counter() - started
                run = f"first token after {first_token or 0:.1f} s; both answers in {total:.1f} s"
                verdicts, tables = ["", ""], [blank, blank]
                if db_path is not None:
                    gold = (picked or {}).get("gold") if _same_request(picked, request) else None
                    for i, side in enumerate(SIDES):
                        if side in texts:
                            result = sql_result(db_path, texts[side], gold)
                            verdicts[i] = sql_verdict(result)
                            tables[i] = {"headers": result["columns"] or ["result"],
                                         "data": [list(r) for r in result["rows"][:200]] or [[""]]}
                shown = {"fine_tuned": no_adapter, **texts}
                yield answers_view(shown, run, tuple(verdicts), tuple(tables))
                if verified and db_path is not None:
                    yield answers_view(shown, run + "; _verified decoding…_", tuple(verdicts), tuple(tables))
                    text, how = verified_answer(loaded, request, db_path, int(max_new_tokens))
                    gold = (picked or {}).get("gold") if _same_request(picked, request) else None
                    note = (f"**fine-tuned verified** ({how}):\n\n```sql\n{text}\n```\n\n"
                            f"{sql_verdict(sql_result(db_path, text, gold))}")
                    yield answers_view(shown, f"{run}; verified in {time.perf_counter() - started - total:.1f} s",
                                       tuple(verdicts), tuple(tables), note)
            except (AppError, RecipeError) as exc:
                yield answers_view({}, f"**error:** {exc}")
            except Exception as exc:  # never a dead page: the message, and where the traceback went
                import logging

                logging.getLogger("tunebook").exception("app error")
                yield answers_view({}, f"**error:** {type(exc).__name__}: {exc}")

        changed_outputs = {status, examples, instruction, input_box, conversation, db_box, verified_box, max_new,
                           report_md, chart, curve, rows_state}
        recipe_box.change(recipe_changed, recipe_box, changed_outputs, api_name=False)
        page.load(recipe_changed, recipe_box, changed_outputs, api_name=False)
        examples.change(example_picked, [examples, rows_state],
                        {instruction, input_box, conversation, db_box, picked_state}, api_name=False)
        go.click(answer, [recipe_box, instruction, input_box, conversation, db_box, picked_state, max_new,
                          temperature, top_p, penalty, verified_box],
                 [base_out, tuned_out, run_status, base_verdict, tuned_verdict, base_table, tuned_table,
                  verified_out], api_name="answer")
    return page


def recipe_choices(session: AppSession) -> list[tuple[str, str]]:
    """(label, name) for the dropdown: trained recipes first, each marked with what exists for it."""
    out = []
    for name in session.names:
        try:
            status = recipe_status(session.recipe(name))
        except AppError:
            out.append((f"{name} (recipe error)", name))
            continue
        marks = ["adapter" if status["adapter"] else "no adapter yet"] + (["GGUF"] if status["gguf"] else [])
        out.append((f"{Path(name).stem} ({', '.join(marks)})", name))
    return sorted(out, key=lambda choice: "no adapter yet" in choice[0])


def _same_request(picked: dict | None, request: dict) -> bool:
    """The gold answer applies only while the question is the picked example's, unedited."""
    if not picked:
        return False
    row = picked["row"]
    if "messages" in request:
        return "messages" in row and row["messages"][:-1] == request["messages"]
    return row.get("instruction", "").strip() == request["instruction"] and \
        (row.get("input") or "").strip() == request["input"]


def launch(names: list[str], host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           block: bool = True) -> Any:
    """Start the page (127.0.0.1 unless told otherwise; a public share link only with `share`)."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    session = AppSession(list(names))
    for name in session.names:
        session.recipe(name)  # a broken recipe is an error now, not a dead page later
    page = build_ui(session)
    page.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    page.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True,
                show_error=True)
    print(f"tunebook app: {page.local_url}" + (f"  public: {page.share_url}" if share and page.share_url else "")
          + f"  ({len(session.names)} recipe{'s' if len(session.names) != 1 else ''}; Ctrl+C stops)", flush=True)
    if block:
        page.block_thread()
    return page
