"""`tunebook bench --quick` runs every comparison on the tiny model and writes its files (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

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
    profile = written["profile"]  # measured inside real training steps of the recipe
    assert profile["seconds_per_step"] > 0 and abs(sum(profile["shares"].values()) - 1) < 0.01
    assert profile["shares"]["matmul"] > 0 and profile["top"][0]["share"] > 0
    scoring = written["sql_scoring"]
    assert scoring["examples"] == 6 and scoring["worker_s"]["median"] > 0 and scoring["in_process_s"]["median"] > 0
    assert set(written["targets"]) >= {"eval_speedup", "training_peak_rss_gib", "demo_minutes_after_install"}
    rss = written["targets"]["training_peak_rss_gib"]
    assert rss["measured"] == round(training["tunebook"]["peak_rss_mb"]["median"] / 1024, 2)
    assert rss["met"] == (rss["measured"] <= 3.0) and (rss["met"] or rss["missed_by_percent"] > 0)
    table = (tmp_path / "bench" / "quick.md").read_text()
    assert "| training tokens/s (2 steps × 1) |" in table and "where a training step's time goes" in table
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


def test_demo_time_target_follows_the_vector_width_not_the_vendor():
    """Issue 27: 20 minutes where the CPU has only AVX2, 15 where it has AVX-512 (AMD's Zen 4 EPYCs have it)."""
    demo = {"demo": {"total_seconds": 17 * 60}}
    zen2 = {"cpu": "AMD EPYC 7B12", "flags": ["avx2"]}
    zen4 = {"cpu": "AMD EPYC", "flags": ["avx2", "avx512f", "avx512_bf16"]}
    assert bench.targets({**demo, "machine": zen2})["demo_minutes_after_install"]["met"] is True
    assert bench.targets({**demo, "machine": zen4})["demo_minutes_after_install"]["target"] == 15.0
    assert bench.targets({**demo, "machine": zen4})["demo_minutes_after_install"]["met"] is False
    assert bench.machine_kind({**zen4, "gpu": None}) == "amd-avx512"


def test_gpu_bench_runs_plain_and_tunebook_qlora_on_tiny_models(tmp_path):
    """`tunebook bench --gpu --tiny` on the CPU: the same code a GPU run uses, plain Trainer + PEFT against
    tunebook's SFTTrainer on the same random rows, each option either run or named as skipped."""
    from tunebook.gpu_bench import bench_gpu, markdown

    result = bench_gpu(("phi3-sql",), tiny=True, steps=2)
    [model] = result["models"]
    runs = {run["run"]: run for run in model["runs"]}
    assert {"plain", "tunebook"} <= set(runs) and model["rows"] == 8 * 2 * 2 and model["plan_gib"] > 0
    for run in runs.values():
        assert run["tokens_per_s"] > 0 and run["optimizer_steps"] >= 1 and run["train_loss"] > 0
    assert runs["plain"]["optimizer_steps"] == 2, "plain: one epoch of padded batches, 8 rows x 2 accumulation"
    assert runs["tunebook"]["vs_plain"] == round(runs["tunebook"]["tokens_per_s"] / runs["plain"]["tokens_per_s"], 2)
    assert set(model["skipped"]) | {r.removeprefix("tunebook+") for r in runs} >= {"liger", "flash_attention_2"}
    table = markdown(result)
    assert "tiny configs" in table and "| phi3-mini-4k-instruct | plain |" in table
    path = bench.record_gpu(result, tmp_path / "results.json")
    assert path.name == "gpu-tiny.json" and json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert not (tmp_path / "results.json").exists(), "a tiny run is a smoke run, never a result"


def test_a_run_reports_its_own_peak_memory_not_its_parents():
    """Linux carries ru_maxrss over an exec, so a training run started by a large `tunebook bench` once reported
    the bench's peak (every 2-step run read 3,763 MB); peak_memory_mb reads the run's own high-water mark."""
    ballast = bytearray(800 * 2**20)  # the parent's RSS well above what the child will ever touch
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])
    code = "from tunebook.train import peak_memory_mb; print(peak_memory_mb(use_cuda=False))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 600, "the child's peak includes its parent's"
    del ballast
