"""`make bench`: side-by-side speed ratios on this machine, written to bench/results.json.

- generation: batched (left padding, KV cache) vs one-at-a-time greedy eval on the same prompts;
- training: tokens/s of a LoRA step in fp32 vs bf16 autocast (why CPU recipes use fp32).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from tunebook.config import load_recipe
from tunebook.data import read_jsonl
from tunebook.generation import generate_ids
from tunebook.models import load_model, load_tokenizer, resolve_model_path


def bench_generation(recipe_name: str, n: int) -> dict:
    recipe = load_recipe(recipe_name)
    path = resolve_model_path(recipe.model.name)
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = "left"
    model = load_model(path, recipe.model, for_training=False).eval()
    rows = read_jsonl(recipe.data.test)[:n]
    system, max_new = recipe.data.system_prompt, 48
    t0 = time.perf_counter()
    batched = generate_ids(model, tokenizer, rows, system, max_new, batch_size=recipe.eval.batch_size)
    t1 = time.perf_counter()
    single = [generate_ids(model, tokenizer, [r], system, max_new, batch_size=1)[0] for r in rows]
    t2 = time.perf_counter()
    return {"recipe": recipe_name, "examples": n, "max_new_tokens": max_new, "batch_size": recipe.eval.batch_size,
            "batched_examples_per_s": round(n / (t1 - t0), 3), "single_examples_per_s": round(n / (t2 - t1), 3),
            "speedup": round((t2 - t1) / (t1 - t0), 2), "identical_outputs": batched == single}


def bench_training_dtype() -> dict:
    from peft import LoraConfig, get_peft_model

    path = resolve_model_path("smollm2-135m-instruct")
    out = {}
    for name, autocast, steps in (("fp32", False, 3), ("bf16_autocast", True, 1)):  # bf16 is ~25x slower here
        model = load_model(path, load_recipe("smollm2-sql").model, for_training=True)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, target_modules=["q_proj", "v_proj"]))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(0, 49000, (2, 256))
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - t0)
        out[f"{name}_tokens_per_s"] = round(ids.numel() / min(times), 1)
    out["fp32_over_bf16"] = round(out["fp32_tokens_per_s"] / out["bf16_autocast_tokens_per_s"], 1)
    return out


def main() -> int:
    n = int(os.environ.get("BENCH_EXAMPLES", "32"))
    results = {
        "machine": f"{platform.machine()} {platform.processor()} {os.cpu_count()} cores, torch {torch.__version__}",
        "generation": bench_generation(sys.argv[1] if len(sys.argv) > 1 else "smollm2-sql", n),
        "training_dtype": bench_training_dtype(),
    }
    Path("bench").mkdir(exist_ok=True)
    Path("bench/results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
