"""The task registry: everything a task decides, in one place.

A recipe's `task:` is any name. The built-in tasks below bring their default metrics, their headline metric,
the instruction their rows carry, the builder behind `tunebook data <task>` and the subsets of the test rows that
its report scores apart. Any other name gets the generic defaults (`GENERIC`): text overlap and perplexity,
headlined by ROUGE-L, and the recipe's `eval.metrics` / `eval.main_metric` choose otherwise. Nothing outside this
module names the built-in tasks; what a task knows beyond these fields lives in the modules its entry points to.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from tunebook.config import Recipe

TEXT_METRICS = ("rouge", "bleu", "chrf", "exact_match", "perplexity")


@dataclass(frozen=True)
class Task:
    """What a task brings when a recipe does not say otherwise."""

    name: str
    metrics: tuple[str, ...] = TEXT_METRICS  # names in metrics.METRICS, in report order
    main_metric: str = "rougeL"  # the report column that headlines the report, the chart and `make demo`
    instruction: str | None = None  # the instruction its built rows carry (and `tunebook new` suggests)
    builder: str | None = None  # "module:function" writing data/<task>/{train,val,test}.jsonl, for `tunebook data`
    # "module:function" (recipe, eval rows, their data file) -> {subset name: row positions}: the report's subsets, in report order
    subsets: str | None = None


SQL = Task(
    "sql", metrics=("sql_execution", "perplexity"), main_metric="exec_accuracy",
    instruction="Write a SQLite query that answers the question, using the schema below.",
    builder="tunebook.builders.sql:build_dataset", subsets="tunebook.sql_task:eval_subsets",
)
# Review headlines a code measure: ROUGE of the whole answer rewards handing the input code back unchanged.
REVIEW = Task(
    "review", metrics=("code_fixed", *TEXT_METRICS), main_metric="code_fixed",
    instruction="Review this Python code. Name the problem, explain why it matters, and give the improved code.",
    builder="tunebook.builders.review:build_review",
)
QA = Task(
    "qa", instruction="Answer the question about Python and its standard library.",
    builder="tunebook.builders.stdlib_docs:build_qa",
)
SUMMARIZE = Task(
    "summarize", instruction="Summarize the following Python documentation in one sentence.",
    builder="tunebook.builders.stdlib_docs:build_summarize",
)
BUILT_IN: dict[str, Task] = {t.name: t for t in (SQL, REVIEW, QA, SUMMARIZE)}
GENERIC = Task("generic")

# Datasets `tunebook data` builds that are not a built-in task: the worked example of adding a task, whose
# recipe (smollm2-extract.yaml) chooses its metrics itself, as any user's task would.
EXAMPLE_DATASETS: dict[str, str] = {"extract": "tunebook.builders.extract:build_extract"}


def get_task(name: str) -> Task:
    """The built-in task of that name, or the generic defaults under that name."""
    return BUILT_IN.get(name) or replace(GENERIC, name=name)


def dataset_builders() -> dict[str, str]:
    """Every dataset `tunebook data` can build: name -> "module:function"."""
    return {**{t.name: t.builder for t in BUILT_IN.values() if t.builder}, **EXAMPLE_DATASETS}


def load_hook(spec: str) -> Callable[..., Any]:
    """The function a task entry names as "module:function" (imported only when it is used)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def eval_subsets(recipe: Recipe, rows: list[dict], data_file: Path) -> dict[str, list[int]]:
    """The recipe's task's subsets of these eval rows, read from `data_file` (subset name -> row positions); none
    for most tasks."""
    task = get_task(recipe.task)
    return load_hook(task.subsets)(recipe, rows, data_file) if task.subsets else {}
