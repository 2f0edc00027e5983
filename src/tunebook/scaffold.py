"""`tunebook new`: a new recipe for your own task, copied from an existing one with its comments kept."""

from __future__ import annotations

import re
from pathlib import Path

from tunebook.config import NAME_RULE, RECIPES_DIR, load_recipe
from tunebook.errors import RecipeError
from tunebook.metrics import METRICS
from tunebook.outputs import write_text_atomic
from tunebook.tasks import get_task

# Settings of a template that describe its own data, so a recipe for another task does not inherit them.
TEMPLATE_ONLY = {("data", "where"), ("data", "repeat"), ("data", "share_context"), ("eval", "where"),
                 ("eval", "repeat"), ("eval", "metrics"), ("eval", "main_metric"), ("eval", "limit_per"),
                 ("eval", "decoding")}


def new_recipe(name: str, source: str, task: str, force: bool = False) -> Path:
    """Write recipes/<name>.yaml: `source`'s model, LoRA, training and export settings for `task`, reading
    data/<task>/{train,val,test}.jsonl, with the eval metrics of that task spelled out to edit."""
    if not NAME_RULE.fullmatch(name):
        raise RecipeError("tunebook new", "RECIPE_NAME", f"'{name}' is not a recipe name.",
                          "Use letters, digits, '-' and '_' (e.g. smollm2-translate).")
    if not NAME_RULE.fullmatch(task):
        raise RecipeError("tunebook new", "--task", f"'{task}' is not a task name.",
                          "Use letters, digits, '-' and '_' (e.g. translate).")
    template = load_recipe(source)  # a broken template is reported as itself, not as the copy
    if template.method != "sft":
        raise RecipeError("tunebook new", "--from", f"{template.name} is a {template.method} stage of another recipe's "
                          "adapter.", "Copy an SFT recipe (e.g. smollm2-qa); a stage for it comes after it has trained "
                          "(docs/stages.md).")
    out = RECIPES_DIR / f"{name}.yaml"
    if out.exists() and not force:
        raise RecipeError(str(out), None, "already exists.", "Choose another name, or pass --force to replace it.")
    defaults = get_task(task)
    metrics = defaults.metrics
    main = defaults.main_metric
    lines = [f"# {name}: {template.model.name} fine-tuned on the `{task}` task (copied from {template.name}).",
             f"# tunebook validate {name} && make train RECIPE={name} && make eval RECIPE={name} && "
             f"make export RECIPE={name}"]
    section, dropping = None, False
    for line in Path(template.source).read_text().splitlines():
        if line.startswith("#"):
            continue  # the template's header describes the template
        if dropping and (not line.strip() or len(line) - len(line.lstrip()) > 2):
            continue  # the block value of a key left out (`where:` written over several lines)
        dropping = False
        if re.match(r"^\w+:", line):
            section = line.split(":")[0]
        key = line.strip().split(":")[0]
        if section == "task":
            line = f"task: {task}"
        elif section == "data" and key in ("train", "val", "test"):
            line = f"  {key}: data/{task}/{key}.jsonl"
        elif section == "data" and key == "system_prompt":
            line = ("  system_prompt: null               # optional: one line on who the model is, e.g. "
                    "\"You translate English to French.\"")
        elif (section, key) in TEMPLATE_ONLY:
            dropping = True
            continue  # the template's row selection, grouping and metrics belong to its own data
        lines.append(line)
        if line == "eval:":
            lines.append(f"  metrics: [{', '.join(metrics)}]   # any of: {', '.join(METRICS)}")
            lines.append(f"  main_metric: {main}              # the column that headlines the report")
    write_text_atomic(out, "\n".join(lines) + "\n")
    try:
        load_recipe(out)
    except RecipeError:
        out.unlink()
        raise
    return out


def next_steps(name: str, task: str) -> str:
    """What the user fills in after `tunebook new`."""
    return "\n".join([
        "Fill in:",
        f"  1. data/{task}/train.jsonl, val.jsonl, test.jsonl: one example per line, either",
        '       {"instruction": "...", "input": "...", "output": "..."}   ("input" optional), or',
        '       {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
        "     (.json lists, .parquet and .csv with the same fields work too; set the paths in the recipe)",
        f"  2. eval.metrics / eval.main_metric in recipes/{name}.yaml: what 'better' means for {task}",
        "  3. data.max_length, training.max_steps: sized to your examples and your time",
        f"Then: tunebook validate {name}   (says what is still missing)",
    ])
