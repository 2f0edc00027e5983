"""Where a training step's time goes: torch.profiler over two steps of `tunebook train` as the recipe runs it.

    python bench/profile_step.py RECIPE_FILE [WARMUP_STEPS]

RECIPE_FILE is a recipe copy whose outputs may be overwritten (`make bench` writes one to a temporary folder).
After WARMUP_STEPS steps (default 5: oneDNN has built its kernels for most shapes by then) two training steps
run under the profiler. Prints the top operators by self CPU time and, as the last line, one JSON object: seconds
per step, each operator group's share (matmul, attention, elementwise, dtype copies, other) and the top operators.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import transformers
from torch.profiler import ProfilerActivity, profile

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::linear"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "dtype copies": ("aten::copy_", "aten::_to_copy"),
    "elementwise": ("aten::mul", "aten::add", "aten::add_", "aten::sub", "aten::div", "aten::div_", "aten::silu",
                    "aten::silu_backward", "aten::pow", "aten::exp", "aten::neg", "aten::rsqrt", "aten::mean",
                    "aten::sum", "aten::fill_", "aten::mul_", "aten::cat"),
}
PROFILED_STEPS = 2


def main(recipe_file: str, warmup: int = 5) -> dict:
    import tunebook.outputs as outputs

    folder = Path(recipe_file).parent
    outputs.MODELS_DIR, outputs.LOGS_DIR = folder / "models", folder / "logs"
    original = transformers.Trainer.training_step
    found: dict = {}
    calls = [0]

    def training_step(self, *args, **kwargs):  # the profiled steps run inside the real trainer, as in training
        calls[0] += 1
        if calls[0] != warmup + 1:
            return original(self, *args, **kwargs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(PROFILED_STEPS - 1):
                original(self, *args, **kwargs)
            out = original(self, *args, **kwargs)
        found["table"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        found["ops"] = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
        return out

    transformers.Trainer.training_step = training_step
    from tunebook.cli import main as cli

    if cli(["train", recipe_file, "--force"]) != 0:
        raise SystemExit("tunebook train failed")
    ops = found["ops"]
    total = sum(ops.values())
    shares = {group: sum(ops.get(op, 0.0) for op in names) / total for group, names in GROUPS.items()}
    shares["other"] = 1 - sum(shares.values())
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:8]
    print(found["table"], file=sys.stderr)
    return {"seconds_per_step": round(total / PROFILED_STEPS, 3),
            "shares": {k: round(v, 3) for k, v in shares.items()},
            "top": [{"op": op, "share": round(s / total, 3)} for op, s in top]}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], *(int(a) for a in sys.argv[2:]))))
