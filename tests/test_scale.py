"""Scale-out on CPU: two processes under `accelerate launch` (DDP over gloo) train like one process.

accelerate's `--cpu` flag takes its single-process launcher (several CPU processes there mean MPI), so the
processes are started as on GPUs, `--multi_gpu --num_processes 2` (torchrun underneath); tunebook sets
`use_cpu` where there is no CUDA, so they join a gloo group (accelerate's MULTI_CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import read_json

ROOT = Path(__file__).resolve().parents[1]
# Two processes see the same global batch as one process with twice the per-device batch; gradients are
# averaged over the tokens of all processes (transformers' average_tokens_across_devices), so the steps agree up
# to float summation order. fp32 on a tiny model: 1e-4 relative leaves room for that and catches any real
# difference (a different batch, unaveraged gradients), which shows up at 1e-2 and above.
LOSS_RTOL = 1e-4


def launch_train(recipe: Path, cwd: Path, processes: int) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).with_name("accelerate")
    spread = ["--multi_gpu"] if processes > 1 else ["--cpu"]
    command = [str(accelerate), "launch", *spread, "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tunebook", "train", str(recipe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_and_writes_one_adapter(tiny_recipe, tmp_path):
    recipe = Path(tiny_recipe(training__max_steps=4, training__per_device_train_batch_size=2,
                              training__packing=False, training__logging_steps=1, training__save_steps=100))
    single = yaml.safe_load(recipe.read_text())
    single["training"]["per_device_train_batch_size"] = 4
    one = tmp_path / "one"
    one.mkdir()
    (one / "tiny-sql.yaml").write_text(yaml.safe_dump(single, sort_keys=False))
    two = tmp_path / "two"
    two.mkdir()
    (two / "tiny-sql.yaml").write_text(recipe.read_text())

    ran = {name: launch_train(folder / "tiny-sql.yaml", folder, n) for name, folder, n in
           (("one", one, 1), ("two", two, 2))}
    for name, done in ran.items():
        assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
    adapters = sorted(p.relative_to(two) for p in (two / "models/fine-tuned").rglob("adapter_model.safetensors"))
    assert adapters == [Path("models/fine-tuned/tiny-sql/adapter_model.safetensors")], "exactly one adapter"
    info = {name: read_json(folder / "models/fine-tuned/tiny-sql/run_info.json") for name, folder in
            (("one", one), ("two", two))}
    assert info["two"]["world_size"] == 2 and info["one"]["world_size"] == 1, ran["two"].stdout[-2000:]
    assert info["two"]["effective_batch"] == info["one"]["effective_batch"] == 4
    losses = {name: [h["loss"] for h in read_json(folder / "models/fine-tuned/tiny-sql/loss_log.json") if "loss" in h]
              for name, folder in (("one", one), ("two", two))}
    assert len(losses["one"]) == len(losses["two"]) == 4
    assert losses["two"] == pytest.approx(losses["one"], rel=LOSS_RTOL), json.dumps(losses)
    assert ran["two"].stdout.count("adapter:") == 1, "only the main process reports"
    assert "effective batch 4 = 2 processes x 2 per device x 1 accumulation" in ran["two"].stdout
