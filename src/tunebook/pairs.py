"""Preference pairs for DPO, without people: the parent adapter's own answers, judged by the task's metric.

For each training prompt (a seeded sample of `stage.prompts`, among those that leave room for an answer within
`data.max_length`), the parent samples `stage.samples` answers; the
judge scores each: the stage's reward if it names one (`stage.rewards`), else the task's first metric that scores
one answer (`rewards.py`: for SQL, execution in the sandbox against the gold result; for review, ruff). The chosen
answer is a sample that scored full marks — an execution-verified answer — or, when none did, the reference
itself (correct by construction; `stage.chosen: sample` skips such prompts instead, so that both answers of
every pair are the parent's own: on-policy pairs; `stage.chosen: best` chooses the best-scoring answers, full marks
or not, over the lower-scoring ones); the rejected answer is the lowest-scoring sample (or, with
`stage.rejected: nearest_length`, the wrong one nearest the chosen in length; with `stage.rejected: greedy`, the
parent's greedy answer, the one eval scores, wherever it is wrong, else as `nearest_length`); `stage.pairs_per_prompt` makes up to
that many pairs of a prompt, each with another of its distinct wrong answers; `stage.max_length_gap` makes no pair
whose answers differ by more than that many tokens. Prompts whose samples all scored
full marks teach nothing and are skipped. A recipe may instead give its own rows in TRL's preference format
(`prompt`/`chosen`/`rejected`, plain text or conversational), used as they are.

The sampled answers are kept in models/pairs/<run>.samples.jsonl (the greedy ones in <run>.greedy.jsonl) and reused
while the parent adapter and the sampling settings are unchanged; the pairs, with each answer's score, in models/pairs/<run>.jsonl, remade from the
kept answers when only the judge or the pairing rule (`stage.chosen`, `stage.rejected`) changed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from tunebook import outputs
from tunebook.prompts import is_preference, reference_answer, render_messages, render_prompt
from tunebook.stages import stage_prompts


def pair_from_preference_row(row: dict, tokenizer: Any, system: str | None) -> dict[str, str]:
    """A user's preference row as the trainer's text: the prompt rendered by prompts.py, the answers as text."""
    prompt = row["prompt"]
    if isinstance(prompt, list):
        messages = ([{"role": "system", "content": system}] if system and prompt[0]["role"] != "system" else [])
        text = render_messages(tokenizer, messages + prompt, add_generation_prompt=True)
    else:
        text = render_prompt(tokenizer, {"instruction": prompt, "input": ""}, system)

    def answer(value: Any) -> str:
        return value[-1]["content"] if isinstance(value, list) else str(value)

    return {"prompt": text, "chosen": answer(row["chosen"]), "rejected": answer(row["rejected"])}


def preference_pairs(run: Any, rows: list[dict], parent: Path, tokenizer: Any) -> tuple[list[dict], dict[str, Any]]:
    """The DPO rows of a stage and what was done to make them (for run_info)."""
    recipe = run.recipe
    system = recipe.data.system_prompt
    if rows and is_preference(rows[0]):
        return [pair_from_preference_row(r, tokenizer, system) for r in rows], {"source": recipe.data.train,
                                                                               "pairs": len(rows)}
    path = outputs.pairs_file(run.name)
    key = pairs_key(recipe, parent)
    cached = read_cached(path, key)
    if cached is None:
        model = functools.cache(lambda: sampling_model(recipe, parent, tokenizer))
        sampled = sampled_answers(run, rows, parent, tokenizer, model, with_greedy=recipe.stage.rejected == "greedy")
        if recipe.stage.rejected == "greedy":
            sampled = [{**item, "greedy": answer}
                       for item, answer in zip(sampled, greedy_answers(run, rows, parent, tokenizer, sampled, model),
                                               strict=True)]
        cached = pair_samples(recipe, rows, tokenizer, sampled)
        write_cached(path, key, cached)
    facts = {"source": str(path), "pairs": len(cached), "judge": judge_name(recipe), "chosen": recipe.stage.chosen,
             "chosen_from_samples": sum(p["chosen_source"] == "sample" for p in cached),
             "chosen_repaired": sum(p["chosen_source"] == "repair" for p in cached),
             "chosen_reference": sum(p["chosen_source"] == "reference" for p in cached)}
    if recipe.stage.rejected == "greedy":
        facts["rejected_greedy"] = sum(p.get("rejected_source") == "greedy" for p in cached)
    return [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in cached], facts


def pairs_key(recipe: Any, parent: Path) -> str:
    """What the pairs depend on: the samples (`samples_key`), the judge and the pairing rule; not the DPO trainer's
    settings, so a new `dpo.max_steps` or learning rate reuses them."""
    facts = {"samples": samples_key(recipe, parent), "stage": dataclasses.asdict(recipe.stage),
             "metrics": recipe.eval.metrics}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def samples_key(recipe: Any, parent: Path) -> str:
    """What the sampled answers depend on: the parent's weights, the sampling settings, the data, the prompt and the
    seed; not the judge or the pairing rule, so changing those re-judges the same answers without sampling again."""
    from tunebook.outputs import ADAPTER_WEIGHTS

    stage = recipe.stage
    facts = {"parent": hashlib.sha256((parent / ADAPTER_WEIGHTS).read_bytes()).hexdigest(),
             "sampling": [stage.samples, stage.temperature, stage.prompts], "data": dataclasses.asdict(recipe.data),
             "model": recipe.model.name, "max_new_tokens": recipe.eval.max_new_tokens, "seed": recipe.seed,
             "prompts": "leave room for an answer within data.max_length"}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def read_cached(path: Path, key: str) -> list[dict] | None:
    """The rows of a keyed JSONL file (first line: its key), or None when absent or made from other inputs."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    if not lines or json.loads(lines[0]).get("key") != key:
        return None
    return [json.loads(line) for line in lines[1:] if line.strip()]


