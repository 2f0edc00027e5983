"""`model.dtype: auto` resolves per machine, by measurement, and says why."""

from __future__ import annotations

import json

import pytest

from tunebook import precision


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "CACHE", tmp_path / "precision.json")
    precision._auto.cache_clear()
    yield
    precision._auto.cache_clear()


def test_explicit_dtype_is_kept():
    assert precision.resolve("float32") == precision.Precision("float32", "set in the recipe")


def test_cpu_without_bf16_instructions_is_fp32_without_measuring(monkeypatch):
    monkeypatch.setattr(precision, "cpu_description", lambda: ("AMD EPYC test", {"avx2", "fma"}))
    chosen = precision.resolve("auto")
    assert chosen.dtype == "float32" and "AMD EPYC test has no bf16 instructions" in chosen.why
    assert not precision.CACHE.exists()


def test_cpu_with_bf16_instructions_is_measured_once(monkeypatch):
    monkeypatch.setattr(precision, "cpu_description", lambda: ("Xeon test", {"avx512_bf16", "amx_bf16"}))
    chosen = precision.resolve("auto")
    assert chosen.dtype in ("float32", "bfloat16")
    assert "Xeon test (amx_bf16, avx512_bf16)" in chosen.why and "ms in bf16 vs" in chosen.why
    (entry,) = json.loads(precision.CACHE.read_text()).values()
    assert entry["fp32_ms"] > 0 and entry["bf16_ms"] > 0
    precision._auto.cache_clear()
    monkeypatch.setattr(precision, "probe_step_seconds", lambda *a: pytest.fail("measured twice"))
    assert precision.resolve("auto") == chosen
