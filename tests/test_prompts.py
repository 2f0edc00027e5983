"""One prompt function: the loss mask covers exactly the answer + end-of-turn, and packing keeps examples apart."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from tunebook.prompts import (
    encode_example,
    encode_prompt,
    render_completion,
    render_prompt,
    stop_strings,
    stop_token_ids,
)

EXAMPLE = {"instruction": "Write a SQLite query.", "input": "Question: How many cats?", "output": "SELECT COUNT(*) FROM cats"}
SYSTEM = "You write SQLite queries."


def test_chat_template_prompt_and_completion(tokenizer):
    prompt = render_prompt(tokenizer, EXAMPLE, SYSTEM)
    assert prompt == (
        "<|im_start|>system\nYou write SQLite queries.<|im_end|>\n<|im_start|>user\nWrite a SQLite query.\n\n"
        "Question: How many cats?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_completion(tokenizer, EXAMPLE, SYSTEM) == "SELECT COUNT(*) FROM cats<|im_end|>"
    assert stop_strings(tokenizer, SYSTEM) == ["<|im_end|>"]
    assert stop_token_ids(tokenizer, SYSTEM) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_loss_mask_covers_exactly_answer_and_eos(tokenizer):
    item = encode_example(tokenizer, EXAMPLE, SYSTEM)
    prompt_ids = encode_prompt(tokenizer, EXAMPLE, SYSTEM)
    labels, ids = item["labels"], item["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    assert all(label == -100 for label in labels[: len(prompt_ids)])
    trained = [t for t in labels if t != -100]
    assert trained == ids[len(prompt_ids):]
    assert tokenizer.decode(trained) == "SELECT COUNT(*) FROM cats<|im_end|>"
    assert trained[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_plain_format_without_chat_template(tokenizer):
    plain = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    prompt = render_prompt(plain, EXAMPLE)
    assert prompt == "### Instruction:\nWrite a SQLite query.\n\nQuestion: How many cats?\n\n### Response:\n"
    item = encode_example(plain, EXAMPLE)
    trained = [t for t in item["labels"] if t != -100]
    assert plain.decode(trained) == "SELECT COUNT(*) FROM cats" + plain.eos_token


def test_too_long_is_dropped_not_truncated(tokenizer):
    assert encode_example(tokenizer, EXAMPLE, SYSTEM, max_length=10) is None


def test_packed_examples_do_not_attend_to_each_other(tiny_model_dir, tokenizer):
    """Logits of an example inside a padding-free packed row equal its logits alone (the collator's format)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    first = encode_example(tokenizer, EXAMPLE, SYSTEM)
    second = encode_example(tokenizer, {**EXAMPLE, "output": "SELECT name FROM cats WHERE age > 3"}, SYSTEM)
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    packed = collator([{"input_ids": first["input_ids"] + second["input_ids"],
                        "labels": first["labels"] + second["labels"],
                        "seq_lengths": [len(first["input_ids"]), len(second["input_ids"])]}])
    with torch.no_grad():
        # use_cache=False as in training (tunebook.models.load_model): transformers only derives the
        # block-diagonal mask from reset position ids when no KV cache is in play.
        joint = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([second["input_ids"]]), use_cache=False).logits[0]
        leaky = model(input_ids=packed["input_ids"], use_cache=False).logits[0]  # no position resets
    n = len(first["input_ids"])
    assert torch.allclose(joint[n:], alone, atol=1e-4)
    assert not torch.allclose(leaky[n:], alone, atol=1e-2), "control: without reset positions the examples mix"
