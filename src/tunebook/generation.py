"""Batched greedy generation that stops where the model was trained to stop (eval, export checks, the app)."""

from __future__ import annotations

import functools
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
                 on_batch: Any = None, grammars: Any = None) -> list[list[int]]:
    """Greedy answer token ids, batched with the KV cache, up to the trained end-of-turn token.

    Prompts that share a long prefix (test questions on the same database schema) form a group whose prefix is
    computed once: most of a text-to-SQL prompt is the schema, so this removes most of the prefill. Every other
    prompt is a group of its own, prefilled alone (at these sizes a prefill costs the same per token alone or
    padded in a batch). Groups are then packed whole into batches of `batch_size` rows, because a decode step costs
    little more for 16 rows than for 2. Answers come back in the input order. `share_prefixes=False` is the
    benchmark's "before": prompts sorted by length, left-padded, each batch prefilled in full by `generate()`.
    `on_batch(indices, ids)` gets each batch's answers as soon as they exist.
    """
    prompts = [encode_prompt(tokenizer, ex, system_prompt) for ex in examples]
    stops = stop_token_ids(tokenizer, system_prompt)
    outputs: list[list[int]] = [[] for _ in prompts]
    if share_prefixes and grammars is None:
        from tunebook.continuous import greedy

        def done(indices: list[int], answers: list[list[int]]) -> None:
            for i, tokens in zip(indices, answers, strict=True):
                outputs[i] = tokens
            if on_batch is not None:
                on_batch(indices, answers)
            if progress is not None:
                progress(len(indices))

        groups = [(prefix, [(i, prompts[i]) for i in members]) for prefix, members in prefix_groups(prompts, batch_size)]
        greedy(model, groups, batch_size, max_new_tokens, stops, tokenizer.pad_token_id, on_done=done)
        return outputs
    if share_prefixes:
        batches = pack_groups(prompts, batch_size)
    else:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        batches = [[(0, order[start:start + batch_size])] for start in range(0, len(order), batch_size)]
    for groups in batches:
        idx = [i for _, members in groups for i in members]
        processor = grammars[0].processor([grammars[1][i] for i in idx]) if grammars else None
        answers = _generate_batch(model, tokenizer, [(prefix, [prompts[i] for i in members]) for prefix, members in groups],
                                  max_new_tokens, stops, processor)
        for i, tokens in zip(idx, answers, strict=True):
            outputs[i] = tokens
        if on_batch is not None:
            on_batch(idx, answers)
        if progress is not None:
            progress(len(idx))
    return outputs


def prefix_groups(prompts: list[list[int]], batch_size: int) -> list[tuple[int, list[int]]]:
    """(prefix length, indices) groups of at most `batch_size` prompts that share that many leading tokens, sorted by
    prefix length; a prompt in no shared group is a group of its own with all but its last token as prefix."""
    shared, rest = shared_prefix_batches(prompts, batch_size)
    return sorted(shared + [(len(prompts[i]) - 1, [i]) for i in rest], key=lambda g: (g[0], g[1]))


def pack_groups(prompts: list[list[int]], batch_size: int) -> list[list[tuple[int, list[int]]]]:
    """Batches of at most `batch_size` prompts, each a list of whole `prefix_groups` (sorted by prefix length, so a
    batch pads its prefixes little)."""
    groups = prefix_groups(prompts, batch_size)
    batches: list[list[tuple[int, list[int]]]] = []
    rows = batch_size
    for group in groups:
        if rows + len(group[1]) > batch_size:
            batches.append([])
            rows = 0
        batches[-1].append(group)
        rows += len(group[1])
    return batches


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


