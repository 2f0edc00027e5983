"""`model.dtype: auto`: the precision that is fastest on this machine, chosen by measurement, with the reason."""

from __future__ import annotations

import functools
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CACHE = Path.home() / ".cache" / "tunebook" / "precision.json"
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
MARGIN = 0.9  # bf16 must be at least 10% faster: fp32 is exact and never far behind


@dataclass(frozen=True)
class Precision:
    dtype: str  # float32 | bfloat16 | float16
    why: str


def cpu_description() -> tuple[str, set[str]]:
    """The CPU's model name and its flags (from /proc/cpuinfo; empty flags where that file does not exist)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return name, flags


def resolve(dtype: str) -> Precision:
    """`dtype` itself, or for `auto` the fastest precision here: bf16 on GPUs that have it, by measurement on CPUs."""
    if dtype != "auto":
        return Precision(dtype, "set in the recipe")
    return _auto()


@functools.cache
def _auto() -> Precision:
    import torch

    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return Precision("bfloat16", f"GPU {torch.cuda.get_device_name(0)} supports bf16")
        return Precision("float16", f"GPU {torch.cuda.get_device_name(0)} has no bf16")
    name, flags = cpu_description()
    found = [f for f in BF16_FLAGS if f in flags]
    if not found:
        return Precision("float32", f"{name} has no bf16 instructions ({'/'.join(BF16_FLAGS)}): bf16 would be "
                                    "emulated, ~25x slower")
    key = f"{name}|{','.join(found)}|torch {torch.__version__}|{torch.get_num_threads()} threads"
    cached = _read_cache().get(key)
    if cached is None:
        fp32, bf16 = probe_step_seconds(torch.float32), probe_step_seconds(torch.bfloat16)
        cached = {"fp32_ms": round(fp32 * 1000, 1), "bf16_ms": round(bf16 * 1000, 1)}
        _write_cache(key, cached)
    fp32, bf16 = cached["fp32_ms"], cached["bf16_ms"]
    chosen = "bfloat16" if bf16 < MARGIN * fp32 else "float32"
    return Precision(chosen, f"{name} ({', '.join(found)}): a LoRA-style step took {bf16:.0f} ms in bf16 vs "
                             f"{fp32:.0f} ms in fp32 (measured once, cached in {CACHE})")


def probe_step_seconds(dtype, repeats: int = 3) -> float:
    """Median time of forward + backward through two SmolLM2-sized decoder layers (frozen weights, as in LoRA)."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=256, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = LlamaModel(config).to(dtype).requires_grad_(False)
    times = []
    for _ in range(repeats + 1):
        x = torch.randn(1, 512, 576, dtype=dtype, requires_grad=True)
        started = time.perf_counter()
        model(inputs_embeds=x).last_hidden_state.float().square().mean().backward()
        times.append(time.perf_counter() - started)
    return sorted(times[1:])[repeats // 2]


def _read_cache() -> dict:
    try:
        return json.loads(CACHE.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_cache(key: str, value: dict) -> None:
    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = CACHE.with_name(f".{CACHE.name}.tmp")
        tmp.write_text(json.dumps({**_read_cache(), key: value}, indent=2))
        tmp.replace(CACHE)
    except OSError:
        pass  # an unwritable home only costs a re-measurement next time


def as_dict(precision: Precision) -> dict[str, str]:
    return asdict(precision)


def mixed_precision_flags(kwargs: dict[str, Any], dtype: str, use_cuda: bool) -> None:
    """Set a trainer config's `bf16`/`fp16` in `kwargs`. TRL turns bf16 on by default; tunebook follows the model's
    resolved dtype instead, because bf16 autocast on a CPU without AMX is much slower than fp32
    (docs/performance.md#per-machine-figures). A recipe that sets either flag gets the other off unless it sets
    it too (transformers refuses both on)."""
    if "bf16" in kwargs or "fp16" in kwargs:
        kwargs.setdefault("bf16", False)
        kwargs.setdefault("fp16", False)
    else:
        kwargs["bf16"] = dtype == "bfloat16"
        kwargs["fp16"] = dtype == "float16" and use_cuda

