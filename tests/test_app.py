"""The Gradio app on the tiny model: its functions, the page through gradio_client, and a real headless browser."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from tunebook.app import (
    AppError,
    AppSession,
    build_request,
    eval_examples,
    example_label,
    recipe_status,
    report_view,
    sql_database,
    sql_result,
    sql_verdict,
    status_line,
    stream_answers,
)
from tunebook.config import load_recipe
from tunebook.train import train

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ARTIFACTS = Path("build/test-artifacts")


@pytest.fixture
def trained(tiny_recipe):
    recipe = load_recipe(tiny_recipe(training__max_steps=2, lora__init_lora_weights=False,
                                     eval__max_new_tokens=8, eval__limit=4))
    train(recipe)
    return recipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_side_by_side_stream_equals_eval_answers(trained):
    """The app's streamed answers are eval's greedy answers: base with the adapter off, fine-tuned with it on."""
    from tunebook.app import Settings
    from tunebook.generation import generate

    session = AppSession([trained.source])
    loaded = session.load(trained.source)
    assert loaded.has_adapter and session.load(trained.source) is loaded, "loaded once"
    row = eval_examples(trained)[0]
    request = build_request(row["instruction"], row["input"], "")
    steps = list(stream_answers(loaded, request, Settings(max_new_tokens=8)))
    assert len(steps) >= 2 and set(steps[-1]) == {"base", "fine_tuned"}
    assert all(len(a["fine_tuned"]) <= len(b["fine_tuned"]) for a, b in zip(steps, steps[1:], strict=False))
    system = trained.data.system_prompt
    with loaded.model.disable_adapter():
        base = generate(loaded.model, loaded.tokenizer, [request], system, 8, 1)[0]
    tuned = generate(loaded.model, loaded.tokenizer, [request], system, 8, 1)[0]
    assert steps[-1] == {"base": base, "fine_tuned": tuned}
    assert base != tuned, "control: the adapter changes the answer"
    sampled = list(stream_answers(loaded, request, Settings(max_new_tokens=8, temperature=1.0, top_p=0.9,
                                                             repetition_penalty=1.3)))[-1]
    assert set(sampled) == {"base", "fine_tuned"}


def test_sql_results_run_in_the_sandbox_and_are_marked_against_gold(trained):
    row = eval_examples(trained)[0]
    db = sql_database(trained, row["db_id"])
    right = sql_result(db, f"```sql\n{row['output']};\n```", row["output"])
    assert right["matches_gold"] is True and right["rows"] and right["columns"]
    assert "✓ **matches the gold answer**" in sql_verdict(right)
    wrong = sql_result(db, "SELECT 1", row["output"])
    assert wrong["matches_gold"] is False and "✗ **differs" in sql_verdict(wrong)
    table = right["sql"].split(" FROM ")[1].split()[0]
    refused = sql_result(db, f"DROP TABLE {table}", row["output"])
    assert "sandbox refused" in sql_verdict(refused) and refused["matches_gold"] is None
    assert "no such table" in sql_verdict(sql_result(db, "SELECT * FROM nowhere", None))
    assert "(no gold answer" in sql_verdict(sql_result(db, row["output"], None))
    assert "the answer is empty" in sql_verdict(sql_result(db, "", row["output"]))
    with pytest.raises(AppError, match="not one of this recipe's databases"):
        sql_database(trained, "nope")


def test_verified_answers_name_only_what_the_database_has(trained):
    """The app's verified decoding is eval's: a query over the picked database's names, and how it was chosen."""
    import sqlglot
    from sqlglot import exp

    from tunebook.app import verified_answer
    from tunebook.sql_grammar import identifiers

    loaded = AppSession([trained.source]).load(trained.source)
    row = eval_examples(trained)[0]
    db = sql_database(trained, row["db_id"])
    text, how = verified_answer(loaded, build_request(row["instruction"], row["input"], ""), db, 24)
    assert how in ("greedy passed", "greedy repaired", "rescued by a candidate", "no candidate passed")
    assert text.upper().startswith("SELECT"), text
    try:
        names = {n.name.lower() for n in sqlglot.parse_one(text, read="sqlite").find_all(exp.Column, exp.Table)}
    except sqlglot.errors.ParseError:  # cut off at 24 tokens: the grammar still held every name written so far
        names = set()
    assert names - {"*"} <= identifiers(db) | {f"t{i}" for i in range(1, 10)}, text


