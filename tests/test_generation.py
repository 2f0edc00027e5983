"""Generation: batched, shared-prefix, continuously batched and sampled generation give the tokens of one prompt
alone through transformers' own `generate()`."""

from __future__ import annotations

from transformers import AutoModelForCausalLM

from tunebook.continuous import decode
from tunebook.data import read_split
from tunebook.generation import generate, generate_ids, prefix_groups, sample_batch, shared_prefix_batches
from tunebook.prompts import encode_prompt, stop_token_ids


def test_batched_generation_equals_one_at_a_time(tiny_model_dir, tokenizer, sql_data):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer.padding_side = "left"
    rows = read_split(sql_data / "test.jsonl")[:6]
    batched = generate_ids(model, tokenizer, rows, "sys", max_new_tokens=12, batch_size=6)
    single = [generate_ids(model, tokenizer, [row], "sys", max_new_tokens=12, batch_size=1, share_prefixes=False)[0]
              for row in rows]
    assert batched == single
    assert all(len(tokens) > 0 for tokens in batched)
    texts = generate(model, tokenizer, rows, "sys", max_new_tokens=12, batch_size=4)
    assert texts == [tokenizer.decode(t, skip_special_tokens=True).strip() for t in single]


def test_shared_prefix_batches_equal_one_at_a_time(tiny_model_dir, tokenizer, sql_data):
    """Questions on one schema are generated from a cached schema prefix: same tokens as each prompt alone."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer.padding_side = "left"
    test = read_split(sql_data / "test.jsonl")
    db = next(r["db_id"] for r in test if sum(x["db_id"] == r["db_id"] for x in test) >= 4)
    rows = [r for r in test if r["db_id"] == db][:4] + [r for r in test if r["db_id"] != db][:2]
    batches, rest = shared_prefix_batches([encode_prompt(tokenizer, r, "sys") for r in rows], batch_size=8)
    assert batches and sorted(batches[0][1]) == [0, 1, 2, 3] and batches[0][0] > 48
    batched = generate_ids(model, tokenizer, rows, "sys", max_new_tokens=12, batch_size=8)
    single = [generate_ids(model, tokenizer, [row], "sys", max_new_tokens=12, batch_size=1, share_prefixes=False)[0]
              for row in rows]
    assert batched == single


def test_continuous_batching_gives_generates_answers_as_rows_leave_and_join(base_model_dir, tokenizer, sql_data):
    """The real SmolLM2 stops at different lengths, so with 3 slots for 9 prompts rows leave and waiting prompts
    (longer ones, so the window widens) take their place; the window moves when it runs out of columns and the
    batch shrinks at the end. Every answer is `generate()`'s greedy answer to that prompt alone."""
    model = AutoModelForCausalLM.from_pretrained(base_model_dir).eval()
    tokenizer.padding_side = "left"
    rows = read_split(sql_data / "test.jsonl")[:9]
    system = "You write SQLite queries. Answer with the query only, no explanation."
    seen: list[int] = []
    continuous = generate_ids(model, tokenizer, rows, system, max_new_tokens=60, batch_size=3,
                              on_batch=lambda indices, answers: seen.extend(indices))
    alone = [generate_ids(model, tokenizer, [row], system, max_new_tokens=60, batch_size=1, share_prefixes=False)[0]
             for row in rows]
    assert continuous == alone
    assert sorted(seen) == list(range(len(rows)))
    assert len({len(a) for a in alone}) > 3 and min(len(a) for a in alone) < 30  # rows did leave early
    # A window with 4 spare columns moves every few steps: still the same answers.
    prompts = [encode_prompt(tokenizer, row, system) for row in rows]
    groups = [(prefix, [(i, prompts[i]) for i in members]) for prefix, members in prefix_groups(prompts, 3)]
    moved = decode(model, groups, 3, 60, stop_token_ids(tokenizer, system), tokenizer.pad_token_id, spare=4)
    assert [moved[i] for i in range(len(rows))] == alone


