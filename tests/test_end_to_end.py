"""End to end on the real SmolLM2-135M-Instruct: train a few steps, reload the adapter, evaluate, export."""

from __future__ import annotations

import importlib.util
import json

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tunebook.config import load_recipe
from tunebook.evaluate import evaluate
from tunebook.export import export
from tunebook.outputs import gguf_dir
from tunebook.train import train

pytestmark = pytest.mark.slow


@pytest.fixture
def smol_recipe(tmp_path, monkeypatch, base_model_dir, sql_data):
    import tunebook.outputs

    models = tmp_path / "models"
    (models / "base").mkdir(parents=True)
    (models / "base" / base_model_dir.name).symlink_to(base_model_dir)
    monkeypatch.setattr(tunebook.outputs, "MODELS_DIR", models)
    monkeypatch.setattr(tunebook.outputs, "REPORTS_DIR", tmp_path / "reports")
    return load_recipe("smollm2-sql", [
        "training.max_steps=3", "training.per_device_train_batch_size=1", "training.save_steps=3",
        "training.logging_steps=1", "data.val_limit=4", "eval.limit=4", "eval.max_new_tokens=24",
        "export.verify_prompts=2",
    ])


def test_real_smollm2_trains_reloads_evaluates_and_exports(smol_recipe, base_model_dir, tokenizer):
    out = train(smol_recipe)
    info = json.loads((out / "run_info.json").read_text())
    assert info["global_steps"] == 3 and info["train_tokens_per_s"] > 0

    base = AutoModelForCausalLM.from_pretrained(base_model_dir)
    model = PeftModel.from_pretrained(base, out).eval()
    ids = tokenizer("SELECT", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > ids.shape[1]

    report = json.loads((evaluate(smol_recipe) / "report.json").read_text())
    assert report["n_examples"] == 8 and "exec_accuracy" in report["fine_tuned"]  # 4 generated + 4 people rows
    assert set(report["subsets"]) >= {"unseen_real_schema", "people"} and "fine_tuned" in report["verified"]
    assert report["verified"]["fine_tuned"]["unknown_table"] == 0.0

    result = export(smol_recipe)
    run = result["run"]
    assert run.startswith("smollm2-sql@") and out.name == run, "a run with overrides has outputs of its own"
    files = sorted(p.name for p in gguf_dir(run).iterdir())
    assert "Modelfile" in files and "verify.json" in files
    assert f"{run}-f16.gguf" in files and f"{run}-q8_0.gguf" in files
    for check in result["checked"].values():
        assert check["tensor_count_match"] and check["shapes_match"] and check["chat_template_present"]
    if importlib.util.find_spec("llama_cpp") is not None:
        assert f"{run}-q4_k_m.gguf" in files
        f16 = result["checked"]["f16"]["agreement"]
        assert f16["confident_agreement"] >= 0.99 and f16["top1_agreement"] >= 0.9
        # the shipped files on the eval rows: the f16 GGUF answers as the fine-tuned HF model does
        out = evaluate(smol_recipe, which="fine_tuned", gguf=["f16", "q4_k_m"])
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        same = sum(r["gguf_f16_prediction"] == r["fine_tuned_prediction"] for r in rows)
        assert same >= len(rows) - 1, [(r["gguf_f16_prediction"], r["fine_tuned_prediction"]) for r in rows]