def test_no_adapter_yet_answers_with_the_base_model_and_says_how_to_train(tiny_recipe):
    recipe = load_recipe(tiny_recipe(eval__max_new_tokens=4))
    assert not recipe_status(recipe)["adapter"]
    assert "No adapter yet" in status_line(recipe) and "make train RECIPE=" in status_line(recipe)
    loaded = AppSession([recipe.source]).load(recipe.source)
    from tunebook.app import Settings

    last = list(stream_answers(loaded, build_request("Say hi.", "", ""), Settings(max_new_tokens=4)))[-1]
    assert set(last) == {"base"}
    assert "No eval report yet" in report_view(recipe)["markdown"]
    from tunebook.app import recipe_choices

    assert recipe_choices(AppSession([recipe.source])) == [("tiny-sql (no adapter yet)", recipe.source)]


def test_bad_input_and_missing_models_are_messages(tiny_recipe, tmp_path):
    with pytest.raises(AppError, match="Write an instruction"):
        build_request(" ", "", "")
    with pytest.raises(AppError, match="not valid JSON"):
        build_request("", "", "[{'role': 'user'}")
    with pytest.raises(AppError, match="'human' is not a role"):
        build_request("", "", '[{"role": "human", "content": "hi"}]')
    with pytest.raises(AppError, match="content: is empty"):
        build_request("", "", '[{"role": "user", "content": " "}]')
    chat = build_request("", "", '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]')
    assert chat == {"messages": [{"role": "user", "content": "hi"}]}, "a pasted answer is dropped, then asked for"
    assert build_request("Translate.", "cat", "") == {"instruction": "Translate.", "input": "cat"}
    missing = tiny_recipe(name="gone", model__name=str(tmp_path / "no-model"))
    with pytest.raises(AppError):
        AppSession([str(missing)]).load(str(missing))
    with pytest.raises(AppError, match="is not one of this app's recipes"):
        AppSession(["smollm2-sql"]).recipe("other")


def test_report_view_shows_the_report_chart_and_training(trained):
    from tunebook.evaluate import evaluate

    evaluate(trained)
    view = report_view(trained)
    assert "| exec_accuracy |" in view["markdown"] and "### Training (run_info.json)" in view["markdown"]
    assert Path(view["chart"]).exists() and Path(view["loss_curve"]).exists()


@pytest.fixture
def served(trained):
    from tunebook.app import launch

    port = free_port()
    page = launch([trained.source], port=port, block=False)
    yield trained, f"http://127.0.0.1:{port}/"
    page.close()


def test_the_page_end_to_end_through_gradio_client(served):
    from gradio_client import Client

    recipe, url = served
    client = Client(url, verbose=False)
    row = eval_examples(recipe)[0]
    base, tuned, status, base_verdict, tuned_verdict, _, tuned_table, verified = client.predict(
        recipe.source, row["instruction"], row["input"], "", row["db_id"], 8, 0, 1, 1, True, api_name="/answer")
    assert isinstance(base, str) and tuned and "both answers in" in status  # the tiny base may stop at once
    assert base_verdict and tuned_verdict and tuned_table["headers"]
    assert "verified in" in status and verified.startswith("**fine-tuned verified**") and "```sql" in verified
    status = client.predict(recipe.source, "", "", "", None, 8, 0, 1, 1, False, api_name="/answer")[2]
    assert status.startswith("**error:** Write an instruction")