def write_cached(path: Path, key: str, rows: list[dict]) -> None:
    outputs.write_text_atomic(path, "\n".join([json.dumps({"key": key}),
                                               *(json.dumps(r, ensure_ascii=False) for r in rows)]) + "\n")


PROMPTS_PER_BATCH = 16  # x stage.samples sequences per generate call; 16 beat 8 by ~12% per prompt (2-core Xeon)


def sampling_model(recipe: Any, parent: Path, tokenizer: Any) -> Any:
    """The parent (base + its adapter) for sampling and greedy answers."""
    from tunebook.evaluate import load_pass_model

    model = load_pass_model(recipe, ["fine_tuned"], parent)
    if recipe.model.quantization == "none":
        model.merge_adapter()  # sampling with the adapter folded in skips two small matmuls per LoRA layer and token
    tokenizer.padding_side = "left"
    return model


def sampled_answers(run: Any, rows: list[dict], parent: Path, tokenizer: Any, model: Any,
                    with_greedy: bool = False) -> list[dict]:
    """`stage.samples` answers of the parent to each of `stage.prompts` training prompts (a seeded choice), as
    {"row": index into rows, "answers": [...]}; kept in models/pairs/<run>.samples.jsonl and reused. `model()`
    gives the parent (loaded once, only when something is sampled). `with_greedy`: each prompt's greedy answer is
    decoded beside its samples, from the same prefill, and kept as `greedy_answers` keeps it."""
    from tunebook.generation import decode_answers, sample_batch
    from tunebook.progress import progress_bar, rate_updater

    recipe = run.recipe
    path, key = outputs.samples_file(run.name), samples_key(recipe, parent)
    cached = read_cached(path, key)
    if cached is not None:
        print(f"samples: reusing {len(cached)} prompts' answers from {path}")
        return cached
    lengths = stage_prompts(recipe, rows, tokenizer, recipe.eval.max_new_tokens)
    model = model()
    # Batches of similar length pad little: one long schema in a batch would make every row pay for it.
    indices = sorted(lengths, key=lengths.__getitem__)
    sampled, greedy = [], []
    label = f"sampling {recipe.stage.samples} answers per prompt" + (" and the greedy one" if with_greedy else "")
    with progress_bar(label) as bar:
        advance = rate_updater(bar, bar.add_task(label, total=len(indices), rate=""), time.perf_counter())
        for start in range(0, len(indices), PROMPTS_PER_BATCH):
            batch = indices[start:start + PROMPTS_PER_BATCH]
            samples = sample_batch(model, tokenizer, [rows[i] for i in batch], recipe.data.system_prompt,
                                   recipe.eval.max_new_tokens, recipe.stage.samples, recipe.stage.temperature,
                                   seed=recipe.seed + start, with_greedy=with_greedy)
            for i, ids in zip(batch, samples, strict=True):
                answers = decode_answers(tokenizer, ids)
                sampled.append({"row": i, "answers": answers[:recipe.stage.samples]})
                greedy += [{"row": i, "greedy": a} for a in answers[recipe.stage.samples:]]
            advance(len(batch))
    if with_greedy:
        write_cached(outputs.greedy_file(run.name), key, greedy)
    write_cached(path, key, sampled)
    return sampled