@functools.cache
def _reserved_layer() -> type:
    """transformers' DynamicLayer with its keys and values in one buffer reserved for the whole batch, each new token
    written in place. DynamicLayer concatenates, copying the whole cache at every step: at SmolLM2's shapes on a
    CPU that copy was ~40% of a 16-row decode step."""
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        def __init__(self, keys: Any, values: Any, capacity: int) -> None:
            super().__init__()
            self.device, self.length, self.is_initialized = keys.device, keys.shape[-2], True
            self._keys = keys.new_empty(*keys.shape[:2], max(capacity, self.length), keys.shape[-1])
            self._values = values.new_empty(*values.shape[:2], max(capacity, self.length), values.shape[-1])
            self._keys[:, :, :self.length], self._values[:, :, :self.length] = keys, values
            self._view()

        def _view(self) -> None:
            self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            end = self.length + key_states.shape[-2]
            if end > self._keys.shape[-2]:  # past what was reserved: move to a buffer twice the size
                self._keys, self._values = _moved(self._keys, self.length, 2 * end), _moved(self._values, self.length,
                                                                                         2 * end)
            self._keys[:, :, self.length:end] = key_states
            self._values[:, :, self.length:end] = value_states
            self.length = end
            self._view()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def crop(self, tokens_to_remove: int) -> None:
            self.length -= abs(tokens_to_remove)
            self._view()

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self._view()

        def batch_select_indices(self, indices: Any) -> None:
            self._keys, self._values = self._keys[indices, ...], self._values[indices, ...]
            self._view()

    return ReservedLayer


def _moved(buffer: Any, length: int, capacity: int) -> Any:
    bigger = buffer.new_empty(*buffer.shape[:2], capacity, buffer.shape[-1])
    bigger[:, :, :length] = buffer[:, :, :length]
    return bigger


