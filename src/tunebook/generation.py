"""Batched greedy generation that stops where the model was trained to stop (eval, export checks, the app)."""

from __future__ import annotations

from typing import Any

from tunebook.prompts import encode_prompt, stop_token_ids

# Prompts that share at least this many leading tokens (an SQL schema, a long document) are generated together
# from one cached prefix. Below it, recomputing the prefix costs less than the bookkeeping.
MIN_SHARED_PREFIX = 48


def generate(model: Any, tokenizer: Any, examples: list[dict], system_prompt: str | None, max_new_tokens: int,
             batch_size: int, progress: Any = None, on_batch: Any = None, grammars: Any = None) -> list[str]:
    """Greedy answers as text (special tokens dropped), in the input order.

    `on_batch(indices, answers)` is called with each batch's answers as text as soon as they are generated.
    `grammars` (a `constrained.HFGrammars` and one grammar text per example) constrains each answer.
    """
    def decoded(indices: list[int], ids: list[list[int]]) -> None:
        on_batch(indices, decode_answers(tokenizer, ids))

    return decode_answers(tokenizer, generate_ids(model, tokenizer, examples, system_prompt, max_new_tokens,
                                                  batch_size, progress, on_batch=decoded if on_batch else None,
                                                  grammars=grammars))


def decode_answers(tokenizer: Any, ids: list[list[int]]) -> list[str]:
    """Answer token ids as the text that is scored (special tokens dropped, whitespace stripped)."""
    return [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in ids]


def generate_ids(model: Any, tokenizer: Any, examples: list[dict], system_prompt: str | None, max_new_tokens: int,
                 batch_size: int, progress: Any = None, share_prefixes: bool = True,
                 on_batch: Any = None, grammars: Any = None, references: list[list[int]] | None = None,
                 scores: dict[int, tuple[float, int]] | None = None) -> list[list[int]]:
    """Greedy answer token ids up to the trained end-of-turn token, in the input order.

    `batch_size` rows decode at once with continuous batching (`continuous.py`): a row leaves when it stops and a
    waiting prompt takes its place. Prompts that share a long prefix (test questions on one database schema) are
    prefilled as a group whose prefix is computed once: most of a text-to-SQL prompt is the schema.
    `share_prefixes=False` is the benchmark's "before": prompts sorted by length, left-padded, each batch run by
    `generate()` until its last row ends. `on_batch(indices, ids)` gets answers as soon as they exist.
    `grammars` (a `constrained.HFGrammars` and one grammar text per example) constrains each answer.
    `references` (one reference answer's ids per example, `metrics.reference_ids`): each is scored on its prompt's
    prefilled cache, (summed NLL, tokens) into `scores[example index]` before that example's answer is handed on.
    """
    if references is not None and not share_prefixes:
        raise ValueError("references are scored on the shared-prefix path only")
    prompts = [encode_prompt(tokenizer, ex, system_prompt) for ex in examples]
    stops = stop_token_ids(tokenizer, system_prompt)
    outputs: list[list[int]] = [[] for _ in prompts]

    def done(indices: list[int], answers: list[list[int]]) -> None:
        for i, tokens in zip(indices, answers, strict=True):
            outputs[i] = tokens
        if on_batch is not None:
            on_batch(indices, answers)
        if progress is not None:
            progress(len(indices))

    if share_prefixes:
        from tunebook.continuous import decode

        compiled = None
        if grammars:
            compiled = {i: grammars[0].compile(text) for i, text in enumerate(grammars[1]) if text is not None}
        groups = [(prefix, [(i, prompts[i]) for i in members]) for prefix, members in prefix_groups(prompts, batch_size)]
        decode(model, groups, batch_size, max_new_tokens, stops, tokenizer.pad_token_id, on_done=done,
               grammars=compiled, references=None if references is None else dict(enumerate(references)),
               scores=scores)
        return outputs
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        processor = grammars[0].processor([grammars[1][i] for i in idx]) if grammars else None
        done(idx, _generate_batch(model, tokenizer, [prompts[i] for i in idx], max_new_tokens, stops, processor))
    return outputs


def prefix_groups(prompts: list[list[int]], batch_size: int) -> list[tuple[int, list[int]]]:
    """(prefix length, indices) groups of at most `batch_size` prompts that share that many leading tokens, sorted by
    prefix length; a prompt in no shared group is a group of its own with all but its last token as prefix."""
    shared, rest = shared_prefix_batches(prompts, batch_size)
    return sorted(shared + [(len(prompts[i]) - 1, [i]) for i in rest], key=lambda g: (g[0], g[1]))


