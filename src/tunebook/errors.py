"""The one error type users see: it names the file, the field and the fix."""

from __future__ import annotations


class RecipeError(Exception):
    """A problem in a recipe or its data, reported before any model loads.

    Rendered as ``<file>: <field>: <problem>. <fix>`` so the user knows where to look and what to do.
    """

    def __init__(self, source: str, field: str | None, problem: str, fix: str | None = None):
        self.source = source
        self.field = field
        self.problem = problem
        self.fix = fix
        where = f"{source}: {field}" if field else source
        message = f"{where}: {problem}"
        if fix:
            message += f" {fix}"
        super().__init__(message)


class SourceMissing(RuntimeError):
    """A dataset builder's source (an archive, the stdlib source, ruff) is not there; the message says how to get it."""
