"""`tunebook serve` on a tiny model, called with the official `openai` client: answers at temperature 0 are
`tunebook eval --gguf`'s, streaming and `stop`/`max_tokens` behave as the API says, bad requests get the API's
own errors, and several runs of one base share one base GGUF with their adapters."""

from __future__ import annotations

import contextlib
import json
import socket

import pytest

import tunebook.export
from tunebook.config import load_recipe
from tunebook.errors import RecipeError
from tunebook.export import export
from tunebook.outputs import adapter_gguf_file, base_gguf_file, gguf_dir, modelfile_path, verify_file
from tunebook.train import train

openai = pytest.importorskip("openai")
pytest.importorskip("llama_cpp.server.app")
pytestmark = pytest.mark.skipif(not tunebook.export.CONVERTER_DIR.joinpath("convert_lora_to_gguf.py").exists(),
                                reason="llama.cpp converter not extracted (make llama-cpp-converter)")


@contextlib.contextmanager
def running(recipes, **options):
    """The server of `tunebook serve` on a free local port, in a thread; yields (client, base URL)."""
    from tunebook.serve import in_background, served_models

    adapter = options.get("adapter", False)
    with in_background(served_models(recipes, options.get("qtype"), adapter), adapter) as url:
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120), url


@pytest.fixture
def exported(tiny_recipe):
    def build(name: str = "tiny-sql", seed: int = 7):
        recipe = load_recipe(tiny_recipe(name=name, training__max_steps=2, training__seed=seed,
                                         lora__init_lora_weights=False, export__gguf=["f16", "q8_0"],
                                         export__verify_prompts=2, eval__limit=6))
        train(recipe)
        export(recipe)
        return recipe
    return build


def ask(client, model: str, row: dict, **options) -> str:
    from tunebook.prompts import user_message

    reply = client.chat.completions.create(model=model, temperature=0, messages=[
        {"role": "user", "content": user_message(row)}], **options)
    return reply.choices[0].message.content


def test_served_answers_are_eval_ggufs_and_the_api_behaves(exported):
    from tunebook.evaluate import evaluate, load_eval_rows

    recipe = exported()
    report = evaluate(recipe, which="fine_tuned", gguf=["q8_0"])
    evaluated = [json.loads(line)["gguf_q8_0_prediction"] for line in (report / "predictions.jsonl").open()]
    rows, _ = load_eval_rows(recipe, None)
    assert len(rows) == len(evaluated) == 6
    max_new = recipe.eval.max_new_tokens

    with running([recipe], qtype="q8_0") as (client, url):
        assert [m.id for m in client.models.list().data] == [recipe.name]
        served = [ask(client, recipe.name, row, max_tokens=max_new) for row in rows]
        assert [s.strip() for s in served] == evaluated  # same prompt tokens, same greedy tokens, same decoding

        stream = client.chat.completions.create(model=recipe.name, temperature=0, max_tokens=max_new, stream=True,
                                                messages=[{"role": "user", "content": _user(rows[0])}])
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == served[0]

        longest = max(served, key=len)
        stop = longest[len(longest) // 2: len(longest) // 2 + 2]
        row = rows[served.index(longest)]
        cut = client.chat.completions.create(model=recipe.name, temperature=0, max_tokens=max_new, stop=[stop],
                                             messages=[{"role": "user", "content": _user(row)}])
        assert cut.choices[0].finish_reason == "stop"
        assert cut.choices[0].message.content == longest[: longest.index(stop)]

        short = client.chat.completions.create(model=recipe.name, temperature=0, max_tokens=2,
                                               messages=[{"role": "user", "content": _user(row)}])
        assert short.usage.completion_tokens <= 2 and longest.startswith(short.choices[0].message.content)
        newer = client.chat.completions.create(model=recipe.name, temperature=0, max_completion_tokens=2,
                                               messages=[{"role": "user", "content": _user(row)}])
        assert newer.choices[0].message.content == short.choices[0].message.content, "OpenAI's newer name"

        # refused before an answer starts, streamed or not: a stream does not begin with a 200 and end empty
        for stream in (False, True):
            with pytest.raises(openai.NotFoundError) as missing:
                client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}],
                                               stream=stream)
            assert missing.value.body["code"] == "model_not_found"
            with pytest.raises(openai.BadRequestError) as too_long:
                client.chat.completions.create(model=recipe.name, stream=stream,
                                               messages=[{"role": "user", "content": "word " * 4000}])
            assert too_long.value.body["code"] == "context_length_exceeded"
            with pytest.raises(openai.BadRequestError) as too_long:
                client.completions.create(model=recipe.name, prompt="word " * 4000, stream=stream)
            assert too_long.value.body["code"] == "context_length_exceeded"

        import httpx

        for body in (b"{not json", b"[1, 2]", b'{"messages": "hi"}',
                     b'{"messages": [{"role": "assistant", "content": "hi"}]}',
                     b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
                     b'{"messages": [{"role": "user", "content": "a"}], "max_tokens": 0}',
                     b'{"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 0}',
                     b'{"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 4, "max_tokens": 8}',
                     b'{"messages": [{"role": "user", "content": "a"}], "temperature": -1}',
                     b'{"messages": [{"role": "user", "content": "a"}], "n": 3}',
                     b'{"messages": [{"role": "user", "content": "a"}], "logprobs": true, "top_logprobs": 2}'):
            answer = httpx.post(f"{url}/chat/completions", content=body, headers={"content-type": "application/json"})
            assert answer.status_code == 400, body
            assert answer.json()["error"]["type"] == "invalid_request_error"
        # and the server still answers afterwards
        assert ask(client, recipe.name, rows[0], max_tokens=max_new).strip() == evaluated[0]

        # a request arriving while another streams waits its turn; it does not cut the stream off
        import threading

        streamed: list[str] = []

        def consume() -> None:
            chunks = client.chat.completions.create(model=recipe.name, temperature=0, max_tokens=max_new, stream=True,
                                                    messages=[{"role": "user", "content": _user(row)}])
            streamed.append("".join(chunk.choices[0].delta.content or "" for chunk in chunks))

        reader = threading.Thread(target=consume)
        reader.start()
        other = ask(client, recipe.name, rows[0], max_tokens=max_new)
        reader.join()
        assert streamed == [longest] and other == served[0]

    from tunebook.bench import bench_serve

    measured = bench_serve(recipe.source, 4)  # `make bench`'s comparison, on this tiny export
    assert set(measured) == {"examples", "max_tokens", "q8_0"} and measured["q8_0"]["same_answers"] == 4
    assert measured["q8_0"]["first_token_s"]["median"] > 0 and measured["q8_0"]["eval_examples_per_s"] > 0


