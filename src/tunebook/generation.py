"""Batched greedy generation that stops where the model was trained to stop (eval, export checks, the app)."""

from __future__ import annotations

from typing import Any

from tunebook.prompts import encode_prompt, stop_token_ids


def generate(model: Any, tokenizer: Any, examples: list[dict], system_prompt: str | None, max_new_tokens: int,
             batch_size: int, progress: Any = None) -> list[str]:
    """Greedy answers as text (special tokens dropped), in the input order."""
    ids = generate_ids(model, tokenizer, examples, system_prompt, max_new_tokens, batch_size, progress)
    return [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in ids]


def generate_ids(model: Any, tokenizer: Any, examples: list[dict], system_prompt: str | None, max_new_tokens: int,
                 batch_size: int, progress: Any = None) -> list[list[int]]:
    """Greedy answer token ids, batched with left padding and the KV cache, up to the trained end-of-turn token.

    Prompts are sorted by length so each batch pads little; answers come back in the input order.
    """
    import torch

    device = next(model.parameters()).device
    prompts = [encode_prompt(tokenizer, ex, system_prompt) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stops = stop_token_ids(tokenizer, system_prompt)
    outputs: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, use_cache=True, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                temperature=None, top_p=None, top_k=None,
            )
        for row, i in enumerate(idx):
            tokens = out[row, width:].tolist()
            cut = next((n for n, t in enumerate(tokens) if t in stops), None)  # drop the stop and padding after it
            outputs[i] = tokens if cut is None else tokens[: cut + 1]
        if progress is not None:
            progress(len(idx))
    return outputs