def shared_prefix_batches(prompts: list[list[int]], batch_size: int) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Batches of prompt indices that share a prefix of at least MIN_SHARED_PREFIX tokens, with that prefix length
    (always shorter than every member, so each has a token left to feed); and the indices in no such batch."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    batches: list[tuple[int, list[int]]] = []
    rest: list[int] = []
    group: list[int] = []
    common = 0

    def close() -> None:
        if len(group) > 1 and common >= MIN_SHARED_PREFIX:
            batches.append((common, list(group)))
        else:
            rest.extend(group)

    for i in order:
        if group:
            shared = min(common, _common_prefix(prompts[group[-1]], prompts[i]), len(prompts[i]) - 1)
            if shared >= MIN_SHARED_PREFIX and len(group) < batch_size:
                group.append(i)
                common = shared
                continue
            close()
        group, common = [i], len(prompts[i]) - 1
    if group:
        close()
    return batches, rest


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _generate_batch(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, stops: list[int],
                    processor: Any = None) -> list[list[int]]:
    """One left-padded batch through `generate()` (greedy), run until its last row stops."""
    import torch

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    extra: dict[str, Any] = {"logits_processor": [processor]} if processor is not None else {}
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, num_beams=1, use_cache=True, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
            temperature=None, top_p=None, top_k=None, **extra,
        )
    return [_through_stop(out[row, width:].tolist(), stops) for row in range(len(prompts))]


def _through_stop(tokens: list[int], stops: list[int]) -> list[int]:
    """An answer up to and including its first stop token (what follows is padding)."""
    cut = next((n for n, t in enumerate(tokens) if t in stops), None)
    return tokens if cut is None else tokens[: cut + 1]


def sample_batch(model: Any, tokenizer: Any, examples: list[dict], system_prompt: str | None, max_new_tokens: int,
                 n: int, temperature: float, seed: int, grammars: Any = None,
                 grammar_texts: list[str] | None = None, with_greedy: bool = False) -> list[list[list[int]]]:
    """`n` sampled answers to each prompt (token ids through the stop token, top-p 0.95), optionally
    grammar-constrained: the candidates verified decoding chooses from. All rows decode at once with continuous
    batching; each prompt is prefilled once and its cache shared by its `n` samples. `with_greedy` adds the
    prompt's greedy answer (`generate`'s) as an (n+1)-th, decoded beside its samples from the same prefill."""
    from tunebook.continuous import decode

    prompts = [encode_prompt(tokenizer, ex, system_prompt) for ex in examples]
    samples, n = n, n + with_greedy
    groups = [(len(prompt) - 1, [(i * n + k, prompt) for k in range(n)]) for i, prompt in enumerate(prompts)]
    greedy = frozenset(i * n + samples for i in range(len(prompts))) if with_greedy else frozenset()
    compiled = None
    if grammars is not None and grammar_texts is not None:
        compiled = {i * n + k: grammars.compile(text) for i, text in enumerate(grammar_texts) if text is not None
                    for k in range(n)}
    answers = decode(model, groups, len(prompts) * n, max_new_tokens, stop_token_ids(tokenizer, system_prompt),
                     tokenizer.pad_token_id, grammars=compiled, temperature=temperature, top_p=0.95, seed=seed,
                     greedy=greedy)
    return [[answers[i * n + k] for k in range(n)] for i in range(len(prompts))]


def stream_side_by_side(model: Any, tokenizer: Any, example: dict, system_prompt: str | None, max_new_tokens: int,
                        sides: tuple[str, ...] = ("base", "fine_tuned"), temperature: float = 0.0,
                        top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0, lock: Any = None) -> Any:
    """Yield {side: answer so far} after each new token, every side advancing one token per round.

    `model` is a PeftModel (the base side runs with its adapter switched off, as in eval) or a plain model (base
    only). Each side keeps its own KV cache and stops at the trained end-of-turn token. Temperature 0 is greedy,
    token for token what `generate` answers; otherwise transformers' own logits processors do the sampling.
    `lock` (a threading.Lock) is held for each round of forward passes and released before each yield, so
    requests sharing one model may interleave without one switching the other's adapter off.
    """
    import contextlib

    import torch
    from transformers import (
        DynamicCache,
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature > 0:
        processors.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)  # on the model's device: sampling runs there
    prompt = torch.tensor([encode_prompt(tokenizer, example, system_prompt)], device=device)
    stops = set(stop_token_ids(tokenizer, system_prompt))
    state = {side: {"ids": prompt, "cache": DynamicCache(), "answer": [], "done": False, "fed": prompt}
             for side in sides}

    def adapter(side: str) -> Any:
        off = side == "base" and hasattr(model, "disable_adapter")
        return model.disable_adapter() if off else contextlib.nullcontext()

    lock = lock or contextlib.nullcontext()
    with torch.no_grad():
        for _ in range(max_new_tokens):
            for side in sides:
                s = state[side]
                if s["done"]:
                    continue
                with lock, adapter(side):
                    out = model(input_ids=s["fed"], cache=s["cache"], use_cache=True)
                logits = processors(s["ids"], out.logits[:, -1, :].float())
                if temperature > 0:
                    token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
                else:
                    token = logits.argmax(-1, keepdim=True)
                s["cache"], s["fed"] = out.cache, token.to(device)
                s["ids"] = torch.cat([s["ids"], s["fed"]], dim=-1)
                if int(token) in stops:
                    s["done"] = True
                else:
                    s["answer"].append(int(token))
            yield {side: tokenizer.decode(state[side]["answer"], skip_special_tokens=True).strip() for side in sides}
            if all(state[side]["done"] for side in sides):
                return
