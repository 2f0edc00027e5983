"""Rewards for GRPO (and the judge of DPO pairs): the report's own metrics, one answer at a time.

A reward is called as TRL's `GRPOTrainer` calls `reward_funcs`: `reward(prompts, completions, **columns)` with one
score per completion, where `columns` are the training rows' fields (`reference`, the row's database as `db_path`,
a review row's `rule` and `code`). SQL runs in the same sandbox as eval, so a reward can never escape it.
`sql_execution` is shaped: a query that does not run scores 0, one that runs 0.2, with the gold's columns 0.4, and
the gold's rows 1.0 — so a policy that cannot yet answer still learns to write SQL that runs on the schema.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

Reward = Callable[..., list[float]]


def sql_execution(prompts: list[Any], completions: list[Any], reference: list[str], db_path: list[str],
                  **_: Any) -> list[float]:
    """1.0 for the gold's result; 0.4 for the gold's number of columns; 0.2 for a query that runs; else 0."""
    from tunebook.metrics import extract_sql, gold_result, is_ordered, same_result
    from tunebook.sandbox import default_sandbox

    box = default_sandbox()
    scores = []
    for completion, gold, db in zip(completions, reference, db_path, strict=True):
        predicted = box.query(db, extract_sql(_text(completion)))  # no query in it: an error, 0
        expected = gold_result(db, gold, box)
        if predicted.error is not None or expected.error is not None:
            scores.append(0.0)
        elif same_result(predicted.rows, expected.rows, is_ordered(gold)):
            scores.append(1.0)
        else:
            scores.append(0.4 if len(predicted.columns) == len(expected.columns) else 0.2)
    return scores


def exact_match(prompts: list[Any], completions: list[Any], reference: list[str], **_: Any) -> list[float]:
    """1.0 when the answer equals the reference, whitespace aside."""
    return [float(" ".join(_text(c).split()) == " ".join(r.split())) for c, r in zip(completions, reference, strict=True)]


def json_match(prompts: list[Any], completions: list[Any], reference: list[str], **_: Any) -> list[float]:
    """1.0 when the answer parses as JSON and equals the reference; 0.2 when it only parses."""
    from tunebook.metrics import json_equal, parse_json_answer

    scores = []
    for completion, ref in zip(completions, reference, strict=True):
        ok, value = parse_json_answer(_text(completion))
        expected_ok, expected = parse_json_answer(ref)  # a reference that is not JSON matches nothing
        scores.append(1.0 if ok and expected_ok and json_equal(value, expected) else 0.2 if ok else 0.0)
    return scores


def code_fixed(prompts: list[Any], completions: list[Any], reference: list[str], code: list[str], rule: list[str],
               **_: Any) -> list[float]:
    """1.0 when the answer's improved code fixes the row's ruff rule (as the `code_fixed` metric counts it)."""
    return _review_check("code_fixed", completions, reference, code, rule)


def fix_matches_reference(prompts: list[Any], completions: list[Any], reference: list[str], code: list[str],
                          rule: list[str], **_: Any) -> list[float]:
    """1.0 when the answer's improved code is the reference fix, formatting aside: stricter than `code_fixed`,
    which also credits any edit that clears the rule, meaning kept or not."""
    return _review_check("fix_matches_reference", completions, reference, code, rule)


def _review_check(check: str, completions: list[Any], reference: list[str], code: list[str],
                  rule: list[str]) -> list[float]:
    from tunebook.metrics import review_metrics

    return [review_metrics([_text(c)], [r], [i], [ru])[check] / 100
            for c, r, i, ru in zip(completions, reference, code, rule, strict=True)]


REWARDS: dict[str, Reward] = {"sql_execution": sql_execution, "exact_match": exact_match, "json_match": json_match,
                              "code_fixed": code_fixed, "fix_matches_reference": fix_matches_reference}


def _text(completion: Any) -> str:
    """A completion as text: TRL passes plain strings, or [{"role": "assistant", "content": …}] for chat prompts."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return str(completion)


def load_reward(name: str, source: str = "recipe") -> Reward:
    """A reward by metric name, or a user's own function by `module:function` / `module.function`."""
    from tunebook.errors import RecipeError

    if name in REWARDS:
        return REWARDS[name]
    module_name, _, function = name.partition(":") if ":" in name else name.rpartition(".")
    try:
        reward = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError, ValueError) as exc:
        raise RecipeError(source, "stage.rewards", f"cannot load the reward '{name}' ({exc}).",
                          "Name a metric reward or an importable module:function.") from None
    if not callable(reward):
        raise RecipeError(source, "stage.rewards", f"'{name}' is not a function.", "Name a callable.")
    if not hasattr(reward, "__name__"):  # TRL logs each reward under its name; a bound method has one already
        try:
            reward.__name__ = name
        except AttributeError:
            reward = functools.partial(reward)
            reward.__name__ = name
    return reward


def reward_columns(row: dict, data_file: Path) -> dict[str, Any]:
    """The fields a reward reads from one training row (never the prompt's text: that is TRL's `prompt`)."""
    from tunebook.metrics import db_path_for
    from tunebook.prompts import reference_answer, user_message

    columns: dict[str, Any] = {"reference": reference_answer(row)}
    if row.get("db_id") or row.get("db_path"):
        columns["db_path"] = str(db_path_for(row, data_file).resolve())
    if row.get("rule"):
        columns["rule"], columns["code"] = row["rule"], user_message(row)
    return columns
