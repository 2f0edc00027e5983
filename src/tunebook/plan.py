"""`tunebook plan`: what a recipe needs in memory per device, before anything loads.

Parameter counts are exact: the architecture is built on PyTorch's meta device (shapes, no storage) from the
registry's config, and LoRA's added parameters are counted from the shapes of the targeted linear layers. The
memory around them is an estimate, term by term, in the units torch reports (`max_memory_allocated`):

- weights: targeted-for-quantisation linear layers at 4-bit NF4 with double quantisation (0.5 byte + 8-bit
  absmax per 64 weights + an fp32 scale per 256 of those) or 8-bit; embeddings, norms and the LM head in fp32,
  where peft's `prepare_model_for_kbit_training` (which `tunebook train` runs on k-bit models) upcasts them
  (`kbit_upcast`; measured on an H100: 7.49 GiB of weights for Llama-3-8B vs 7.42 estimated), else in the
  compute dtype;
- LoRA: 16 bytes per added parameter (fp32 weight, fp32 gradient, AdamW's two fp32 moments);
- activations, per token and layer, saved for backward in the compute dtype (fp32 under `kbit_upcast`: the
  upcast embeddings make the residual stream fp32, and bitsandbytes returns its input's dtype): the layer's input and the normed
  inputs (RMSNorm upcasts to fp32), q/k/v, the attention output, the MLP's gate, up, activation and product
  (`ACTIVATION_TERMS`); with activation checkpointing only each layer's input is kept, plus one layer's
  activations while it is recomputed;
- logits: every position × vocabulary, in the compute dtype plus the fp32 copy the loss takes and its
  gradient (transformers' `ForCausalLMLoss` upcasts); a chunked loss (torchtune) keeps one fp32 chunk;
- sharding: DDP keeps everything on every device; ZeRO-2 shards the LoRA gradients and optimizer state;
  ZeRO-3 and FSDP shard the weights too.
On a GPU add the CUDA context (`CUDA_CONTEXT_GIB`), which torch does not count, before comparing with the card.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
INT8_BYTES = 1.0
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LORA_BYTES_PER_PARAM = 16
CUDA_CONTEXT_GIB = 0.5
TIER_FILES = {"single": "single_gpu.yaml", "ddp": "multi_gpu_ddp.yaml", "zero2": "deepspeed_zero2.yaml",
              "zero3": "deepspeed_zero3.yaml", "fsdp": "fsdp.yaml", "cpu": "cpu.yaml"}


@dataclass
class Shapes:
    """What the estimate needs from an architecture, counted on the meta device."""

    total_params: int
    quantizable_params: int  # linear layers inside the decoder blocks (bitsandbytes quantises these)
    lora_params: int
    layers: int
    hidden: int
    kv: int  # key/value width: kv heads × head dim
    intermediate: int
    vocab: int


def shapes(config: Any, target_modules: list[str], r: int) -> Shapes:
    """Exact parameter counts of an architecture and of LoRA rank `r` on `target_modules` (meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    quantizable = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] != "lm_head":
            quantizable += module.weight.numel()
            if name.split(".")[-1] in target_modules:
                lora += r * (module.in_features + module.out_features)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    return Shapes(total, quantizable, lora, config.num_hidden_layers, config.hidden_size, kv,
                  config.intermediate_size, config.vocab_size)


def activation_bytes_per_token(s: Shapes, dtype_bytes: int, checkpointing: bool) -> float:
    """Activation memory per token over all layers (see the module docstring for the terms)."""
    per_layer = dtype_bytes * (4 * s.hidden + 2 * s.kv + 4 * s.intermediate) + 4 * 2 * s.hidden  # + fp32 norms
    if checkpointing:
        return s.layers * dtype_bytes * s.hidden + per_layer
    return s.layers * (per_layer + dtype_bytes * s.hidden)


ACTIVATION_TERMS = "4 × hidden + 2 × kv + 4 × intermediate in the compute dtype, 2 × hidden in fp32 (norms)"


@dataclass
class Estimate:
    """Bytes per device, by term, and the totals."""

    weights: float
    lora_state: float
    activations: float
    logits: float
    total: float

    def gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 2) for k, v in asdict(self).items()}


def working_bytes(quantization: str, dtype: str, kbit_upcast: bool = True) -> int:
    """Bytes per unquantised weight and per activation: fp32 for a k-bit model that peft's
    `prepare_model_for_kbit_training` upcast (what `tunebook train` runs), else the compute dtype's."""
    return DTYPE_BYTES["float32"] if kbit_upcast and quantization in ("4bit", "8bit") else DTYPE_BYTES[dtype]