def _user(row: dict) -> str:
    from tunebook.prompts import user_message

    return user_message(row)


def test_adapter_gguf_is_checked_and_one_base_serves_several_runs(exported, capfd, tmp_path):
    from tunebook import llamacpp
    from tunebook.console import setup_console
    from tunebook.evaluate import load_eval_rows
    from tunebook.models import load_tokenizer
    from tunebook.outputs import merged_dir
    from tunebook.prompts import encode_prompt, stop_token_ids

    first, second = exported("tiny-a", seed=7), exported("tiny-b", seed=8)
    for recipe in (first, second):
        verification = json.loads(verify_file(recipe.name).read_text())
        record = verification["adapter"]
        assert adapter_gguf_file(recipe.name).exists() and record["base_type"] == "q8_0"
        assert record["agreement"]["prompts"] == 2  # base + adapter in llama.cpp, compared with the merged model
        assert record["size_mb"] < verification["checked"]["q8_0"]["size_mb"]
        text = modelfile_path(recipe.name, adapter=True).read_text()
        assert f"ADAPTER ./{adapter_gguf_file(recipe.name).name}" in text
        base_line = text.splitlines()[0].removeprefix("FROM ")
        assert (gguf_dir(recipe.name) / base_line).resolve() == base_gguf_file(recipe.model.name, "q8_0").resolve()

    rows, _ = load_eval_rows(first, None)
    expected = {}
    for recipe in (first, second):  # what llama.cpp answers with this run's adapter on the base, loaded alone
        tokenizer = load_tokenizer(str(merged_dir(recipe.name)))
        system = recipe.data.system_prompt
        log = tmp_path / f"{recipe.name}.log"
        setup_console(log, verbose=False)
        try:  # llama.cpp logs a line per adapter tensor from C: the log file gets them, not the console
            capfd.readouterr()
            llm = llamacpp.load_gguf(base_gguf_file(recipe.model.name, "q8_0"), n_ctx=512,
                                     lora_path=adapter_gguf_file(recipe.name))
            assert "llama_" not in capfd.readouterr().err
        finally:
            setup_console(None, verbose=False)
        ids = llamacpp.generate_ids(llm, [encode_prompt(tokenizer, r, system) for r in rows],
                                    stop_token_ids(tokenizer, system), recipe.eval.max_new_tokens)
        expected[recipe.name] = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in ids]
        del llm
    assert expected[first.name] != expected[second.name], "control: the two adapters answer differently"

    with running([first, second], adapter=True) as (client, _):
        assert [m.id for m in client.models.list().data] == [first.name, second.name]
        for name in (first.name, second.name, first.name):  # switching back and forth, one base in memory
            got = [ask(client, name, row, max_tokens=first.eval.max_new_tokens).strip() for row in rows]
            assert got == expected[name], name


def test_serve_refuses_what_it_cannot_serve_with_one_line(exported, tiny_recipe):
    from tunebook.serve import check_port, served_models

    with pytest.raises(RecipeError, match="no exported GGUF.*tunebook export"):
        served_models([load_recipe(tiny_recipe(name="not-exported"))])
    recipe = exported()
    with pytest.raises(RecipeError, match="--gguf.*does not exist"):
        served_models([recipe], qtype="q4_k_m")
    with contextlib.closing(socket.socket()) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(RecipeError, match="port .* is in use"):
            check_port("127.0.0.1", taken.getsockname()[1])
    adapter = recipe_adapter(recipe)
    later = adapter.stat().st_mtime + 60
    import os

    os.utime(adapter, (later, later))
    with pytest.raises(RecipeError, match="older than the adapter"):
        served_models([recipe], qtype="q8_0")


def recipe_adapter(recipe):
    from tunebook.outputs import fine_tuned_dir

    return fine_tuned_dir(recipe.name) / "adapter_model.safetensors"


def test_streamed_text_is_whole_characters_in_any_script(tokenizer):
    from tunebook.serve import streaming_tokenizer

    text = "SELECT 'café 表 ✓ ü ñ 你好' AS x -- 😀"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    wrapped = streaming_tokenizer(tokenizer)
    pieces = [wrapped.detokenize(ids[i:i + 1], prev_tokens=ids[:i]) for i in range(len(ids))]
    assert b"".join(pieces).decode("utf-8") == text
    assert all(b"\xef\xbf\xbd" not in piece for piece in pieces)  # never a replacement character on the way
