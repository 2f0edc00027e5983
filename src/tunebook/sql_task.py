"""What the `sql` task knows at eval time beyond its metric: the report's subsets of the test rows.

The registry entry (`tasks.SQL.subsets`) points here; `tunebook eval` scores each subset with the recipe's metrics.

"Unseen schema" is decided here, from the recipe's own training rows (after `data.where`), and not read from the
`unseen_schema` field the builder writes (`builders/sql.py`: a database in no other split of the built data). The
two agree on the built data as a whole, but not for a recipe that trains on part of it (`data.where`: a database
its filter left out is unseen to the model), nor for rows of a user's own data, which need not carry the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tunebook.data import read_split, select_rows
from tunebook.errors import RecipeError
from tunebook.metrics import db_path_for

if TYPE_CHECKING:
    from tunebook.config import Recipe


def database_of(row: dict, data_file: Path) -> Path | None:
    """The database file a row runs on, resolved, whether it names it by `db_id` or by `db_path` (None: neither)."""
    if not (row.get("db_id") or row.get("db_path")):
        return None
    return db_path_for(row, data_file).resolve()


def train_databases(recipe: Recipe) -> set[Path]:
    """The databases the recipe trained on (after `data.where`); none when its train split cannot be read."""
    try:
        rows = read_split(recipe.data.train, recipe.source, "data.train")
        if recipe.data.where:
            rows = select_rows(rows, recipe.data.where, recipe.data.train, recipe.source)
    except RecipeError:
        return set()
    return {database_of(r, Path(recipe.data.train)) for r in rows} - {None}


def eval_subsets(recipe: Recipe, rows: list[dict], data_file: Path | None = None) -> dict[str, list[int]]:
    """Subset name -> row positions, in report order, for rows that name their database (`db_id` or `db_path`,
    compared as the files they resolve to, so a held-out row by path and a training row by id agree):

    - `unseen_schema`: rows whose database the recipe never trained on (only when that is some rows, not all);
    - `unseen_real_schema`: those among them on a real (Spider) schema (`source: spider`);
    - `people`: those among them asked by people (`source: people`, datasets_cards/sql.md).
    """
    data_file = Path(data_file or recipe.data.test)
    where = [database_of(r, data_file) for r in rows]
    if not any(where):
        return {}
    seen = train_databases(recipe)
    unseen = [i for i, db in enumerate(where) if db is not None and db not in seen]
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
