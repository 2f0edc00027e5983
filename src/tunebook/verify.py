"""Verified decoding: answers constrained to what can exist, and checked without the reference answer.

A metric that can judge one answer on its own says how (`metrics.Metric.grammar` and `.check`): SQL answers are
constrained to the row's schema and SQLite's grammar (`sql_grammar.py`) and must run on the row's database; JSON
answers must parse; code must parse. Verified decoding takes the constrained greedy answer when it passes the
check; otherwise it samples a few constrained candidates and keeps the first that passes (execution-guided
decoding), falling back to the greedy answer. The row it sees has its reference answer removed
(`without_reference`), so no choice can depend on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunebook.config import Recipe
from tunebook.prompts import is_chat

CANDIDATES = 4
TEMPERATURE = 0.7


@dataclass(frozen=True)
class Verifier:
    """How to constrain and check one task's answers: a grammar per row, a check per answer (0 = fails, up
    to `best` = passes whole: for SQL, 1 = runs, 2 = runs and returns rows), and a repair of a failing answer
    from the row's own context (None: the task has none)."""

    grammar: Callable[[dict, Path], str | None] | None
    check: Callable[[str, dict, Path], int]
    best: int = 1
    repair: Callable[[str, dict, Path], str | None] | None = None

    def judge(self, row: dict, data_file: Path) -> Callable[[str], tuple[str, int]]:
        """For one row (without its reference): answer -> (the answer or its repair, whichever passes better;
        its score)."""
        def judged(answer: str) -> tuple[str, int]:
            score = self.check(answer, row, data_file)
            if score < self.best and self.repair is not None:
                fixed = self.repair(answer, row, data_file)
                if fixed is not None and (fixed_score := self.check(fixed, row, data_file)) > score:
                    return fixed, fixed_score
            return answer, score

        return judged


def verifier_for(recipe: Recipe) -> Verifier | None:
    """The first chosen metric that can judge an answer on its own, as a Verifier (None: the task has none)."""
    from tunebook.metrics import METRICS

    for name in recipe.eval.metrics:
        metric = METRICS[name]
        if metric.check is not None:
            return Verifier(metric.grammar, metric.check, metric.check_best, metric.repair)
    return None


def without_reference(row: dict) -> dict:
    """The row as verified decoding may see it: the question, its context (database), never the answer."""
    if is_chat(row):
        return {**row, "messages": row["messages"][:-1]}
    return {k: v for k, v in row.items() if k != "output"}


@dataclass
class Tally:
    """How verified decoding got its answers."""

    greedy_passed: int = 0
    repaired: int = 0
    rescued: int = 0
    failed: int = 0
    from_plain: int = 0  # constrained greedy answers taken from the plain pass (not part of the choice counts)

    def as_dict(self) -> dict[str, int]:
        return {"greedy_passed": self.greedy_passed, "greedy_repaired": self.repaired,
                "rescued_by_a_candidate": self.rescued, "no_candidate_passed": self.failed}


def choose(greedy: tuple[str, int], candidates: list[str], judge: Callable[[str], tuple[str, int]], best: int,
           tally: Tally, raw: str) -> str:
    """The judged greedy answer (`raw` as generated, `greedy` as judged) if it passes whole, else the first
    judged candidate that passes best (ties: the greedy answer, then candidate order)."""
    chosen, top = greedy
    from_greedy = True
    if top < best:
        for answer in candidates:
            text, score = judge(answer)
            if score > top:
                (chosen, top), from_greedy = (text, score), False
            if top == best:
                break
    if top < best:
        tally.failed += 1
    elif not from_greedy:
        tally.rescued += 1
    elif chosen == raw:
        tally.greedy_passed += 1
    else:
        tally.repaired += 1
    return chosen


def row_grammars(verifier: Verifier, rows: list[dict], data_file: Path) -> list[str | None]:
    if verifier.grammar is None:
        return [None] * len(rows)
    return [verifier.grammar(without_reference(row), data_file) for row in rows]


def row_key(row: dict) -> str:
    """A row as the key of its greedy answer within one eval (the row fixes the prompt)."""
    return json.dumps(row, sort_keys=True, default=str)