def greedy_answers(run: Any, rows: list[dict], parent: Path, tokenizer: Any, sampled: list[dict],
                   model: Any) -> list[str]:
    """The parent's greedy answer (eval's plain decoding) to each sampled prompt, in `sampled`'s order; kept in
    models/pairs/<run>.greedy.jsonl beside the samples, under the same key (`sampled_answers` writes it when it
    decodes them beside the samples; this pass runs only for samples kept from a stage without them)."""
    from tunebook.generation import generate
    from tunebook.progress import progress_bar, rate_updater

    recipe = run.recipe
    path, key = outputs.greedy_file(run.name), samples_key(recipe, parent)
    cached = read_cached(path, key)
    if cached is not None and [c["row"] for c in cached] == [s["row"] for s in sampled]:
        return [c["greedy"] for c in cached]
    model = model()
    label = "greedy answers of the parent"
    with progress_bar(label) as bar:
        advance = rate_updater(bar, bar.add_task(label, total=len(sampled), rate=""), time.perf_counter())
        answers = generate(model, tokenizer, [rows[s["row"]] for s in sampled], recipe.data.system_prompt,
                           recipe.eval.max_new_tokens, recipe.eval.batch_size, advance)
    write_cached(path, key, [{"row": s["row"], "greedy": a} for s, a in zip(sampled, answers, strict=True)])
    return answers


def pair_samples(recipe: Any, rows: list[dict], tokenizer: Any, sampled: list[dict]) -> list[dict]:
    """Judge each prompt's answers and pair full-marks ones (else, with `stage.chosen: sample_or_reference`, the
    reference) with wrong ones picked by `stage.rejected`, up to `stage.pairs_per_prompt` pairs per prompt
    (`pick_pairs`). Only full-marks answers are ever chosen, except by `stage.chosen: best`, which takes each
    prompt's best-scoring answers as its "right" ones."""
    from tunebook.rewards import load_reward, reward_columns

    judge = load_reward(judge_name(recipe), recipe.source)
    data_file, system = Path(recipe.data.train), recipe.data.system_prompt
    pairs, prompts, too_far = [], 0, 0
    stage = recipe.stage
    repair = task_repair(recipe) if stage.repair else None
    for item in sampled:
        row, greedy = rows[item["row"]], item.get("greedy")
        answers = item["answers"] + ([greedy] if greedy is not None else [])  # the greedy answer is the parent's too
        columns = reward_columns(row, data_file)

        def judged(texts: list[str], columns: dict = columns) -> list[float]:
            return judge([None] * len(texts), texts, **{k: [v] * len(texts) for k, v in columns.items()})

        scores, fixes = judged(answers), []
        if repair is not None:  # right repairs of the wrong answers join the right ones (never as rejected)
            fixes = [f for f in dict.fromkeys(repair(a, row, data_file) for a, s in zip(answers, scores, strict=True)
                                              if s < 1.0) if f and f not in answers]
            fixes = [f for f, s in zip(fixes, judged(fixes), strict=True) if s == 1.0]
            answers, scores = fixes + answers, [1.0] * len(fixes) + scores
        top = max(scores) if stage.chosen == "best" else 1.0
        right = [a for a, s in zip(answers, scores, strict=True) if s == top]
        wrong = sorted(((s, a) for a, s in zip(answers, scores, strict=True) if s < top), key=lambda w: w[0])
        if not wrong or not (right or stage.chosen == "sample_or_reference"):
            continue  # every sample already right (nothing to prefer), or no right sample to choose
        prompt = render_prompt(tokenizer, row, system)
        right = right or [reference_answer(row)]
        picked, first = [], []
        if greedy is not None and scores[-1] < top:  # `greedy`: eval's own wrong answer is rejected first
            first = picked = pick_pairs(right, [(scores[-1], greedy)], "nearest_length", tokenizer, 1,
                                        stage.max_length_gap)
            wrong = [w for w in wrong if w[1] != greedy]
        if len(picked) < stage.pairs_per_prompt:
            rule = "nearest_length" if stage.rejected == "greedy" else stage.rejected
            picked = picked + pick_pairs(right, wrong, rule, tokenizer, stage.pairs_per_prompt - len(picked),
                                         stage.max_length_gap)
        prompts, too_far = prompts + bool(picked), too_far + (not picked)
        for k, (chosen, rejected, score) in enumerate(picked):
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_score": top,
                          "rejected_score": score, "chosen_source": "reference" if chosen not in answers else
                          "repair" if chosen in fixes else "sample",
                          "rejected_source": "greedy" if k < len(first) else "sample"})
    chosen = sum(p["chosen_source"] == "sample" for p in pairs)
    fixed = sum(p["chosen_source"] == "repair" for p in pairs)
    greedy_note = (f", {sum(p['rejected_source'] == 'greedy' for p in pairs)} rejecting the greedy answer"
                   if stage.rejected == "greedy" else "")
    print(f"pairs: {len(pairs)} from {prompts} of {len(sampled)} prompts ({chosen} chosen answers sampled, "
          + (f"{fixed} repaired, " if repair is not None else "")
          + f"{len(pairs) - chosen - fixed} the reference{greedy_note}; prompts whose answers were all right make none"
          + (f"; {too_far} more had none within stage.max_length_gap={recipe.stage.max_length_gap} tokens)"
             if too_far else ")"))
    return pairs


