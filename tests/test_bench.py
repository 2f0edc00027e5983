"""`tunebook bench --quick` runs every comparison on the tiny model and writes its files (no timing asserted)."""

from __future__ import annotations

import json

from tunebook import bench


def test_bench_quick_on_tiny_model(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "bench" / "results.json")
    monkeypatch.setattr(bench, "TABLE", tmp_path / "bench" / "results.md")
    recipe = tiny_recipe(name="tiny-bench", training__packing=True)
    results = bench.run(str(recipe), steps=2, eval_examples=4, quick=True)
    written = json.loads((tmp_path / "bench" / "quick.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert written["machine"]["cores"] >= 1 and "torch" in written["machine"]["versions"]
    training = written["training"]
    for run in (training["baseline"], training["tunebook"]):
        assert run["tokens"] > 0 and len(run["runs"]) == training["repeats"] == 1
        for key in ("tokens_per_s", "peak_rss_mb"):
            assert 0 < run[key]["min"] <= run[key]["median"] <= run[key]["max"]
    assert training["speedup"] > 0 and training["tunebook"]["dtype"]["dtype"] == "float32"
    assert written["eval"]["examples"] == 4 and written["eval"]["adapter"] == "untrained LoRA"
    assert written["eval"]["identical_outputs"] is True
    assert written["eval"]["new_examples_per_s"]["median"] > 0
    scoring = written["sql_scoring"]
    assert scoring["examples"] == 6 and scoring["worker_s"]["median"] > 0 and scoring["in_process_s"]["median"] > 0
    assert set(written["targets"]) >= {"eval_speedup", "training_peak_rss_gib", "demo_minutes_after_install"}
    rss = written["targets"]["training_peak_rss_gib"]
    assert rss["measured"] == round(training["tunebook"]["peak_rss_mb"]["median"] / 1024, 2)
    assert rss["met"] == (rss["measured"] <= 3.0) and (rss["met"] or rss["missed_by_percent"] > 0)
    assert "| training tokens/s (2 steps × 1) |" in (tmp_path / "bench" / "quick.md").read_text()
    assert not (tmp_path / "models").exists(), "bench runs keep their outputs in a temp folder"


def test_results_keep_the_last_run_of_each_machine_kind(tmp_path):
    """A run on one kind of machine never replaces another kind's figures (the README quotes both)."""
    amd = {"cpu": "AMD EPYC 7B13", "flags": ["avx2"], "gpu": None}
    xeon = {"cpu": "Intel(R) Xeon(R) Processor", "flags": ["avx2", "avx512f", "amx_tile"], "gpu": None}
    assert bench.machine_kind(amd) == "amd-avx2" and bench.machine_kind(xeon) == "intel-avx512-amx"
    assert bench.machine_kind({**xeon, "gpu": "NVIDIA H200"}) == "gpu-nvidia-h200"
    old = tmp_path / "results.json"  # a file written before kinds were kept: read as that machine's run
    old.write_text(json.dumps({"recipe": "smollm2-sql", "machine": amd, "training": {"speedup": 2.1}}))
    assert list(bench.recorded_runs(old)) == ["amd-avx2"]
    kept = tmp_path / "kinds.json"
    kept.write_text(json.dumps({"by_machine": {"amd-avx2": {"machine": amd}, "intel-avx512-amx": {"machine": xeon}}}))
    assert sorted(bench.recorded_runs(kept)) == ["amd-avx2", "intel-avx512-amx"]
    assert bench.recorded_runs(tmp_path / "missing.json") == {}