def reserved_cache(layers: list[tuple[Any, Any]], capacity: int) -> Any:
    """A DynamicCache holding these per-layer (keys, values), with room for `capacity` positions reserved."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layers = [_reserved_layer()(keys, values, capacity) for keys, values in layers]
    return cache


def _generate_batch(model: Any, tokenizer: Any, groups: list[tuple[int, list[list[int]]]], max_new_tokens: int,
                    stops: list[int], processor: Any = None) -> list[list[int]]:
    """One batch of groups, each (prefix length, prompts that share it). Row layout:
    [padding][group's prefix][padding][rest of the prompt]. Each group's prefix is prefilled once, alone, and its
    KV cache repeated for its members (a prefix of 0 leaves the whole prompt to `generate()`). Padding is masked
    out and position ids follow the mask, so every row sees exactly its own prompt at its own positions.
    """
    import torch

    device = next(model.parameters()).device
    prompts = [p for _, members in groups for p in members]
    prefix = max(length for length, _ in groups)
    tails = [p[length:] for length, members in groups for p in members]
    width = max(len(t) for t in tails)
    ids = torch.full((len(prompts), prefix + width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    row = 0
    for length, members in groups:
        for prompt in members:
            tail = prompt[length:]
            ids[row, prefix - length:prefix] = torch.tensor(prompt[:length], dtype=torch.long)
            mask[row, prefix - length:prefix] = 1
            ids[row, prefix + width - len(tail):] = torch.tensor(tail, dtype=torch.long)
            mask[row, prefix + width - len(tail):] = 1
            row += 1
    with torch.no_grad():
        cache = _prefilled(model, groups, prefix, prefix + width + max_new_tokens, device) if prefix else None
        if processor is None and cache is not None:
            return _greedy(model, ids.to(device), mask.to(device), cache, prefix, max_new_tokens, stops)
        extra: dict[str, Any] = {}
        if processor is not None:
            extra["logits_processor"] = [processor]
        if cache is not None:
            extra["cache"] = cache
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, num_beams=1, use_cache=True, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
            temperature=None, top_p=None, top_k=None, **extra,
        )
    return [_through_stop(out[row, prefix + width:].tolist(), stops) for row in range(len(prompts))]


def _through_stop(tokens: list[int], stops: list[int]) -> list[int]:
    """An answer up to and including its first stop token (what follows is padding)."""
    cut = next((n for n, t in enumerate(tokens) if t in stops), None)
    return tokens if cut is None else tokens[: cut + 1]


def _greedy(model: Any, ids: Any, mask: Any, cache: Any, cached: int, max_new_tokens: int,
            stops: list[int]) -> list[list[int]]:
    """Greedy decoding that drops each row from the batch as soon as it emits a stop token.

    Hand-written because `generate()` keeps finished rows in the batch until the last one ends: with answers of
    ~30 tokens and a limit of 80, most of a batch's decode steps were spent on rows already done. Dropping them is
    what makes a large batch cheap (a decode step's cost grows with its rows). Same tokens as `generate()`'s
    greedy search: argmax of the same logits, positions from the mask as `generate()` computes them.
    """
    import torch

    answers: list[list[int]] = [[] for _ in range(ids.shape[0])]
    alive = torch.arange(ids.shape[0], device=ids.device)
    stop = torch.tensor(stops, device=ids.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    step_ids, step_positions = ids[:, cached:], positions[:, cached:]
    for _ in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_positions, cache=cache,
                    use_cache=True, logits_to_keep=1)
        cache = out.cache
        tokens = out.logits[:, -1, :].argmax(-1)
        for row, token in zip(alive.tolist(), tokens.tolist(), strict=True):
            answers[row].append(token)
        done = torch.isin(tokens, stop)
        if bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            alive, tokens, mask, step_positions = alive[keep], tokens[keep], mask[keep], step_positions[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        step_ids, step_positions = tokens[:, None], step_positions[:, -1:] + 1
    return answers


def _prefilled(model: Any, groups: list[tuple[int, list[list[int]]]], prefix: int, capacity: int,
               device: Any) -> Any:
    """The batch's KV cache over its first `prefix` positions: each group's prefix computed once on its own,
    right-aligned (left-padded with zeros, which the mask hides) and repeated for the group's members."""
    import torch

    filled = [(length, len(members), model(input_ids=torch.tensor([members[0][:length]], device=device),
                                           use_cache=True, logits_to_keep=1).cache.layers if length else None)
              for length, members in groups]
    reference = next(layers for _, _, layers in filled if layers)
    merged = []
    for n, like in enumerate(reference):
        keys = like.keys.new_zeros(sum(len(m) for _, m in groups), like.keys.shape[1], prefix, like.keys.shape[-1])
        values = like.values.new_zeros(keys.shape[0], like.values.shape[1], prefix, like.values.shape[-1])
        row = 0
        for length, rows, layers in filled:
            if layers:
                keys[row:row + rows, :, prefix - length:] = layers[n].keys
                values[row:row + rows, :, prefix - length:] = layers[n].values
            row += rows
        merged.append((keys, values))
    return reserved_cache(merged, capacity)


def sample_batch(model: Any, tokenizer: Any, examples: list[dict], system_prompt: str | None, max_new_tokens: int,
                 n: int, temperature: float, seed: int, grammars: Any = None,
                 grammar_texts: list[str] | None = None) -> list[list[list[int]]]:
    """`n` sampled answers to each prompt (token ids through the stop token), optionally grammar-constrained, in
    one left-padded batch: the candidates verified decoding chooses from."""
    import torch

    device = next(model.parameters()).device
    prompts = [encode_prompt(tokenizer, ex, system_prompt) for ex in examples]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    stops = stop_token_ids(tokenizer, system_prompt)
    extra: dict[str, Any] = {}
    if grammars is not None and grammar_texts is not None:  # generate() repeats each row n times, in place
        extra["logits_processor"] = [grammars.processor([t for t in grammar_texts for _ in range(n)])]
    torch.manual_seed(seed)
    repeats = n
    with torch.no_grad():
        if n > 1 and width > 1:
            # Each prompt's KV cache is computed once and shared by its n samples; generate() with
            # num_return_sequences would prefill n copies of every prompt, most of the cost for long prompts.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = model(input_ids=ids[:, :-1].to(device), attention_mask=mask[:, :-1].to(device),
                          position_ids=positions[:, :-1].to(device), use_cache=True,
                          logits_to_keep=1).cache  # only the cache is used: no logits for every position
            cache.batch_repeat_interleave(n)
            extra["cache"] = cache
            ids, mask, repeats = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=True, temperature=temperature, top_p=0.95, top_k=None,
                             num_return_sequences=repeats, use_cache=True, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id, **extra)
    answers: list[list[list[int]]] = []
    for row in range(len(prompts)):
        group = []
        for k in range(n):
            tokens = out[row * n + k, width:].tolist()
            cut = next((j for j, t in enumerate(tokens) if t in stops), None)
            group.append(tokens if cut is None else tokens[: cut + 1])
        answers.append(group)
    return answers


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