def pick_pairs(right: list[str], wrong: list[tuple[float, str]], rule: str, tokenizer: Any,
               n: int = 1, max_gap: int | None = None) -> list[tuple[str, str, float]]:
    """Up to `n` (chosen, rejected, rejected's score) from full-marks answers and (score, answer) of the others,
    lowest first, each distinct wrong answer rejected once (a right answer may be chosen again: a prompt's right
    answers are mostly one query, its wrong ones many): right answers in turn with the worst wrong ones, or
    (`nearest_length`) the right and wrong answers nearest in tokens, the lower score on a tie; never two answers
    more than `max_gap` tokens apart. Pairs whose chosen answer is mostly the shorter teach DPO that short is right:
    measured on SQL, on-policy pairs picked by `worst` had the shorter answer chosen in 109 of 168, and the model
    learned to drop GROUP BY, LIMIT and aggregates."""
    right = list(dict.fromkeys(right))
    wrong = list(dict.fromkeys(wrong))  # an answer's score is the same each time it was sampled
    length = {a: len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in {*right, *(a for _, a in wrong)}}

    def close(chosen: str, rejected: str) -> bool:
        return max_gap is None or abs(length[chosen] - length[rejected]) <= max_gap

    pairs: list[tuple[str, str, float]] = []
    if rule == "worst":
        for score, answer in wrong:
            if len(pairs) == n:
                break
            turn = len(pairs) % len(right)
            chosen = next((c for c in right[turn:] + right[:turn] if close(c, answer)), None)
            if chosen is not None:
                pairs.append((chosen, answer, score))
        return pairs
    while len(pairs) < n:
        candidates = [(abs(length[c] - length[w[1]]), i, c, w) for c in right for i, w in enumerate(wrong)
                      if close(c, w[1])]
        if not candidates:
            break
        _, i, chosen, (score, rejected) = min(candidates)
        pairs.append((chosen, rejected, score))
        del wrong[i]
    return pairs


def task_repair(recipe: Any) -> Any:
    """The repair of the recipe's first metric that has one (`Metric.repair`: answer, row, data file -> a rewritten
    answer or None), or None."""
    from tunebook.metrics import METRICS

    return next((METRICS[m].repair for m in recipe.eval.metrics if METRICS[m].repair is not None), None)


def judge_name(recipe: Any) -> str:
    """The reward that judges pairs: the stage's own (`stage.rewards`), else the task's first metric that scores one
    answer (exact match otherwise)."""
    from tunebook.rewards import REWARDS

    if recipe.stage.rewards:
        return recipe.stage.rewards[0]
    return next((m for m in recipe.eval.metrics if m in REWARDS), "exact_match")

