"""The GPU check (`scripts/gpu_check.sh`): QLoRA steps on the GPU recipes' real architectures, and tier launches.

Weights cannot be downloaded on the lent GPU machines either, so each model is the registry's architecture at
its real size with random weights: the 4-bit layers are quantised from random bf16 tensors, the rest initialised
in place. That is what a memory and throughput check needs. Each result sits beside `tunebook plan`'s estimate
for the same batch and sequence. `--tiny` runs the same code on tiny configs (the CPU test keeps it from rotting).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tunebook.outputs import ADAPTER_WEIGHTS, RUN_INFO_FILE, fine_tuned_dir

CHECK_RECIPES = ("phi3-sql", "mistral-sql", "llama3-sql")
TIER_CHECKS = ("deepspeed_zero2.yaml", "fsdp.yaml")


def random_qlora_model(config: Any, device: str, dtype: Any) -> Any:
    """The architecture with random weights: decoder linears as 4-bit NF4 (double quant, bf16 storage)."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name != "lm_head":
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=dtype, quant_type="nf4", quant_storage=dtype)
                # Drawn on the device: 8B random parameters take minutes on the CPU. bitsandbytes quantises the
                # Params4bit in `.to(device)` below (checked after the build).
                weight = torch.randn(child.out_features, child.in_features, dtype=dtype, device=device) * 0.02
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", quant_storage=dtype)
                if child.bias is not None:
                    layer.bias = torch.nn.Parameter(torch.zeros(child.out_features, dtype=dtype))
                setattr(module, child_name, layer.to(device))  # quantised as it moves
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                fill = torch.ones if "norm" in type(module).__name__.lower() else torch.randn
                data = fill(param.shape, dtype=dtype, device=device) * (1 if fill is torch.ones else 0.02)
                module._parameters[key] = torch.nn.Parameter(data, requires_grad=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    # As `from_pretrained` with a 4-bit BitsAndBytesConfig marks it: peft's prepare_model_for_kbit_training
    # turns activation checkpointing on only for a model so marked.
    model.is_loaded_in_4bit = True
    for module in model.modules():  # rotary inverse frequencies and other buffers
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[key] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)
        if hasattr(module, "rope_init_fn") and hasattr(module, "inv_freq"):
            inv_freq, _ = module.rope_init_fn(module.config, device)
            module.inv_freq = inv_freq
            module.original_inv_freq = inv_freq
    return model


