"""Training on a tiny random model: it learns, resumes exactly, is reproducible; QLoRA runs on CPU."""

from __future__ import annotations

import json
import shutil

import pytest

from tunebook.config import load_recipe
from tunebook.outputs import checkpoints_dir, fine_tuned_dir
from tunebook.runs import last_complete_checkpoint
from tunebook.train import train


def losses(out_dir):
    history = json.loads((out_dir / "loss_log.json").read_text())
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def test_train_writes_outputs_and_same_seed_is_identical(tiny_recipe):
    recipe = load_recipe(tiny_recipe())
    out = train(recipe)
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "recipe.yaml",
                 "run_info.json", "loss_log.json", "loss_curve.png"):
        assert (out / name).exists(), name
    info = json.loads((out / "run_info.json").read_text())
    assert info["seed"] == 7 and info["global_steps"] == 4
    assert info["tokens_seen"] > 0 and info["train_tokens_per_s"] > 0 and info["peak_memory_mb"] > 0
    assert set(info["data"]) == {"train", "val", "test"} and len(info["data"]["train"]["sha256"]) == 64
    assert info["eval_loss_after"] < info["eval_loss_before"]
    first = losses(out)
    assert len(first) == 4
    assert not list(out.parent.glob(".*tmp*")), "no temp dirs left behind"

    second = losses(train(recipe, force=True))
    assert first == second


def test_resume_reproduces_uninterrupted_losses(tiny_recipe):
    recipe = load_recipe(tiny_recipe(training__resume_from_checkpoint="auto"))
    full = losses(train(recipe))
    ckpts = checkpoints_dir(recipe.name)
    shutil.rmtree(ckpts / "checkpoint-4")  # as if the run died after step 2's checkpoint
    shutil.rmtree(fine_tuned_dir(recipe.name))
    (ckpts / "checkpoint-3").mkdir()  # an incomplete checkpoint must be ignored
    assert last_complete_checkpoint(ckpts).name == "checkpoint-2"
    resumed_out = train(recipe)
    resumed = losses(resumed_out)
    assert json.loads((resumed_out / "run_info.json").read_text())["resumed_from"].endswith("checkpoint-2")
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5)


def test_dora_option(tiny_recipe):
    out = train(load_recipe(tiny_recipe(name="tiny-dora", lora__use_dora=True, training__max_steps=1)))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True


def test_layers_to_transform_adapts_only_those_layers(tiny_recipe):
    from safetensors import safe_open

    out = train(load_recipe(tiny_recipe(name="tiny-top", lora__layers_to_transform=[1], training__max_steps=1)))
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert names and all(".layers.1." in name for name in names), names


def test_qlora_step_on_cpu(tiny_recipe):
    """bitsandbytes nf4 on CPU: the base loads in 4 bit, a LoRA step runs and the adapter is written."""
    pytest.importorskip("bitsandbytes")
    recipe = load_recipe(tiny_recipe(name="tiny-qlora", model__quantization="4bit", training__max_steps=2))
    out = train(recipe)
    info = json.loads((out / "run_info.json").read_text())
    assert info["global_steps"] == 2 and info["train_loss"] > 0
    assert fine_tuned_dir(recipe.name) == out


@pytest.mark.parametrize("name", ["gradient_checkpointing", "activation_checkpointing"])
def test_checkpointing_setting_under_either_name_without_warning(tiny_recipe, tmp_path, name):
    import warnings

    from tunebook.train import sft_config

    recipe = load_recipe(tiny_recipe())
    for value in (False, True):
        recipe.training.pop("gradient_checkpointing", None)
        recipe.training[name] = value
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*checkpointing.*", category=FutureWarning)
            args = sft_config(recipe, tmp_path, use_cuda=False)
        assert args.gradient_checkpointing is value


def test_lm_head_scores_trained_positions_only_with_same_loss_and_gradients(tiny_model_dir, monkeypatch):
    import torch
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM
    from trl.kernels.chunked_logprob import _use_triton as original

    from tunebook.speedups import score_trained_positions_only

    monkeypatch.setattr(trl_utils, "_use_triton", original)  # TRL's own rule; restored after the test
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 48))
    labels = ids.clone()
    labels[:, :36] = -100  # a prompt: no labels

    def loss_and_grads():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert not trl_utils._use_triton(torch.device("cpu"))
    full, full_grads = loss_and_grads()
    assert score_trained_positions_only() and trl_utils._use_triton(torch.device("cpu"))
    compact, compact_grads = loss_and_grads()
    assert torch.allclose(full.loss, compact.loss, rtol=1e-5)
    assert torch.equal(full.is_top1, compact.is_top1)
    assert torch.allclose(full.entropy, compact.entropy, atol=1e-5)
    assert full_grads.keys() == compact_grads.keys() and len(full_grads) > 5
    for name, grad in full_grads.items():
        assert torch.allclose(grad, compact_grads[name], atol=1e-6, rtol=1e-4), name


def test_packed_attention_equals_each_example_alone_with_same_gradients(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tunebook.speedups import register_packed_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    examples = [{"input_ids": list(range(50 + n, 50 + 2 * n)), "labels": list(range(50 + n, 50 + 2 * n))}
                for n in (7, 12, 5)]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)

    def run():
        model.zero_grad()
        out = model(**batch, use_cache=False)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    dense, dense_grads = run()  # transformers' SDPA with a block-diagonal mask over the packed row
    model.set_attn_implementation(register_packed_attention())
    packed, packed_grads = run()
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits
                           for e in examples], dim=1)
    assert torch.allclose(packed.logits, alone, atol=1e-5)
    assert torch.allclose(packed.logits, dense.logits, atol=1e-5)
    assert torch.allclose(packed.loss, dense.loss, rtol=1e-6)
    for name, grad in dense_grads.items():
        assert torch.allclose(grad, packed_grads[name], atol=1e-6, rtol=1e-4), name
