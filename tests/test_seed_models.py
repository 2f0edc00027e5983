"""The seed models' real tokenizers and chat templates, end to end: Phi-3-mini, Llama-3-8B-Instruct and
Mistral-7B-Instruct-v0.3 (tiny random models of the real config classes and vocabulary sizes; see
seed_tokenizers.py for where each tokenizer comes from)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import transformers
from seed_tokenizers import SEEDS, reference_tokenisations, seed_tokenizer_dir, tiny_seed_model, vocab_file

import tunebook.export
from tunebook.prompts import (
    encode_example,
    encode_prompt,
    render_prompt,
    stop_strings,
    stop_token_ids,
    system_handling,
)

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
HAS_CONVERTER = tunebook.export.CONVERTER_DIR.joinpath("convert_hf_to_gguf.py").exists()
SYSTEM = "You answer in one word."
CHAT = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "First question?"},
                     {"role": "assistant", "content": "Alpha"}, {"role": "user", "content": "Second one?"},
                     {"role": "assistant", "content": "Beta two"}]}
INSTRUCTION = {"instruction": "Name the table.", "input": "CREATE TABLE pets (id INTEGER);", "output": "pets"}


def tokenizer_of(name: str):
    return transformers.AutoTokenizer.from_pretrained(seed_tokenizer_dir(name))


def vocab_only(path):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


# ---------------------------------------------------------------- the tokenizers are the real ones


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="needs llama-cpp-python")
@pytest.mark.parametrize("name, vocab", [("phi3", "ggml-vocab-phi-3.gguf"), ("llama3", "ggml-vocab-llama-bpe.gguf")])
def test_real_tokenizers_match_llama_cpp_reference_tokenisations(name, vocab):
    tokenizer = tokenizer_of(name)
    cases = reference_tokenisations(vocab_file(vocab))
    assert len(cases) > 40
    for text, ids in cases:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids, text
    assert len(tokenizer) == {"phi3": 32064, "llama3": 128256}[name]
    if name == "phi3":  # Phi-3's chat text: the newline after a special token goes with it, as in llama.cpp
        text = render_prompt(tokenizer, {"instruction": "hi", "input": ""}, None)
        llm = vocab_only(vocab_file(vocab))
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == llm.tokenize(text.encode(), add_bos=False,
                                                                                       special=True)


def test_mistral_prompts_equal_mistral_commons_encoding():
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from seed_tokenizers import mistral_v3_model

    reference = MistralTokenizer.from_file(str(mistral_v3_model()))
    tokenizer = tokenizer_of("mistral")
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    conversations = [CHAT["messages"][1:4], CHAT["messages"][:4],
                     [{"role": "user", "content": "  leading spaces and Cửa Việt 🦙 12345"}]]
    for messages in conversations:
        request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
        expected = reference.encode_chat_completion(request).tokens
        example = {"messages": [*messages, {"role": "assistant", "content": "?"}]}
        assert encode_prompt(tokenizer, example) == expected, messages
    assert system_handling(tokenizer) == "moved"


# ---------------------------------------------------------------- training masks and stop tokens


@pytest.mark.parametrize("name", list(SEEDS))
def test_loss_mask_is_each_answer_and_its_end_of_turn_token_and_padding_never_hides_it(name):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tunebook.models import load_tokenizer

    tokenizer = load_tokenizer(str(seed_tokenizer_dir(name)))
    end = SEEDS[name]["end_of_turn"]
    end_id = tokenizer.convert_tokens_to_ids(end)
    assert stop_strings(tokenizer, SYSTEM)[0] == end and stop_token_ids(tokenizer, SYSTEM)[0] == end_id
    for example, answers in ((INSTRUCTION, ["pets"]), (CHAT, ["Alpha", "Beta two"])):
        encoded = encode_example(tokenizer, example, SYSTEM)
        trained = [t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label != -100]
        if name == "mistral" and example is CHAT:
            answers = answers[-1:]  # the template moves the system prompt: only the last answer is trained
        assert trained.count(end_id) == len(answers) and trained[-1] == end_id
        text = tokenizer.decode(trained)
        assert text.replace(" ", "") == "".join(a + end for a in answers).replace(" ", ""), text
        assert SYSTEM not in text and "question" not in text
        prompt = encode_prompt(tokenizer, example, SYSTEM)
        assert encoded["input_ids"][: len(prompt)] == prompt, "training feeds eval's prompt ids"
    short, long = encode_example(tokenizer, INSTRUCTION, SYSTEM), encode_example(tokenizer, CHAT, SYSTEM)
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)([short, long])
    first = batch["labels"][0][: len(short["labels"])].tolist()
    assert first == short["labels"] and first[-1] == end_id, "the end-of-turn label survives padding"
    assert (batch["labels"][0][len(short["labels"]):] == -100).all()
    if tokenizer.pad_token_id == end_id:  # Llama-3, Mistral: no pad token, EOS (= the end of turn) stands in
        assert (batch["input_ids"][0][len(short["labels"]):] == end_id).all()


# ---------------------------------------------------------------- the whole path


def echo_rows(n: int) -> list[dict]:
    """Chat rows whose answer is always the same word: a few steps teach a tiny model to say it and stop."""
    return [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": "Yes"}, {"role": "user", "content": f"And {i + 1}?"},
                          {"role": "assistant", "content": "Yes"}]} for i in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SEEDS))
def test_seed_model_validates_trains_evaluates_exports_and_stops_where_it_should(name, tmp_path, monkeypatch):
    from conftest import write_recipe

    import tunebook.outputs
    from tunebook.config import load_recipe
    from tunebook.evaluate import evaluate
    from tunebook.export import export
    from tunebook.train import train
    from tunebook.validate import validate_recipe

    for root, folder in (("MODELS_DIR", "models"), ("REPORTS_DIR", "reports"), ("LOGS_DIR", "logs")):
        monkeypatch.setattr(tunebook.outputs, root, tmp_path / folder)
    model_dir = tiny_seed_model(name, tmp_path / f"tiny-{name}")
    for split, n in (("train", 48), ("val", 4), ("test", 4)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in echo_rows(n)))
    targets = {"phi3": ["qkv_proj", "o_proj"], "llama3": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"]}
    path = write_recipe(
        tmp_path / f"{name}-echo.yaml", model={"name": str(model_dir), "dtype": "float32"}, task="echo",
        data={s: str(tmp_path / f"{s}.jsonl") for s in ("train", "val", "test")} | {"max_length": 128},
        lora={"r": 8, "lora_alpha": 16, "target_modules": targets[name]},
        training={"max_steps": 30, "per_device_train_batch_size": 8, "learning_rate": 1e-2, "logging_steps": 10,
                  "save_steps": 100, "gradient_checkpointing": False, "report_to": "none", "seed": 1},
        eval={"max_new_tokens": 12, "batch_size": 4, "metrics": ["exact_match"]}, export={"gguf": ["f16"],
                                                                                          "verify_prompts": 2})
    recipe = load_recipe(path)
    validate_recipe(recipe)
    train(recipe)
    report = json.loads((evaluate(recipe, which="fine_tuned") / "report.json").read_text())
    assert report["fine_tuned"]["exact_match"] == 100.0, report["examples"]
    from tunebook.app import AppSession, Settings, build_request, stream_answers

    loaded = AppSession([recipe.source]).load(recipe.source)
    asked = build_request("", "", json.dumps(echo_rows(1)[0]["messages"][:-1]))
    assert list(stream_answers(loaded, asked, Settings(max_new_tokens=12)))[-1]["fine_tuned"] == "Yes", "the app too"

    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "models" / "fine-tuned" / recipe.name)
    end_id = tokenizer.convert_tokens_to_ids(SEEDS[name]["end_of_turn"])
    from tunebook.evaluate import load_pass_model
    from tunebook.generation import generate_ids

    tokenizer.padding_side = "left"
    model = load_pass_model(recipe, ["fine_tuned"], tmp_path / "models" / "fine-tuned" / recipe.name)
    test_rows = echo_rows(2)
    hf_ids = generate_ids(model, tokenizer, test_rows, None, 12, 2)
    assert all(ids[-1] == end_id and len(ids) < 12 for ids in hf_ids), hf_ids  # stops at the end of turn

    if not (HAS_LLAMA_CPP and HAS_CONVERTER):
        return
    result = export(recipe)
    assert result["checked"]["f16"]["eos_matches_tokenizer"]
    from tunebook.llamacpp import greedy_ids, load_gguf
    from tunebook.outputs import gguf_dir, gguf_file

    llm = load_gguf(gguf_file(recipe.name, "f16"), n_ctx=512)
    stops = stop_token_ids(tokenizer, None)
    for row, expected in zip(test_rows, hf_ids, strict=True):
        prompt = encode_prompt(tokenizer, row)
        assert llm.tokenize(render_prompt(tokenizer, row).encode(), add_bos=False, special=True) == prompt
        assert greedy_ids(llm, prompt, stops, 12) == expected, "llama.cpp stops where transformers does"
    assert_every_prompt_path_agrees(name, tokenizer, llm, gguf_dir(recipe.name))


def assert_every_prompt_path_agrees(name, tokenizer, llm, gguf_folder) -> None:
    """Training, eval, the Modelfile's TEMPLATE and llama.cpp's own formatting with the GGUF's embedded template
    give one prompt, token for token; the Modelfile stops on what the model was trained to end with."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from tunebook.export import ollama_template

    row = {"instruction": "Say yes.", "input": ""}
    for system in (None, SYSTEM):
        expected = encode_prompt(tokenizer, row, system)
        trained = encode_example(tokenizer, {**row, "output": "Yes"}, system)["input_ids"][: len(expected)]
        assert trained == expected
        template = ollama_template(tokenizer, system)
        rendered = template.replace("{{ .System }}", system or "").replace("{{ .Prompt }}", "Say yes.")
        assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == expected, (system, rendered)
        embedded = llm.metadata["tokenizer.chat_template"]
        formatter = Jinja2ChatFormatter(embedded, eos_token=tokenizer.eos_token, bos_token=tokenizer.bos_token)
        messages = [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": "Say yes."}]
        prompt = formatter(messages=messages).prompt
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == expected, (system, prompt)
    modelfile = (gguf_folder / "Modelfile").read_text()
    stops = [line.split('"')[1] for line in modelfile.splitlines() if line.startswith("PARAMETER stop")]
    assert stops[0] == SEEDS[name]["end_of_turn"] and stops == stop_strings(tokenizer, None)


@pytest.mark.parametrize("name", list(SEEDS))
def test_gpu_recipes_keep_almost_every_training_row_under_their_real_tokenizer(name, all_data):
    """data.max_length of each seed model's recipes, against the real token counts of (a sample of) its data."""
    from tunebook.config import load_recipe
    from tunebook.data import read_split
    from tunebook.models import load_tokenizer

    tokenizer = load_tokenizer(str(seed_tokenizer_dir(name)))
    for task in ("sql", "review", "qa", "summarize"):
        recipe = load_recipe(f"{name}-{task}")
        rows = read_split(recipe.data.train)[::6]
        lengths = [len(encode_example(tokenizer, row, recipe.data.system_prompt)["input_ids"]) for row in rows]
        dropped = sum(n > recipe.data.max_length for n in lengths) / len(rows)
        assert dropped <= 0.02, (recipe.name, dropped)
