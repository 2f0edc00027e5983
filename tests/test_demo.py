"""`tunebook demo` on a tiny model: every stage runs and its time is recorded."""

from __future__ import annotations

import json

import pytest

import tunebook.export

pytestmark = pytest.mark.skipif(not tunebook.export.CONVERTER_DIR.joinpath("convert_hf_to_gguf.py").exists(),
                                reason="llama.cpp converter not extracted (make llama-cpp-converter)")


def test_demo_runs_every_stage_and_records_their_times(tiny_recipe, capsys):
    """`tunebook demo` (what `make demo` runs): train, eval, export, then eval of the quantised GGUF files."""
    from tunebook.cli import DEMO_STAGES, main
    from tunebook.outputs import demo_times_file, report_dir

    pytest.importorskip("llama_cpp")
    path = tiny_recipe(name="tiny-demo", training__max_steps=2, export__gguf=["f16", "q8_0"], export__verify_prompts=1)
    assert main(["demo", str(path)]) == 0
    times = json.loads(demo_times_file("tiny-demo").read_text())
    assert list(times["stage_seconds"]) == list(DEMO_STAGES) and all(v > 0 for v in times["stage_seconds"].values())
    assert times["machine"]["cores"] >= 1
    report = json.loads((report_dir("tiny-demo") / "report.json").read_text())
    assert list(report["gguf"]) == ["q8_0"] and report["base"] and report["fine_tuned"]
    out = capsys.readouterr().out
    assert "reusing" in out and "demo stages: train" in out
