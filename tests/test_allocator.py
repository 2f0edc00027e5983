"""The allocator training starts on: found, preloaded into a restarted process, and read back from its memory map."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, run_tunebook

from tunebook import allocator
from tunebook.errors import RecipeError

IN_USE = "from tunebook.allocator import in_use; print(in_use().name)"


def child(code: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(ROOT / "src")},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_preloaded_allocator_is_the_one_the_process_runs_on():
    found = allocator.find()
    if found.path is None:
        pytest.skip(f"no replacement allocator here: {found.why}")
    assert child(IN_USE, allocator.preloaded_env(found)) == found.name
    assert child(IN_USE, allocator.preloaded_env(allocator.Allocator("glibc", None, "test"))) == "glibc"


def test_the_environment_chooses_or_refuses(monkeypatch, tmp_path):
    monkeypatch.setenv(allocator.ENV, "system")
    assert allocator.find() == allocator.Allocator("glibc", None, f"{allocator.ENV}=system")
    monkeypatch.setenv(allocator.ENV, str(tmp_path / "missing.so"))
    with pytest.raises(RecipeError, match=f"environment: {allocator.ENV}: '.*missing.so' is not a file. Point it"):
        allocator.find()
    library = tmp_path / "libjemalloc.so.2"
    library.write_bytes(b"")
    monkeypatch.setenv(allocator.ENV, str(library))
    assert allocator.find() == allocator.Allocator("jemalloc", str(library), f"{allocator.ENV}={library}")


def test_train_from_the_shell_runs_on_the_found_allocator_and_says_so(tiny_recipe, tmp_path):
    """`python -m tunebook train` restarts itself once on `find()`'s allocator; run_info.json names it. A
    TUNEBOOK_MALLOC that names no file is refused with the fix, before anything loads."""
    recipe = str(tiny_recipe(training__max_steps=1))
    refused = run_tunebook(tmp_path, "train", recipe, env={allocator.ENV: "/nowhere/libjemalloc.so"})
    assert refused.returncode == 2 and refused.stderr.startswith(f"error: environment: {allocator.ENV}: ")
    assert "Traceback" not in refused.stderr and not (tmp_path / "models").exists()
    done = run_tunebook(tmp_path, "train", recipe)
    assert done.returncode == 0, done.stderr
    info = json.loads(next((tmp_path / "models").rglob("run_info.json")).read_text())
    found = allocator.find()
    assert info["allocator"]["name"] == found.name and info["allocator"]["path"] == found.path