def hf_verified(model: Any, tokenizer: Any, rows: list[dict], progress: Any,
                on_batch: Callable[[list[int], list[str]], None], *, data_file: Path, recipe: Recipe,
                verifier: Verifier, tally: Tally, plain: dict[str, list[int]] | None = None) -> None:
    """Verified answers from a transformers model into `on_batch` (the eval journal) as they are settled: a row
    whose constrained greedy answer passes at once; failing rows once candidates have been sampled for them, in
    calls of about `eval.batch_size` candidates.

    `plain` holds the same model's unconstrained greedy answer ids by `row_key`: a row whose plain answer the
    grammar takes token by token has that answer as its constrained greedy one (`HFGrammars.follows`), so only
    the other rows are decoded again."""
    from tunebook.constrained import HFGrammars
    from tunebook.generation import decode_answers, generate, sample_batch
    from tunebook.prompts import stop_token_ids

    system = recipe.data.system_prompt
    texts = row_grammars(verifier, rows, data_file)
    hf = None
    if all(t is not None for t in texts):
        hf = HFGrammars(tokenizer, model.config.vocab_size, stop_token_ids(tokenizer, system))
    views = [without_reference(row) for row in rows]
    # failing rows' greedy answers (as generated, as judged), until their candidates are sampled
    waiting: dict[int, tuple[str, tuple[str, int]]] = {}

    judges = [verifier.judge(view, data_file) for view in views]

    def sample_waiting() -> None:
        # At most a call's worth of prompts: the rows whose plain answers are checked at once (all of them, when
        # the plain pass ran first) would otherwise sample every failing row in one call, each prompt with its
        # own KV cache per candidate (13 GB for 300 SQL rows on SmolLM2).
        failing = list(waiting)[:max(1, recipe.eval.batch_size // CANDIDATES)]
        ids = sample_batch(model, tokenizer, [rows[i] for i in failing], system, recipe.eval.max_new_tokens,
                           CANDIDATES, TEMPERATURE, seed=failing[0], grammars=hf,
                           grammar_texts=[texts[i] for i in failing] if hf else None)
        final = []
        for i, group in zip(failing, ids, strict=True):
            answer, judged = waiting.pop(i)
            final.append(choose(judged, decode_answers(tokenizer, group), judges[i], verifier.best, tally, answer))
        on_batch(failing, final)

    def checked(indices: list[int], answers: list[str]) -> None:
        passed = []
        for i, answer in zip(indices, answers, strict=True):
            judged = judges[i](answer)
            if judged[1] < verifier.best:
                waiting[i] = answer, judged
            else:
                passed.append((i, choose(judged, [], judges[i], verifier.best, tally, answer)))
        if passed:
            on_batch([i for i, _ in passed], [a for _, a in passed])
        while len(waiting) * CANDIDATES >= recipe.eval.batch_size:
            sample_waiting()

    known = {}
    for i, row in enumerate(rows):
        ids = (plain or {}).get(row_key(row))
        if ids is not None and (hf is None or hf.follows(texts[i], ids)):
            known[i] = ids
    tally.from_plain += len(known)
    if known:
        checked(list(known), decode_answers(tokenizer, list(known.values())))
        if progress is not None:
            progress(len(known))
    todo = [i for i in range(len(rows)) if i not in known]
    if todo:
        generate(model, tokenizer, [rows[i] for i in todo], system, recipe.eval.max_new_tokens,
                 recipe.eval.batch_size, progress, grammars=(hf, [texts[i] for i in todo]) if hf else None,
                 on_batch=lambda idx, answers: checked([todo[j] for j in idx], answers))
    while waiting:
        sample_waiting()


def gguf_verified(llm: Any, tokenizer: Any, rows: list[dict], progress: Any,
                  on_batch: Callable[[list[int], list[str]], None], *, data_file: Path, recipe: Recipe,
                  verifier: Verifier, tally: Tally) -> None:
    """Verified answers from a GGUF file through llama.cpp's own GBNF sampler, one row at a time."""
    from tunebook.constrained import llama_grammar
    from tunebook.generation import decode_answers
    from tunebook.prompts import encode_prompt, stop_token_ids

    system = recipe.data.system_prompt
    stops = stop_token_ids(tokenizer, system)
    texts = row_grammars(verifier, rows, data_file)
    max_new = recipe.eval.max_new_tokens
    prompts = [encode_prompt(tokenizer, row, system) for row in rows]
    for i in sorted(range(len(rows)), key=lambda i: prompts[i]):  # shared prefixes stay in llama.cpp's cache
        grammar = llama_grammar(texts[i]) if texts[i] else None
        judge = verifier.judge(without_reference(rows[i]), data_file)
        greedy = decode_answers(tokenizer, [_llama_answer(llm, prompts[i], stops, max_new, grammar, 0.0, 0)])[0]
        judged = judge(greedy)
        candidates = []
        if judged[1] < verifier.best:
            candidates = decode_answers(tokenizer, [_llama_answer(llm, prompts[i], stops, max_new, grammar,
                                                                  TEMPERATURE, i * 31 + k) for k in range(CANDIDATES)])
        on_batch([i], [choose(judged, candidates, judge, verifier.best, tally, greedy)])
        if progress is not None:
            progress(1)


def _llama_answer(llm: Any, prompt: list[int], stops: list[int], max_new: int, grammar: Any, temperature: float,
                  seed: int) -> list[int]:
    answer: list[int] = []
    if temperature > 0:
        llm.set_seed(seed)
    kwargs = {"temp": 0.0, "top_k": 1} if temperature == 0 else {"temp": temperature, "top_k": 40, "top_p": 0.95}
    for token in llm.generate(prompt, reset=True, grammar=grammar, **kwargs):
        answer.append(token)
        if token in stops or len(answer) >= max_new:
            break
    return answer