def test_the_page_serves_only_the_recipes_databases_and_says_no_path(served, tmp_path):
    """A visitor naming a path (absolute, `..`, or a real SQLite file elsewhere) gets a refusal naming no path."""
    import sqlite3

    from gradio_client import Client

    recipe, url = served
    secret = tmp_path / "secret.sqlite"
    sqlite3.connect(secret).executescript("CREATE TABLE t (x); INSERT INTO t VALUES ('hidden');")
    client = Client(url, verbose=False)
    for db_id in (str(secret.with_suffix("")), "../../secret", "../databases/../secret", "/etc/passwd"):
        status = client.predict(recipe.source, "Show everything.", "SELECT x FROM t", "", db_id, 8, 0, 1, 1, True,
                                api_name="/answer")[2]
        assert status.startswith("**error:**") and "is not one of this recipe's databases" in status, status
        assert str(tmp_path) not in status and "databases/" not in status


def test_concurrent_requests_keep_their_own_adapter_state(trained):
    """Two requests streaming at once on one model: each side's answers equal the answers it gets alone."""
    import threading

    from tunebook.app import Settings

    session = AppSession([trained.source])
    loaded = session.load(trained.source)
    rows = eval_examples(trained)[:4]
    requests = [build_request(r["instruction"], r["input"], "") for r in rows] * 2
    alone = [list(stream_answers(loaded, q, Settings(max_new_tokens=8)))[-1] for q in requests]
    together: list = [None] * len(requests)

    def ask(i: int) -> None:
        together[i] = list(stream_answers(loaded, requests[i], Settings(max_new_tokens=8)))[-1]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert together == alone


def test_server_side_bounds_hold_whatever_the_client_sends(trained):
    from tunebook.app import MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, Settings

    bounded = Settings(max_new_tokens=10**9, temperature=50, top_p=0, repetition_penalty=-3).bounded()
    assert (bounded.max_new_tokens, bounded.temperature, bounded.top_p, bounded.repetition_penalty) == \
        (MAX_NEW_TOKENS, 2.0, 0.05, 1.0)
    loaded = AppSession([trained.source]).load(trained.source)
    with pytest.raises(AppError, match=f"up to {MAX_PROMPT_TOKENS}"):
        list(stream_answers(loaded, build_request("Repeat.", "word " * 5000, ""), Settings(max_new_tokens=2)))
    with pytest.raises(AppError, match="longer than this app accepts"):
        build_request("x" * 60_000, "", "")


CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(DRIVER).exists()),
                    reason="no browser: install Debian's chromium and chromium-driver packages "
                           "(apt-get install chromium chromium-driver; .ci/run does)")
def test_the_page_in_a_real_headless_browser(served):
    """Chromium loads the page, a test example is clicked, both answers stream in; the screenshot is kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    recipe, url = served
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 120)
        first = eval_examples(recipe)[0]
        label = wait.until(ec.element_to_be_clickable(
            (By.XPATH, f"//*[@id='examples']//label[contains(., {xpath_text(example_label(first)[:40])})]")))
        label.click()
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#input textarea").get_attribute("value"))
        started = time.perf_counter()
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: "both answers in" in b.find_element(By.ID, "run-status").text)
        seconds = time.perf_counter() - started
        answers = {box: browser.find_element(By.CSS_SELECTOR, f"#{box} textarea").get_attribute("value")
                   for box in ("base-answer", "tuned-answer")}
        assert answers["tuned-answer"], f"both answers after {seconds:.1f} s: {answers}"  # the tiny base may stop at once
        assert "rows." in browser.find_element(By.TAG_NAME, "body").text or "does not run" in browser.page_source
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "app.png"))
        browser.quit()


def xpath_text(text: str) -> str:
    """A string literal for XPath (which has no escapes): concat() around any double quotes."""
    if '"' not in text:
        return f'"{text}"'
    return "concat(" + ", '\"', ".join(f'"{part}"' for part in text.split('"')) + ")"