def estimate(s: Shapes, quantization: str, dtype: str, batch: int, seq: int, checkpointing: bool,
             tier: str = "single", devices: int = 1, loss_chunks: int = 1, kbit_upcast: bool = True) -> Estimate:
    """Peak bytes per device for one training step of `batch` sequences of `seq` tokens on each device.

    `kbit_upcast`: a k-bit model's other weights and its activations in fp32, as `tunebook train` runs it;
    False for frameworks that keep them in the compute dtype (torchtune).
    """
    quant_bytes = {"4bit": NF4_BYTES, "8bit": INT8_BYTES}.get(quantization, DTYPE_BYTES[dtype])
    compute = working_bytes(quantization, dtype, kbit_upcast)
    weights = s.quantizable_params * quant_bytes + (s.total_params - s.quantizable_params) * compute
    lora_state = s.lora_params * LORA_BYTES_PER_PARAM
    if tier in ("zero3", "fsdp"):
        weights /= devices
    if tier in ("zero2", "zero3", "fsdp"):
        lora_state = s.lora_params * 4 + s.lora_params * 12 / devices  # weights whole; grads + moments sharded
    tokens = batch * seq
    activations = tokens * activation_bytes_per_token(s, compute, checkpointing)
    logits = tokens * s.vocab * compute + tokens * s.vocab * 8 / loss_chunks  # + fp32 copy and its gradient
    return Estimate(weights, lora_state, activations, logits, weights + lora_state + activations + logits)


def recommend(s: Shapes, recipe: Any, gpus: int, gpu_memory_gib: float, batch: int, seq: int, ckpt: bool
              ) -> tuple[str, Estimate]:
    """The simplest tier whose estimate fits (single/DDP, then ZeRO-2, ZeRO-3, FSDP), else the smallest."""
    order = ["single"] if gpus == 1 else ["ddp", "zero2", "zero3", "fsdp"]
    budget = (gpu_memory_gib - CUDA_CONTEXT_GIB) * GIB
    options = [(tier, estimate(s, recipe.model.quantization, _dtype(recipe), batch, seq, ckpt, tier, gpus))
               for tier in order]
    for tier, est in options:
        if est.total <= budget:
            return tier, est
    return min(options, key=lambda o: o[1].total)


def _dtype(recipe: Any) -> str:
    return recipe.model.dtype if recipe.model.dtype in DTYPE_BYTES else "bfloat16"


def tier_of(path: str | None) -> str | None:
    """The tier an accelerate config file describes (its distributed_type and DeepSpeed stage)."""
    if path is None:
        return None
    import yaml

    from tunebook.errors import RecipeError

    try:
        config = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise RecipeError("tunebook plan", "--tier", f"cannot read '{path}' ({exc.strerror}).",
                          f"Use one of accelerate_configs/{{{','.join(TIER_FILES.values())}}}.") from None
    kind = str(config.get("distributed_type", "NO"))
    if kind == "DEEPSPEED":
        ds = config.get("deepspeed_config", {})
        stage = ds.get("zero_stage")
        if stage is None and ds.get("deepspeed_config_file"):
            import json

            stage = json.loads(Path(ds["deepspeed_config_file"]).read_text())["zero_optimization"]["stage"]
        return "zero3" if int(stage) == 3 else "zero2"
    return {"FSDP": "fsdp", "MULTI_GPU": "ddp"}.get(kind, "single")


def plan(recipe: Any, gpus: int = 1, gpu_memory_gib: float | None = None, tier_file: str | None = None
         ) -> dict[str, Any]:
    """Everything `tunebook plan` prints, as data."""
    from tunebook.config import METHOD_SECTIONS
    from tunebook.errors import RecipeError
    from tunebook.models import architecture_config, registry_entry

    config = architecture_config(recipe.model.name)
    if config is None:
        raise RecipeError(recipe.source, "model.name", f"the architecture of '{recipe.model.name}' is not known "
                          "offline.", "Use a registry name, a local directory, or a hub id already in the cache.")
    t = recipe.training
    batch, seq = int(t.get("per_device_train_batch_size", 8)), recipe.data.max_length
    ckpt = bool(t.get("gradient_checkpointing", True))  # TRL's default is on
    from tunebook.runs import lora_settings

    lora = lora_settings(recipe)  # a stage trains its parent's adapter
    s = shapes(config, list(lora.get("target_modules") or []), int(lora.get("r", 8)))
    entry = registry_entry(recipe.model.name)
    on_cpu = entry is not None and entry.embedded and gpu_memory_gib is None  # the embedded default runs on CPU
    dtype = "float32" if on_cpu and recipe.model.dtype == "auto" else _dtype(recipe)
    act = working_bytes(recipe.model.quantization, dtype)
    out: dict[str, Any] = {
        "recipe": recipe.name, "section": METHOD_SECTIONS[recipe.method], "model": recipe.model.name,
        "quantization": recipe.model.quantization,
        "dtype": dtype, "parameters": s.total_params, "quantized_parameters": s.quantizable_params
        if recipe.model.quantization != "none" else 0, "lora_parameters": s.lora_params,
        "batch_per_device": batch, "sequence": seq, "accumulation": int(t.get("gradient_accumulation_steps", 1)),
        "activation_checkpointing": ckpt,
        "activations_gib": {"with_checkpointing": round(batch * seq * activation_bytes_per_token(s, act, True) / GIB, 2),
                            "without": round(batch * seq * activation_bytes_per_token(s, act, False) / GIB, 2)},
    }
    if on_cpu:
        est = estimate(s, recipe.model.quantization, dtype, batch, seq, ckpt)
        out.update(device="cpu", tier="cpu", accelerate_config=f"accelerate_configs/{TIER_FILES['cpu']}",
                   per_device_gib=est.gib(), ram_gib=round(est.total / GIB + CPU_RUNTIME_GIB, 2))
        return out
    memory = gpu_memory_gib or 80.0
    chosen = tier_of(tier_file)
    if chosen is not None:
        est = estimate(s, recipe.model.quantization, dtype, batch, seq, ckpt, chosen, gpus)
    else:
        chosen, est = recommend(s, recipe, gpus, memory, batch, seq, ckpt)
    need = est.total / GIB + CUDA_CONTEXT_GIB
    out.update(device=f"{gpus} GPU(s) × {memory:g} GiB", tier=chosen,
               accelerate_config=tier_file or f"accelerate_configs/{TIER_FILES[chosen]}",
               per_device_gib=est.gib(), cuda_context_gib=CUDA_CONTEXT_GIB, need_gib=round(need, 2),
               fits=need <= memory, headroom_gib=round(memory - need, 2),
               effective_batch=gpus * batch * out["accumulation"])
    if need > memory:
        out["suggestion"] = smaller_batch(s, recipe, dtype, batch, out["accumulation"], seq, ckpt, chosen, gpus,
                                          memory)
    return out


