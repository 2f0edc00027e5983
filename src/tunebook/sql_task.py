"""What the `sql` task knows at eval time beyond its metric: the report's subsets of the test rows.

The registry entry (`tasks.SQL.subsets`) points here; `tunebook eval` scores each subset with the recipe's metrics.

"Unseen schema" is decided here, from the recipe's own training rows (after `data.where`), and not read from the
`unseen_schema` field the builder writes (`builders/sql.py`: a database in no other split of the built data). The
two agree on the built data as a whole, but not for a recipe that trains on part of it (`data.where`: a database
its filter left out is unseen to the model), nor for rows of a user's own data, which need not carry the field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunebook.data import read_split, select_rows
from tunebook.errors import RecipeError

if TYPE_CHECKING:
    from tunebook.config import Recipe


def train_db_ids(recipe: Recipe) -> set[str]:
    """The databases the recipe trained on (after `data.where`); none when its train split cannot be read."""
    try:
        rows = read_split(recipe.data.train, recipe.source, "data.train")
        if recipe.data.where:
            rows = select_rows(rows, recipe.data.where, recipe.data.train, recipe.source)
    except RecipeError:
        return set()
    return {r.get("db_id") for r in rows}


def eval_subsets(recipe: Recipe, rows: list[dict]) -> dict[str, list[int]]:
    """Subset name -> row positions, in report order, for rows that name their database (`db_id`):

    - `unseen_schema`: rows whose database the recipe never trained on (only when that is some rows, not all);
    - `unseen_real_schema`: those among them on a real (Spider) schema (`source: spider`);
    - `people`: those among them asked by people (`source: people`, datasets_cards/sql.md).
    """
    if not any(r.get("db_id") for r in rows):
        return {}
    seen = train_db_ids(recipe)
    unseen = [i for i, r in enumerate(rows) if r.get("db_id") not in seen]
    groups = {}
    if unseen and len(unseen) < len(rows):
        groups["unseen_schema"] = unseen
    real = [i for i in unseen if rows[i].get("source") == "spider"]
    if real:
        groups["unseen_real_schema"] = real
    people = [i for i in unseen if rows[i].get("source") == "people"]
    if people:
        groups["people"] = people  # hand-written questions, asked as people ask them (datasets_cards/sql.md)
    return groups