def qlora_steps(recipe_name: str, steps: int = 4, batch: int = 2, seq: int = 512, tiny: bool = False,
                device: str | None = None) -> dict[str, Any]:
    """A few QLoRA steps (activation checkpointing on) on random data: tokens/s, peak memory and plan's estimate."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from tunebook.config import load_recipe
    from tunebook.models import architecture_config, tiny_config
    from tunebook.plan import GIB, estimate, shapes

    recipe = load_recipe(recipe_name)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = architecture_config(recipe.model.name)
    if tiny:
        config = tiny_config(config)
    dtype = torch.bfloat16
    started = time.perf_counter()
    model = random_qlora_model(config, device, dtype)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = {k: v for k, v in recipe.lora.items() if k != "lora_dropout"}
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    built = time.perf_counter() - started
    unquantised = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit) and not m.weight.bnb_quantized]
    if unquantised:
        raise RuntimeError(f"{len(unquantised)} 4-bit layers were left unquantised, e.g. {unquantised[0]}")
    model.train()  # activation checkpointing acts in training mode only, as under the Trainer
    weights_gib = torch.cuda.memory_allocated() / GIB if device == "cuda" else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed = 0.0
    for step in range(steps + 1):  # the first step warms up and is not timed
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        timed += (time.perf_counter() - t0) if step else 0.0
    peak = torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None
    s = shapes(config, list(recipe.lora["target_modules"]), int(recipe.lora.get("r", 8)))
    plan_gib = estimate(s, "4bit", "bfloat16", batch, seq, checkpointing=True).total / GIB
    result = {"recipe": recipe_name, "model": recipe.model.name, "tiny": tiny, "device": device,
              "parameters": s.total_params, "batch": batch, "sequence": seq, "steps": steps,
              "build_s": round(built, 1), "tokens_per_s": round(steps * batch * seq / timed, 1),
              "weights_gib": round(weights_gib, 2) if weights_gib is not None else None,
              "peak_gib": round(peak, 2) if peak is not None else None, "plan_gib": round(plan_gib, 2),
              "loss": round(loss.item(), 4)}
    del model, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def tier_config(tier_file: str, workdir: Path) -> Path:
    """A copy of the tier's accelerate file in `workdir` (an absolute path), for a launch from there: the
    DeepSpeed JSON it names is relative to the repository root, where users launch from, so the copy names it
    by its absolute path."""
    import yaml

    root = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((root / "accelerate_configs" / tier_file).read_text())
    ds = config.get("deepspeed_config") or {}
    if ds.get("deepspeed_config_file") and not Path(ds["deepspeed_config_file"]).is_absolute():
        ds["deepspeed_config_file"] = str(root / ds["deepspeed_config_file"])
    copy = workdir / tier_file
    copy.write_text(yaml.safe_dump(config))
    return copy


def tier_launch(tier_file: str, workdir: Path, tiny: bool = False, steps: int = 3) -> dict[str, Any]:
    """`accelerate launch --config_file <tier> --num_processes 1 -m tunebook train` on a random SmolLM2-shaped
    model (tiny with `tiny`) and a small generated chat split: does the tier train and write its adapter?"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunebook.models import architecture_config, resolve_model_path, tiny_config

    workdir = workdir.resolve()  # the launch runs inside it, and the recipe names paths in it
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = workdir / "model"
    if not (model_dir / "config.json").exists():
        config = architecture_config("smollm2-135m-instruct")
        if tiny:
            config = tiny_config(config)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct")).save_pretrained(model_dir)
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": str(2 * i)}]} for i in range(32)]
    data = workdir / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = workdir / "tier-check.yaml"
    recipe.write_text(json.dumps({
        "model": {"name": str(model_dir), "dtype": "bfloat16" if torch.cuda.is_available() else "float32"},
        "task": "arithmetic", "data": {"train": str(data), "val": str(data), "test": str(data), "max_length": 64,
                                       "val_limit": 0},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {"max_steps": steps, "per_device_train_batch_size": 2, "save_steps": 100, "report_to": "none",
                     "gradient_checkpointing": False, "logging_steps": 1},
        "eval": {"metrics": ["exact_match"], "limit": 2}, "export": {"gguf": ["f16"]}}))
    accelerate = Path(sys.executable).with_name("accelerate")
    config_file = tier_config(tier_file, workdir)
    command = [str(accelerate), "launch", "--config_file", str(config_file), "--num_processes", "1",
               "-m", "tunebook", "train", str(recipe), "--force"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                              str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))})
    adapter = workdir / fine_tuned_dir("tier-check") / ADAPTER_WEIGHTS
    info = adapter.with_name(RUN_INFO_FILE)
    ran_as = json.loads(info.read_text()).get("tier") if info.exists() else None
    # On a CPU the Trainer sets accelerate up as MULTI_CPU (DDP over gloo) whatever the file says: `ran_as` tells.
    return {"tier": tier_file, "ran_as": ran_as, "returncode": done.returncode,
            "seconds": round(time.perf_counter() - started, 1), "adapter_written": adapter.exists(),
            "tail": (done.stdout + done.stderr)[-4000:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunebook.gpu_check", description=__doc__)
    parser.add_argument("--out", default="bench/gpu_check.json")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (a CPU smoke run of this script)")
    parser.add_argument("--recipes", nargs="*", default=list(CHECK_RECIPES))
    parser.add_argument("--tiers", nargs="*", default=list(TIER_CHECKS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--workdir", default="build/gpu-check")
    parser.add_argument("--bench", action="store_true",
                        help="also `tunebook bench --gpu`: tunebook's QLoRA training vs plain Trainer + PEFT")
    args = parser.parse_args(argv)
    import torch

    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                               "torch": torch.__version__, "qlora": [], "tiers": []}
    for name in args.recipes:
        try:
            results["qlora"].append(qlora_steps(name, args.steps, args.batch, args.seq, args.tiny))
        except Exception as exc:  # record and go on: one model's failure must not cost the others' numbers
            results["qlora"].append({"recipe": name, "error": f"{type(exc).__name__}: {exc}"})
        print(json.dumps(results["qlora"][-1]), flush=True)
    for tier in args.tiers:
        results["tiers"].append(tier_launch(tier, Path(args.workdir) / tier.removesuffix(".yaml"), args.tiny))
        print(json.dumps({k: v for k, v in results["tiers"][-1].items() if k != "tail"}), flush=True)
    if args.bench:
        from tunebook.bench import record_gpu
        from tunebook.gpu_bench import bench_gpu

        results["bench"] = bench_gpu(tuple(args.recipes), args.tiny, steps=args.steps)
        if not args.tiny:
            print(f"bench: {record_gpu(results['bench'])}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