def test_batches_that_all_stop_at_the_limit_at_once_hand_over_a_clean_window(tiny_model_dir, tokenizer, sql_data):
    """A model that never stops (here: no stop token) runs every row of a batch to the answer limit in lockstep,
    as a base model rambling on every question does: the next prompts start in a window of their own, batch after
    batch, and get the answers they get alone."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer.padding_side = "left"
    rows = read_split(sql_data / "test.jsonl")[:8]
    prompts = [encode_prompt(tokenizer, row, "sys") for row in rows]
    groups = [(0, [(i, prompt)]) for i, prompt in enumerate(prompts)]
    together = decode(model, groups, 2, 24, [], tokenizer.pad_token_id, spare=4)
    alone = [decode(model, [(0, [(0, prompt)])], 1, 24, [], tokenizer.pad_token_id)[0] for prompt in prompts]
    assert [together[i] for i in range(len(rows))] == alone
    assert {len(answer) for answer in alone} == {24}, "every row ran to the limit"


def test_samples_share_their_prompts_prefill(tiny_model_dir, tokenizer, sql_data):
    """Each prompt's cache is computed once for its samples; at a temperature near 0 every sample is the greedy
    answer of that prompt alone, so positions and padding are right for every row."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer.padding_side = "left"
    rows = read_split(sql_data / "test.jsonl")[:5]
    greedy = [generate_ids(model, tokenizer, [row], "sys", max_new_tokens=10, batch_size=1)[0] for row in rows]
    samples = sample_batch(model, tokenizer, rows, "sys", 10, n=3, temperature=1e-4, seed=1)
    assert [len(group) for group in samples] == [3] * len(rows)
    assert all(answer == greedy[i] for i, group in enumerate(samples) for answer in group)
    # The greedy answer decoded beside real samples (a DPO stage's `rejected: greedy`) is still the greedy answer.
    hot = sample_batch(model, tokenizer, rows, "sys", 10, n=3, temperature=1.5, seed=1, with_greedy=True)
    assert [len(group) for group in hot] == [4] * len(rows)
    assert [group[-1] for group in hot] == greedy
    assert any(answer != greedy[i] for i, group in enumerate(hot) for answer in group[:-1]), "the others sample"


def test_top_p_draws_from_transformers_nucleus_in_proportion(monkeypatch):
    import torch
    from transformers import TopPLogitsWarper

    import tunebook.continuous as continuous

    monkeypatch.setattr(continuous, "NUCLEUS_CANDIDATES", 8)  # a 40-word vocabulary: some nuclei are wider (ties
    # aside, which transformers breaks by its sort order: none here)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=generator) * torch.tensor([[8.0], [4.0], [2.0], [1.0], [0.5], [0.2]])
    probs = torch.softmax(logits, -1)
    kept = TopPLogitsWarper(0.9)(None, logits.clone()) > float("-inf")
    assert kept.sum(-1).min() == 1 and kept.sum(-1).max() > 8, "narrow and wider-than-candidates nuclei"
    draws = torch.stack([continuous.sample_top_p(probs, 0.9, generator) for _ in range(4000)])
    for row in range(len(logits)):
        counts = torch.bincount(draws[:, row], minlength=40).float()
        assert kept[row][counts > 0].all(), "nothing outside transformers' nucleus is drawn"
        expected = probs[row] * kept[row] / (probs[row] * kept[row]).sum()
        assert torch.allclose(counts / len(draws), expected, atol=0.03), row


def test_the_window_holds_the_rows_it_runs_and_frees_what_it_moves_from():
    """The KV buffers are sized by the rows in the window (plus room to append), not by the longest prompt of the
    whole pass, grow when a wider row joins with every row's keys kept in place, and a move frees the old buffers
    at once, even after the cache has handed them to a decode step (a 300-row SQL eval peaked at 21 GB before)."""
    import weakref

    import torch

    from tunebook.continuous import SlotWindow, _slot_cache

    def row(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.randn(3, n, 4), torch.randn(3, n, 4)) for _ in range(2)]  # 2 layers, 3 heads, dim 4

    first = row(10)
    window = SlotWindow(first, slots=2, longest=1000, spare=8)
    window.place(0, first, torch.ones(10, dtype=torch.long))
    assert window.length == 10 and window.keys[0].shape[2] <= 10 + 8 + 8
    before = weakref.ref(window.keys[0])
    window.place(1, row(30), torch.ones(30, dtype=torch.long))  # wider than the room left: the buffers grow
    assert window.length == 30 and 31 <= window.keys[0].shape[2] <= 30 + 8 + 8
    assert before() is None
    assert torch.equal(window.keys[1][0, :, window.end - 10:window.end], first[1][0])
    assert window.mask[0, window.start:window.end].tolist() == [0] * 20 + [1] * 10

    cache = _slot_cache(window)
    window.open_column()
    for layer in cache.layers:  # a decode step appends one column to every layer
        keys, values = layer.update(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4))
        assert keys.shape == (2, 3, 31, 4)
    window.close_column()
    del keys, values
    before = weakref.ref(window.keys[0])
    window.keep([1])  # the batch shrinks to one row
    assert before() is None and window.keys[0].shape[0] == 1 and window.length == 31
