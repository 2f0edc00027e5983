"""Decoding with continuous batching: a row leaves the batch when it stops, and the next prompts take its slot.

Hand-written because `generate()` runs a batch until its last row ends. With SQL answers of ~30 tokens and a limit
of 80, most of a batch's decode steps then serve a few long rows, and on a CPU a decode step costs nearly as much
for 2 rows as for 16 (the weights are read either way). Here the batch stays full until the prompts run out.

Layout: each slot (batch row) holds its tokens right-aligned in one column window of the KV cache shared by every
slot; a row's columns left of its own start are masked out, and position ids are each row's own. Prompts that
share a long prefix (one database schema) are prefilled as a group whose prefix is computed once. Greedy tokens
are `generate()`'s greedy search: the argmax of the same logits. Sampling (verified decoding's candidates, DPO
pairs) uses transformers' top-p warper and a seeded generator.
"""

from __future__ import annotations

from collections import deque
from typing import Any

# A group: (prefix length, [(answer index, prompt token ids), ...]); its members share the first `prefix` tokens.
Group = tuple[int, list[tuple[int, list[int]]]]


class SlotWindow:
    """Per-layer key/value buffers [slots, heads, capacity, dim] and a mask [slots, capacity], read through one
    column window [start, end) shared by every slot. Columns outside a row's own tokens are masked out."""

    def __init__(self, like: list[tuple[Any, Any]], slots: int, longest: int, spare: int) -> None:
        import torch

        self.longest, self.spare = longest, spare  # the widest a window can be; room to append before moving
        # No columns yet: the first row sizes the buffers (`_fit`), and they grow only as wider rows join, so a
        # pass holds slots x (its widest running row + spare) columns, not slots x the longest prompt of all.
        self.keys = [k.new_zeros(slots, k.shape[0], 0, k.shape[-1]) for k, _ in like]  # like: [heads, n, dim]
        self.values = [v.new_zeros(slots, v.shape[0], 0, v.shape[-1]) for _, v in like]
        self.mask = torch.zeros(slots, 0, dtype=torch.long, device=like[0][0].device)
        self.start = self.end = 0

    @property
    def length(self) -> int:
        return self.end - self.start

    def _fit(self, width: int) -> None:
        """Make the window `width` columns wide (never narrower than it is), with a free column after it."""
        width = max(width, self.length)
        if self.end - width < 0 or self.end + 1 > self.mask.shape[-1]:
            self._move(max(width, min(self.longest, width + self.spare // 2)))  # room on the left for wider rows
        if self.end - width < self.start:
            self.mask[:, self.end - width:self.start] = 0
            self.start = self.end - width

    def _move(self, end: int, slots: list[int] | None = None) -> None:
        """Copy the window (of these slots only, when given) to end at column `end` of fresh buffers with `spare`
        columns after it."""
        import torch

        old, new = slice(self.start, self.end), slice(end - self.length, end)
        index = None if slots is None else torch.tensor(slots, device=self.mask.device)

        def moved(buffer: Any) -> Any:
            part = buffer[:, :, old] if buffer.dim() == 4 else buffer[:, old]
            part = part if index is None else part[index]
            if buffer.dim() == 4:
                fresh = buffer.new_zeros(part.shape[0], buffer.shape[1], end + self.spare, buffer.shape[-1])
                fresh[:, :, new] = part
            else:
                fresh = buffer.new_zeros(part.shape[0], end + self.spare)
                fresh[:, new] = part
            return fresh

        for layer in range(len(self.keys)):  # one layer at a time: the old buffers go as the new ones come
            self.keys[layer] = moved(self.keys[layer])
            self.values[layer] = moved(self.values[layer])
        self.mask = moved(self.mask)
        self.start, self.end = new.start, new.stop

    def place(self, slot: int, layers: list[tuple[Any, Any]], mask: Any) -> None:
        """Put one row (per layer keys and values [heads, n, dim], and its mask [n]) right-aligned in `slot`."""
        n = mask.shape[-1]
        self._fit(n)
        columns = slice(self.end - n, self.end)
        for keys, values, (row_keys, row_values) in zip(self.keys, self.values, layers, strict=True):
            keys[slot, :, columns] = row_keys
            values[slot, :, columns] = row_values
        self.mask[slot, self.start:self.end] = 0
        self.mask[slot, columns] = mask

    def open_column(self) -> Any:
        """Before a decode step: the attention mask over the window and the column the step appends."""
        self._fit(self.length)
        self.mask[:, self.end] = 1
        return self.mask[:, self.start:self.end + 1]

    def append(self, layer: int, keys: Any, values: Any) -> tuple[Any, Any]:
        """A decoder layer's new keys/values [slots, heads, 1, dim]: written in place, the window's returned."""
        self.keys[layer][:, :, self.end:self.end + 1] = keys
        self.values[layer][:, :, self.end:self.end + 1] = values
        window = slice(self.start, self.end + 1)
        return self.keys[layer][:, :, window], self.values[layer][:, :, window]

    def close_column(self) -> None:
        self.end += 1

    def trim(self, running: list[int]) -> None:
        """Drop the columns no running row uses (left of the earliest row's first token; all of them when no row
        runs: when every row of a batch stops at the same step, at the answer limit, the next prompts must not
        inherit its columns, or the window outgrows `longest`)."""
        if not running:
            self.start = self.end
            return
        first = int(self.mask[running, self.start:self.end].argmax(dim=-1).min())
        self.start += first

    def keep(self, slots: list[int]) -> None:
        """Keep only these slots, in this order (the batch shrinks once no prompt is waiting)."""
        self._move(self.length, slots)


def _slot_cache(window: SlotWindow) -> Any:
    """A transformers DynamicCache whose layers read and append through `window`."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        def __init__(self, layer: int) -> None:
            super().__init__()
            self.layer, self.is_initialized = layer, True

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            # Not kept on the layer: a view held here would keep a moved window's old buffers alive.
            return window.append(self.layer, key_states, value_states)

        def get_seq_length(self) -> int:
            return window.length

    cache = DynamicCache()
    cache.layers = [SlotLayer(n) for n in range(len(window.keys))]
    return cache


def prefill_group(model: Any, group: Group, pad_id: int, references: dict[int, list[int]] | None = None,
                  scores: dict[int, tuple[float, int]] | None = None) -> list[tuple[list[tuple[Any, Any]], Any]]:
    """Each member's KV cache over its prompt but the last token (per layer [heads, n, dim]) and its mask [n]:
    the shared prefix computed once, the rest of the prompts together, left-padded after the prefix. With
    `references` (answer index -> reference answer ids), each member's reference is scored into `scores`."""
    import torch

    prefix, members = group
    device = next(model.parameters()).device
    cache = None
    if prefix:
        cache = model(input_ids=torch.tensor([members[0][1][:prefix]], device=device), use_cache=True,
                      logits_to_keep=1).cache
    tails = [prompt[prefix:-1] for _, prompt in members]
    width = max(len(t) for t in tails)
    mask = torch.zeros(len(members), prefix + width, dtype=torch.long, device=device)
    mask[:, :prefix] = 1
    if width:
        ids = torch.full((len(members), width), pad_id, dtype=torch.long, device=device)
        positions = torch.ones_like(ids)
        for row, tail in enumerate(tails):
            if tail:
                ids[row, width - len(tail):] = torch.tensor(tail, device=device)
                positions[row, width - len(tail):] = torch.arange(prefix, prefix + len(tail), device=device)
                mask[row, prefix + width - len(tail):] = 1
        if cache is not None:
            cache.batch_repeat_interleave(len(members))
        cache = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                      logits_to_keep=1).cache
    rows = []
    for row in range(len(members)):
        one = 0 if width == 0 else row
        rows.append(([(layer.keys[one], layer.values[one]) for layer in cache.layers], mask[row]))
    if references is not None:
        if width == 0 and len(members) > 1:
            cache.batch_repeat_interleave(len(members))
        score_references(model, cache, mask, [prompt for _, prompt in members],
                         [references[index] for index, _ in members], pad_id, scores,
                         [index for index, _ in members])
    return rows


def score_references(model: Any, cache: Any, mask: Any, prompts: list[list[int]], references: list[list[int]],
                     pad_id: int, scores: dict[int, tuple[float, int]], indices: list[int]) -> None:
    """Each prompt's reference answer scored on its prefilled cache (the prompt but its last token): the summed
    negative log-likelihood of the reference tokens and their count into `scores[index]`.

    This is perplexity's forward without computing the prompts again: only the last prompt token and the answer are
    new. The cache gains their columns (new tensors: the rows `prefill_group` handed out keep the prompt's)."""
    import torch

    device = mask.device
    feeds = [[prompt[-1], *reference[:-1]] for prompt, reference in zip(prompts, references, strict=True)]
    width = max(len(f) for f in feeds)
    ids = torch.full((len(feeds), width), pad_id, dtype=torch.long, device=device)
    labels = torch.full((len(feeds), width), -100, dtype=torch.long, device=device)
    extra = torch.zeros(len(feeds), width, dtype=torch.long, device=device)
    positions = torch.stack([torch.arange(len(p) - 1, len(p) - 1 + width, device=device) for p in prompts])
    for row, (feed, reference) in enumerate(zip(feeds, references, strict=True)):
        ids[row, :len(feed)] = torch.tensor(feed, device=device)
        labels[row, :len(reference)] = torch.tensor(reference, device=device)
        extra[row, :len(feed)] = 1
    logits = model(input_ids=ids, attention_mask=torch.cat([mask, extra], dim=1), position_ids=positions,
                   cache=cache, use_cache=True).logits
    nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                            ignore_index=-100, reduction="none").view(labels.shape).sum(-1)
    for index, value, reference in zip(indices, nll.tolist(), references, strict=True):
        scores[index] = (value, len(reference))


class Constraints:
    """One xgrammar matcher per slot for the rows that have a grammar (`grammars`: answer index -> compiled
    grammar): before each argmax the logits of those rows are masked to the tokens their grammar allows, as
    xgrammar's own transformers LogitsProcessor does inside `generate()`."""

    def __init__(self, grammars: dict[int, Any], slots: int, vocab_size: int) -> None:
        import xgrammar as xgr

        self.xgr, self.grammars, self.vocab_size = xgr, grammars, vocab_size
        self.matchers: list[Any] = [None] * slots
        self.bitmask = xgr.allocate_token_bitmask(slots, vocab_size)

    def start(self, slot: int, index: int) -> None:
        grammar = self.grammars.get(index)
        self.matchers[slot] = None if grammar is None else self.xgr.GrammarMatcher(grammar)

    def keep(self, slots: list[int]) -> None:
        self.matchers = [self.matchers[s] for s in slots]
        self.bitmask = self.xgr.allocate_token_bitmask(len(slots), self.vocab_size)

    def mask(self, logits: Any, running: list[int]) -> tuple[Any, list[int]]:
        """The logits (float32) with each constrained running row masked; and those rows."""
        rows = [s for s in running if self.matchers[s] is not None and not self.matchers[s].is_terminated()]
        if not rows:
            return logits, rows
        logits = logits.float()
        for slot in rows:
            self.matchers[slot].fill_next_token_bitmask(self.bitmask, slot)
        self.xgr.apply_token_bitmask_inplace(logits, self.bitmask.to(logits.device), indices=rows)
        return logits, rows

    def accept(self, rows: list[int], tokens: list[int]) -> None:
        for slot, token in zip(rows, tokens, strict=True):
            if not self.matchers[slot].accept_token(token):
                raise RuntimeError(f"the grammar refused token {token} it had allowed")


NUCLEUS_CANDIDATES = 64  # tokens searched for the top-p nucleus before the whole vocabulary is sorted


def next_tokens(logits: Any, temperature: float, top_p: float, generator: Any) -> Any:
    """Greedy (temperature 0) or sampled next tokens: temperature, then top-p as transformers' warpers define them."""
    import torch

    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return sample_top_p(probs, top_p, generator)


def sample_top_p(probs: Any, top_p: float, generator: Any) -> Any:
    """One token per row from its top-p nucleus (`TopPLogitsWarper`'s: the most likely tokens, each kept while the
    mass above it is under `top_p`), drawn in proportion to its probability.

    Transformers sorts the whole 49k-word vocabulary of every row at every step and draws over all of it: a fifth
    of the DPO stage's sampling time on 2 cores (sort 12%, the draw 8%; torch.profiler, 16 prompts x 8 answers).
    The nucleus lies within the `NUCLEUS_CANDIDATES` most likely tokens whenever they hold `top_p` of the mass,
    as they do for nearly every row of a fine-tuned model; only the other rows sort the whole vocabulary.
    """
    top, ids = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
    tokens = _draw_from_nucleus(top, ids, top_p, generator)
    wide = top.sum(-1) < top_p
    if bool(wide.any()):
        tokens[wide] = _draw_from_nucleus(*probs[wide].sort(-1, descending=True), top_p, generator)
    return tokens


def _draw_from_nucleus(ranked: Any, ids: Any, top_p: float, generator: Any) -> Any:
    import torch

    keep = ranked.cumsum(-1) - ranked < top_p  # the mass above each token; the first is always kept
    choice = torch.multinomial(ranked * keep, 1, generator=generator)
    return ids.gather(-1, choice).squeeze(-1)


def decode(model: Any, groups: list[Group], slots: int, max_new_tokens: int, stops: list[int], pad_id: int,
           on_done: Any = None, spare: int | None = None, grammars: dict[int, Any] | None = None,
           vocab_size: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
           seed: int = 0, greedy: set[int] | frozenset[int] = frozenset(),
           references: dict[int, list[int]] | None = None,
           scores: dict[int, tuple[float, int]] | None = None) -> dict[int, list[int]]:
    """Answers (token ids through the stop token) to every group's prompts, greedy, `slots` rows decoding at once.
    `on_done(indices, answers)` gets answers as rows finish. Every prompt has at least two tokens (a chat turn).
    `spare`: columns the cache keeps free to append into before its window moves (default 2 × max_new_tokens).
    `grammars` (answer index -> xgrammar compiled grammar over `vocab_size` tokens) constrains those answers.
    `temperature` > 0 samples instead (top-p `top_p`, a generator seeded with `seed`), except the answers in
    `greedy`, which take the argmax as at temperature 0. `references` (answer index -> reference answer ids): each
    prompt's reference is scored on its prefilled cache, (summed NLL, tokens) into `scores` before it decodes."""
    import torch

    device = next(model.parameters()).device
    pending = deque(groups)
    longest = max(len(prompt) for _, members in groups for _, prompt in members) + max_new_tokens
    window: SlotWindow | None = None
    cache = None
    owner = [-1] * slots  # the answer index each slot decodes, -1 when free
    fed = torch.full((slots,), pad_id, dtype=torch.long, device=device)
    positions = torch.zeros(slots, dtype=torch.long, device=device)
    constraints = Constraints(grammars, slots, vocab_size or model.config.vocab_size) if grammars else None
    answers: dict[int, list[int]] = {}
    stop = set(stops)
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    with torch.no_grad():
        while True:
            free = [s for s in range(len(owner)) if owner[s] < 0]
            while pending and len(pending[0][1]) <= len(free):
                prefix, members = pending.popleft()
                prefilled = prefill_group(model, (prefix, members), pad_id, references, scores)
                for (index, prompt), (layers, mask) in zip(members, prefilled, strict=True):
                    if window is None:
                        window = SlotWindow(layers, slots, longest, spare or 2 * max_new_tokens)
                        cache = _slot_cache(window)
                    slot = free.pop(0)
                    window.place(slot, layers, mask)
                    owner[slot], answers[index] = index, []
                    fed[slot], positions[slot] = prompt[-1], len(prompt) - 1
                    if constraints is not None:
                        constraints.start(slot, index)
            running = [s for s in range(len(owner)) if owner[s] >= 0]
            if not running:
                return answers
            if not pending and len(running) * 4 <= len(owner) * 3:  # nothing waits: shrink the batch to its rows
                window.keep(running)
                if constraints is not None:
                    constraints.keep(running)
                owner, fed, positions = [owner[s] for s in running], fed[running], positions[running]
                running = list(range(len(owner)))
            mask = window.open_column()
            out = model(input_ids=fed[:, None], attention_mask=mask, position_ids=positions[:, None], cache=cache,
                        use_cache=True, logits_to_keep=1)
            window.close_column()
            logits, constrained = out.logits[:, -1, :], []
            if constraints is not None:
                logits, constrained = constraints.mask(logits, running)
            tokens = next_tokens(logits, temperature, top_p, generator)
            if greedy and temperature > 0:
                argmax = [s for s in running if owner[s] in greedy]
                if argmax:
                    tokens[argmax] = logits[argmax].argmax(-1)
            if constrained:
                constraints.accept(constrained, tokens[constrained].tolist())
            done = []
            for slot, token in zip(running, tokens[running].tolist(), strict=True):
                answer = answers[owner[slot]]
                answer.append(token)
                if token in stop or len(answer) >= max_new_tokens:
                    done.append(owner[slot])
                    owner[slot] = -1
            fed, positions = tokens, positions + 1
            if done:
                window.trim([s for s in range(len(owner)) if owner[s] >= 0])
                if on_done is not None:
                    on_done(done, [answers[i] for i in done])