def smaller_batch(s: Shapes, recipe: Any, dtype: str, batch: int, accumulation: int, seq: int, ckpt: bool,
                  tier: str, gpus: int, memory_gib: float) -> dict[str, Any] | None:
    """The largest per-device batch that fits, with the accumulation that keeps the effective batch; None if none."""
    per_step = batch * accumulation
    for smaller in range(batch - 1, 0, -1):
        if per_step % smaller:
            continue
        est = estimate(s, recipe.model.quantization, dtype, smaller, seq, ckpt, tier, gpus)
        need = est.total / GIB + CUDA_CONTEXT_GIB
        if need <= memory_gib:
            return {"per_device_train_batch_size": smaller, "gradient_accumulation_steps": per_step // smaller,
                    "need_gib": round(need, 2)}
    return None


# Python, torch and the tokenizer resident in a CPU training process before any tensor (measured: a bare
# `import torch, transformers, trl, peft` process with the tokenizer loaded holds ~0.6 GB RSS).
CPU_RUNTIME_GIB = 0.6


def render(p: dict[str, Any]) -> str:
    """The plan as the console shows it."""
    g = p["per_device_gib"]
    lines = [
        f"{p['recipe']}: {p['model']}, {p['parameters'] / 1e9:.2f}B parameters"
        + (f" ({p['quantized_parameters'] / 1e9:.2f}B quantised {p['quantization']})" if p["quantized_parameters"] else "")
        + f", LoRA {p['lora_parameters'] / 1e6:.1f}M, compute {p['dtype']}"
        + (" (other weights and activations fp32: peft's k-bit upcast)" if p["quantized_parameters"] else ""),
        f"batch {p['batch_per_device']} × {p['sequence']} tokens per device, accumulation {p['accumulation']}, "
        f"activation checkpointing {'on' if p['activation_checkpointing'] else 'off'} "
        f"(activations {p['activations_gib']['with_checkpointing']} GiB with it, {p['activations_gib']['without']} without)",
        f"per device ({p['tier']}): weights {g['weights']} + LoRA and optimizer {g['lora_state']} + activations "
        f"{g['activations']} + logits {g['logits']} = {g['total']} GiB",
    ]
    if p["device"] == "cpu":
        lines.append(f"on the CPU: about {p['ram_gib']} GiB of RAM with the Python runtime; "
                     f"launch: {p['accelerate_config']} (or plain `tunebook train`)")
    else:
        verdict = "fits" if p["fits"] else "does NOT fit"
        lines.append(f"{p['device']}: needs {p['need_gib']} GiB with the CUDA context: {verdict} "
                     f"(headroom {p['headroom_gib']} GiB); effective batch {p['effective_batch']}")
        fix = p.get("suggestion")
        if fix:
            section = p.get("section", "training")
            lines.append(f"fix: {section}.per_device_train_batch_size={fix['per_device_train_batch_size']} "
                         f"{section}.gradient_accumulation_steps={fix['gradient_accumulation_steps']} keeps the "
                         f"effective batch and needs {fix['need_gib']} GiB")
        elif not p["fits"]:
            lines.append("fix: even a batch of 1 does not fit: shorten data.max_length, or shard over more GPUs "
                         "(--gpus N --tier accelerate_configs/deepspeed_zero3.yaml)")
        lines.append(f"launch: accelerate launch --config_file {p['accelerate_config']} -m tunebook train {p['recipe']}")
    return "\n".join(lines)
