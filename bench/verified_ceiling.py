"""How far can choosing among a model's own answers go? The ceiling of verified decoding for a SQL recipe.

    python bench/verified_ceiling.py RECIPE [SAMPLES] [TEMPERATURE] [key=value ...]

For each eval row of RECIPE's trained adapter (merged, as the eval's fine-tuned pass runs it): the constrained
greedy answer and SAMPLES constrained samples (default 8, temperature 0.7: verified decoding's own), each judged
as verified decoding judges it (schema repair included) and run on the row's database. Then, per subset:

- `greedy`: the constrained greedy answer as judged;
- `first passing`: verified decoding's rule (the greedy answer if it runs and returns rows, else the first
  candidate that does), with 4 and with all SAMPLES candidates;
- `vote`: every row sampled; among the answers that run and return rows, the result set most of them return
  (execution-based self-consistency; ties go to the greedy answer's result, then to the earliest);
- `any right`: a right answer is among them at all. No rule that does not read the reference can score above it.

Prints one line per subset and, as the last line, one JSON object with the same figures. Slow: the samples of
300 rows take ~11 minutes on 2 cores.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import Any


def judged_answers(recipe_name: str, samples: int, temperature: float, overrides: list[str]) -> list[dict]:
    """Per eval row: its subset and, for the greedy answer then each sample, (passes, result, right)."""
    from tunebook.config import load_recipe
    from tunebook.constrained import HFGrammars
    from tunebook.evaluate import load_eval_rows, load_pass_model
    from tunebook.generation import decode_answers, generate, sample_batch
    from tunebook.metrics import db_path_for, extract_sql, is_ordered, same_result
    from tunebook.models import load_tokenizer
    from tunebook.prompts import reference_answer, stop_token_ids
    from tunebook.runs import identify
    from tunebook.sandbox import run_sql
    from tunebook.tasks import eval_subsets
    from tunebook.validate import check_adapter, validate_recipe
    from tunebook.verify import row_grammars, verifier_for, without_reference

    recipe = load_recipe(recipe_name, overrides)
    validate_recipe(recipe)
    run = identify(recipe)
    check_adapter(run.adapter_dir, recipe)
    rows, data_file = load_eval_rows(recipe, None)
    tokenizer = load_tokenizer(str(run.adapter_dir), recipe.model.trust_remote_code)
    model = load_pass_model(recipe, ["fine_tuned"], run.adapter_dir)
    model.merge_adapter()
    verifier = verifier_for(recipe)
    texts = row_grammars(verifier, rows, data_file)
    system, max_new = recipe.data.system_prompt, recipe.eval.max_new_tokens
    grammars = HFGrammars(tokenizer, model.config.vocab_size, stop_token_ids(tokenizer, system))
    greedy = generate(model, tokenizer, rows, system, max_new, recipe.eval.batch_size, grammars=(grammars, texts))
    sampled: list[list[str]] = []
    per_call = max(1, recipe.eval.batch_size // samples)
    for start in range(0, len(rows), per_call):
        ids = sample_batch(model, tokenizer, rows[start:start + per_call], system, max_new, samples, temperature,
                           seed=start, grammars=grammars, grammar_texts=texts[start:start + per_call])
        sampled += [decode_answers(tokenizer, group) for group in ids]
    subset_of = {i: name for name, indices in eval_subsets(recipe, rows, data_file).items() for i in indices}
    out = []
    for i, row in enumerate(rows):
        judge = verifier.judge(without_reference(row), data_file)
        db, gold = db_path_for(row, data_file), reference_answer(row)
        gold_rows, _ = run_sql(db, gold)
        answers = []
        for answer in [greedy[i], *sampled[i]]:
            text, score = judge(answer)
            sql = extract_sql(text)
            got, error = run_sql(db, sql) if score else (None, "fails")
            result = None if error else json.dumps(list(map(repr, got)) if is_ordered(sql) else
                                                   sorted(map(repr, got)))
            right = error is None and gold_rows is not None and same_result(got, gold_rows, is_ordered(gold))
            answers.append({"passes": score >= verifier.best, "result": result, "right": right})
        out.append({"subset": subset_of.get(i, "all"), "answers": answers})
    return out


def first_passing(answers: list[dict], candidates: int) -> dict:
    """Verified decoding's rule: the greedy answer if it passes, else the first candidate that does."""
    return next((a for a in answers[:1 + candidates] if a["passes"]), answers[0])


def vote(answers: list[dict]) -> dict:
    """The passing answer whose result set most passing answers return (ties: the greedy answer's, then the
    earliest); the greedy answer when none passes."""
    passing = [a for a in answers if a["passes"]]
    if not passing:
        return answers[0]
    counts: dict[Any, int] = defaultdict(int)
    for a in passing:
        counts[a["result"]] += 1
    top = max(counts.values())
    return next(a for a in answers if a["passes"] and counts[a["result"]] == top)


def summary(rows: list[dict], samples: int) -> dict[str, dict[str, float]]:
    """Execution accuracy (%) of each rule, per subset and over all rows."""
    subsets: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        subsets[row["subset"]].append(row)
        subsets["all rows"].append(row)
    rules = {"greedy": lambda a: a[0], "first passing of 4": lambda a: first_passing(a, 4),
             f"first passing of {samples}": lambda a: first_passing(a, samples), f"vote of {1 + samples}": vote,
             "any right": lambda a: {"right": any(x["right"] for x in a)}}
    return {name: {"rows": len(part), **{rule: round(100 * sum(pick(r["answers"])["right"] for r in part)
                                                     / len(part), 1) for rule, pick in rules.items()}}
            for name, part in subsets.items()}


def main(argv: list[str]) -> dict:
    recipe = argv[0]
    numbers = [a for a in argv[1:3] if "=" not in a]
    samples = int(numbers[0]) if numbers else 8
    temperature = float(numbers[1]) if len(numbers) > 1 else 0.7
    result = summary(judged_answers(recipe, samples, temperature, [a for a in argv[1:] if "=" in a]), samples)
    for name, figures in result.items():
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    from tunebook.errors import RecipeError

    if len(sys.argv) < 2:
        sys.exit(__doc__)
    try:
        main(sys.argv[1:])
    except RecipeError as exc:  # a recipe, data or adapter problem: one line, as the CLI says it
        sys.exit(f"error: {exc}")
