"""`tunebook export`: merged model, GGUF files and an Ollama Modelfile that behave like the trained model.

Conversion runs llama.cpp's own `convert_hf_to_gguf.py`, taken from the llama.cpp tree vendored in the PyPI
source distribution of llama-cpp-python (fetched by `make` into build/llama.cpp): no git checkout, no network at
export time, and the converter is the same code llama.cpp users run. It writes f16/bf16/q8_0 directly; k-quants
(q4_k_m, q5_k_m, …) are made from the f16 file by llama.cpp's quantizer through llama-cpp-python.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tunebook.config import GGUF_DIRECT_TYPES, Recipe
from tunebook.console import native_output_to_log
from tunebook.errors import RecipeError
from tunebook.llamacpp import greedy_ids, load_gguf
from tunebook.models import load_tokenizer, local_model_dir, resolve_model_path
from tunebook.outputs import (
    ADAPTER_WEIGHTS,
    adapter_gguf_file,
    base_gguf_file,
    clean_leftovers,
    gguf_dir,
    gguf_file,
    merged_dir,
    modelfile_path,
    report_dir,
    swap_in_together,
    temp_sibling,
    verify_file,
)
from tunebook.prompts import render_prompt, stop_strings
from tunebook.runs import Run, check_adapter_is_run, identify, run_lock
from tunebook.validate import check_adapter, validate_recipe

CONVERTER_DIR = Path(os.environ.get("TUNEBOOK_LLAMA_CPP", "build/llama.cpp"))
log = logging.getLogger(__name__)
# Architectures llama.cpp's converter handles that tunebook's recipes use.
GGUF_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM", "Qwen2ForCausalLM", "GemmaForCausalLM"}
# f16 must agree with the merged HF model on (almost) every position where HF's choice is clear: its top-1
# logit beats the runner-up by CONFIDENT_MARGIN. Near-ties can flip at fp16 precision and prove nothing; a
# missing adapter, a wrong template or a broken conversion shows up on confident positions.
CONFIDENT_MARGIN = 1.0
F16_MIN_CONFIDENT_AGREEMENT = 0.99


class ExportCheckFailed(RuntimeError):
    """A written file failed its check; nothing of this export was put in place."""


# ---------------------------------------------------------------- merge


def merge(recipe: Recipe, adapter_dir: Path, out: Path) -> Path:
    """Merge the LoRA adapter into the base (in the training dtype) and save safetensors + tokenizer to `out`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunebook.models import torch_dtype
    from tunebook.prompts import stop_token_ids

    base_path = resolve_model_path(recipe.model.name)
    log.info("merging %s into %s", adapter_dir, base_path)
    # Merging into 4-bit weights would round the adapter away: QLoRA recipes merge into the unquantised base.
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype(recipe.model.dtype),
                                                trust_remote_code=recipe.model.trust_remote_code)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    tokenizer = load_tokenizer(str(adapter_dir))
    from tunebook.prompts import template_as_trained

    tokenizer.chat_template = template_as_trained(tokenizer)  # the GGUF's own template writes the trained prompt
    stops = stop_token_ids(tokenizer, recipe.data.system_prompt)
    merged.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.config.use_cache = True
    with torch.no_grad():
        merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    copy_tokenizer_sources(recipe.model.name, out)
    return out


# Tokenizer files llama.cpp's converter may read that a fast tokenizer's save_pretrained does not write (Phi-3's
# and Mistral's converters read the sentencepiece model).
TOKENIZER_SOURCES = ("tokenizer.model", "added_tokens.json")


def copy_tokenizer_sources(model_name: str, out: Path) -> None:
    """Copy the base model's tokenizer source files into `out` where the saved tokenizer lacks them."""
    base = local_model_dir(model_name)
    for name in TOKENIZER_SOURCES:
        source = base / name if base is not None else None
        if source is not None and source.exists() and not (out / name).exists():
            shutil.copy(source, out / name)


# ---------------------------------------------------------------- GGUF


def converter_script() -> Path:
    script = CONVERTER_DIR / "convert_hf_to_gguf.py"
    if not script.exists():
        raise RecipeError(
            "export", None, f"llama.cpp's converter is not at {script}.",
            "Run `make llama-cpp-converter` (extracts it from the llama-cpp-python source archive on PyPI) "
            "or set TUNEBOOK_LLAMA_CPP to a llama.cpp checkout.",
        )
    return script


def convert(model_dir: Path, outfile: Path, outtype: str, model_name: str | None = None) -> None:
    """HF directory -> GGUF with llama.cpp's converter (tokenizer, chat template and special ids included).

    `model_name` becomes the GGUF's `general.name`. llama.cpp reads tokenizer rules from it: for a name with
    "phi3"/"phi-3" it strips the whitespace after Phi-3's special tokens, as Phi-3's own tokenizer does. The
    converter's default is the folder's name, which for `models/merged/<run>/` says nothing about the base model.
    """
    cmd = [sys.executable, str(converter_script()), str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
    if model_name:
        cmd += ["--model-name", model_name]
    done = subprocess.run(cmd, capture_output=True, text=True)
    log.info("%s\n%s%s", " ".join(cmd), done.stdout, done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({outtype}):\n{done.stderr[-3000:]}")


def convert_lora(adapter_dir: Path, base_dir: Path, outfile: Path) -> None:
    """PEFT LoRA adapter -> GGUF with llama.cpp's `convert_lora_to_gguf.py` (the base only lends its config)."""
    script = converter_script().with_name("convert_lora_to_gguf.py")
    cmd = [sys.executable, str(script), str(adapter_dir), "--base", str(base_dir), "--outfile", str(outfile),
           "--outtype", "f16"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    log.info("%s\n%s%s", " ".join(cmd), done.stdout, done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"convert_lora_to_gguf.py failed:\n{done.stderr[-3000:]}")


def base_gguf(recipe: Recipe, base_dir: Path, qtype: str) -> Path:
    """The base model's GGUF of `qtype`, written once per base model (whole or absent) and shared by its runs."""
    out = base_gguf_file(recipe.model.name, qtype)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    f16 = base_gguf_file(recipe.model.name, "f16")
    tmp = temp_sibling(out)
    try:
        if qtype in GGUF_DIRECT_TYPES:
            convert(base_dir, tmp, qtype, base_model_name(recipe))
        else:
            source = f16 if f16.exists() else temp_sibling(f16)
            if source != f16:
                convert(base_dir, source, "f16", base_model_name(recipe))
            try:
                quantize(source, tmp, qtype)
            finally:
                if source != f16:
                    source.unlink(missing_ok=True)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def quantize(source: Path, outfile: Path, qtype: str) -> None:
    """k-quants through llama.cpp's quantizer (llama-cpp-python)."""
    try:
        import llama_cpp
    except ImportError:
        raise RecipeError(
            "export.gguf", None, f"'{qtype}' needs llama.cpp's quantizer, and llama-cpp-python is not installed.",
            "Run `make llama-cpp` (compiles it, ~8 minutes on 2 cores), or list only f16/bf16/q8_0.",
        ) from None
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if ftype is None:
        raise RecipeError("export.gguf", None, f"'{qtype}' is not a llama.cpp quantisation type.",
                          "Use e.g. f16, q8_0, q4_k_m, q5_k_m, q6_k.")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    with native_output_to_log():  # llama.cpp logs every tensor to stderr from C
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(outfile).encode(), params)
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({qtype}) failed with status {status}")


def gguf_summary(path: Path) -> dict[str, Any]:
    """Tensor count, tensor-type mix and tokenizer metadata of a GGUF, read back with the gguf reader."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        if f is None:
            return None
        value = f.parts[f.data[0]]
        return bytes(value).decode() if f.types and f.types[0].name == "STRING" else value.tolist()[0]

    return {
        "tensors": len(reader.tensors),
        "shapes": sorted(tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors),
        "tensor_types": types,
        "chat_template": field("tokenizer.chat_template"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "architecture": field("general.architecture"),
        "size_mb": round(path.stat().st_size / 2**20, 1),
    }


def hf_tensor_shapes(model_dir: Path) -> list[tuple[int, ...]]:
    from safetensors import safe_open

    shapes = []
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            shapes += [tuple(handle.get_slice(k).get_shape()) for k in handle.keys()]  # noqa: SIM118 - safe_open is not a dict
    return sorted(shapes)


# ---------------------------------------------------------------- Modelfile


PROMPT_SLOT, SYSTEM_SLOT = "\x00PROMPT\x00", "\x00SYSTEM\x00"


def ollama_template(tokenizer: Any, system_prompt: str | None) -> str:
    """The Ollama TEMPLATE: the training prompt with the user turn (and system prompt) as Go-template slots.

    Rendered by the same `render_prompt` training uses, so the two cannot drift apart.
    """
    rendered = render_prompt(tokenizer, {"instruction": PROMPT_SLOT, "input": ""}, SYSTEM_SLOT if system_prompt else None)
    rendered = rendered.replace("{{", '{{ "{{" }}')  # the template's own text, literal to Go's template parser
    return rendered.replace(PROMPT_SLOT, "{{ .Prompt }}").replace(SYSTEM_SLOT, "{{ .System }}")


def modelfile(gguf_name: str, tokenizer: Any, system_prompt: str | None, num_ctx: int,
              adapter_name: str | None = None) -> str:
    """The Ollama Modelfile: FROM the merged GGUF, or FROM the base GGUF plus ADAPTER the run's adapter GGUF
    (`gguf_name` is then the base file, relative to the Modelfile)."""
    source = gguf_name if gguf_name.startswith("..") else f"./{gguf_name}"
    lines = [f"FROM {source}", *([f"ADAPTER ./{adapter_name}"] if adapter_name else []), "",
             f'TEMPLATE """{ollama_template(tokenizer, system_prompt)}"""']
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    lines.append("")
    lines += [f'PARAMETER stop "{stop}"' for stop in stop_strings(tokenizer, system_prompt)]
    lines += ["PARAMETER temperature 0", f"PARAMETER num_ctx {num_ctx}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- verification


def agreement(llm: Any, hf_sequences: list[tuple[list[int], list[int], list[float]]], stops: list[int],
              max_new: int) -> dict:
    """Top-1 agreement on the HF model's greedy continuations (all positions, and those where HF's margin is
    clear), and exact agreement of llama.cpp's own greedy outputs."""
    import numpy as np

    positions = agree = confident = confident_agree = exact = 0
    for prompt, answer, margins in hf_sequences:
        llm.reset()
        llm.eval(prompt + answer)
        logits = np.asarray(llm.scores[: len(prompt) + len(answer)])
        for offset, token in enumerate(answer):
            same = int(int(logits[len(prompt) + offset - 1].argmax()) == token)
            positions += 1
            agree += same
            if margins[offset] >= CONFIDENT_MARGIN:
                confident += 1
                confident_agree += same
        llm.reset()
        exact += int(greedy_ids(llm, prompt, stops, max_new) == answer)
    return {"positions": positions, "top1_agree": agree, "top1_agreement": agree / max(positions, 1),
            "confident_positions": confident, "confident_agree": confident_agree,
            "confident_agreement": confident_agree / max(confident, 1),
            "exact_outputs": exact, "prompts": len(hf_sequences)}


def hf_greedy(model_dir: Path, tokenizer: Any, rows: list[dict], system: str | None, max_new: int) -> list[tuple]:
    """(prompt ids, greedy answer ids, HF top-1 minus top-2 logit margin at each answer position)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunebook.generation import generate_ids
    from tunebook.prompts import encode_prompt

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    tokenizer.padding_side = "left"
    answers = generate_ids(model, tokenizer, rows, system, max_new, batch_size=len(rows))
    out = []
    for row, answer in zip(rows, answers, strict=True):
        prompt = encode_prompt(tokenizer, row, system)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1: -1]
        top2 = logits.topk(2, dim=-1).values
        out.append((prompt, answer, (top2[:, 0] - top2[:, 1]).tolist()))
    return out


# ---------------------------------------------------------------- the command


def base_model_name(recipe: Recipe) -> str:
    """The base model's own name (e.g. `Phi-3-mini-4k-instruct`): llama.cpp reads tokenizer rules from it."""
    from tunebook.models import registry_entry

    entry = registry_entry(recipe.model.name)
    base = entry.hub_id if entry is not None else recipe.model.name
    return Path(base.rstrip('/')).name


def gguf_model_name(run: Run) -> str:
    """`general.name` of a run's GGUF files: the base model's own name, then the run's (e.g.
    `Phi-3-mini-4k-instruct-phi3-sql`), so llama.cpp applies the base model's tokenizer rules."""
    return f"{base_model_name(run.recipe)}-{run.name}"


def check_export_tools(recipe: Recipe) -> None:
    """Everything the GGUF step needs, checked before the merge starts."""
    if not recipe.export.gguf:
        return
    arch = architecture_name(recipe)
    if arch not in GGUF_ARCHITECTURES:
        raise RecipeError(recipe.source, "export.gguf", f"the {arch} architecture is not supported by the GGUF path.",
                          "Set export.gguf: [] to export only the adapter and the merged model.")
    converter_script()
    needs_quantizer = [q for q in recipe.export.gguf if q not in GGUF_DIRECT_TYPES]
    if needs_quantizer and importlib.util.find_spec("llama_cpp") is None:
        raise RecipeError(
            recipe.source, "export.gguf", f"{', '.join(needs_quantizer)} need llama.cpp's quantizer, and "
            "llama-cpp-python is not installed.",
            "Run `make llama-cpp` (compiles it, ~8 minutes on 2 cores), or list only f16/bf16/q8_0.",
        )


def export(recipe: Recipe, verify: bool = True, force: bool = False) -> dict[str, Any]:
    """Write merged model, GGUFs, Modelfile and verify.json, all put in place together when every check passed.

    Everything is built in temp directories beside the final ones (`.<run>.tmp-<pid>`); a failure or a
    kill at any step leaves the previous export exactly as it was. `force` exports an adapter that another run
    trained (verify.json records how it differs).
    """
    from tunebook.data import sha256

    validate_recipe(recipe)
    run = identify(recipe)
    adapter = run.adapter_dir
    check_adapter(adapter, recipe)
    changes = check_adapter_is_run(run, adapter, "export", force)
    check_export_tools(recipe)
    with run_lock(run.name, f"export {run.command}"):
        for note in clean_leftovers(merged_dir(run.name), gguf_dir(run.name)):
            print(note)
        # Each temp directory sits beside its final place (same filesystem, so the final renames cannot fail
        # half-way on a symlinked models/gguf); both are swapped in together.
        work = {name: temp_sibling(final) for name, final in (("merged", merged_dir(run.name)),
                                                              ("gguf", gguf_dir(run.name)))}
        for path in work.values():
            shutil.rmtree(path, ignore_errors=True)
        try:
            provenance = {"run": run.name, "adapter_sha256": sha256(adapter / ADAPTER_WEIGHTS),
                          "adapter_differs_from_run": changes}
            verification = build_export(run, adapter, work["merged"], work["gguf"], verify, provenance)
            swap_in_together([(work["merged"], merged_dir(run.name)), (work["gguf"], gguf_dir(run.name))])
        finally:
            for path in work.values():
                shutil.rmtree(path, ignore_errors=True)
    return verification


def build_export(run: Run, adapter: Path, merged: Path, ggufs: Path, verify: bool,
                 provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge, convert, quantise, write the Modelfile and check every file; raise on the first failed check."""
    from tunebook.data import read_split
    from tunebook.prompts import stop_token_ids

    recipe = run.recipe

    started = time.perf_counter()
    timings: dict[str, float] = {}
    merged.mkdir(parents=True)
    ggufs.mkdir(parents=True)
    print(f"merging the adapter into {recipe.model.name} …")
    merge(recipe, adapter, merged)
    write_model_card(run, merged)
    timings["merge_s"] = round(time.perf_counter() - started, 1)
    tokenizer = load_tokenizer(str(merged))
    stops = stop_token_ids(tokenizer, recipe.data.system_prompt)

    files: dict[str, dict] = {}
    f16 = None
    for qtype in recipe.export.gguf:
        print(f"writing GGUF {qtype} …")
        t0 = time.perf_counter()
        out = ggufs / gguf_file(run.name, qtype).name
        if qtype in GGUF_DIRECT_TYPES:
            convert(merged, out, qtype, gguf_model_name(run))
        else:
            if f16 is None:
                f16 = ggufs / gguf_file(run.name, "f16").name
                if not f16.exists():
                    convert(merged, f16, "f16", gguf_model_name(run))
            quantize(f16, out, qtype)
        timings[f"gguf_{qtype}_s"] = round(time.perf_counter() - t0, 1)
        files[qtype] = gguf_summary(out)
        if qtype == "f16":
            f16 = out
    if f16 is not None and "f16" not in recipe.export.gguf:
        f16.unlink()
    default = next((q for q in ("q8_0", "f16") if q in files), next(iter(files), None))
    if default:
        (ggufs / modelfile_path(run.name).name).write_text(
            modelfile(gguf_file(run.name, default).name, tokenizer, recipe.data.system_prompt, 2 * recipe.data.max_length)
        )

    verification: dict[str, Any] = {**(provenance or {}), "checked": {}, "timings": timings, "notes": []}
    hf_shapes = hf_tensor_shapes(merged)
    for qtype, summary in files.items():
        check = {
            "tensor_count_match": summary["tensors"] == len(hf_shapes),
            "shapes_match": summary.pop("shapes") == hf_shapes,
            "chat_template_present": bool(summary["chat_template"]),
            "eos_token_id": summary["eos_token_id"],
            "eos_matches_tokenizer": summary["eos_token_id"] in stops,
            **{k: v for k, v in summary.items() if k != "chat_template"},
        }
        verification["checked"][qtype] = check
        failed = [k for k in ("tensor_count_match", "shapes_match", "chat_template_present", "eos_matches_tokenizer")
                  if not check[k]]
        if failed:
            raise ExportCheckFailed(f"GGUF {qtype} failed its read-back check ({', '.join(failed)}): "
                                    f"{json.dumps(check)}. The previous export was left in place.")

    if verify and files:
        print("checking the GGUF files against the merged model …")
        rows = read_split(recipe.data.test, recipe.source, "data.test")[: recipe.export.verify_prompts]
        system = recipe.data.system_prompt
        max_new = min(recipe.eval.max_new_tokens, 48)
        sequences = hf_greedy(merged, tokenizer, rows, system, max_new)
        for qtype in files:
            llm = load_gguf(ggufs / gguf_file(run.name, qtype).name, n_ctx=2 * recipe.data.max_length,
                            logits_all=True)
            if llm is None:
                verification["runtime"] = "llama-cpp-python not installed: read-back checks only"
                break
            verification["checked"][qtype]["agreement"] = agreement(llm, sequences, stops, max_new)
            del llm
        if "f16" in files and "runtime" not in verification:
            control_check(recipe, ggufs, sequences, stops, max_new, verification, gguf_model_name(run))
        f16_check = verification["checked"].get("f16", {}).get("agreement")
        if f16_check and not f16_check["confident_positions"]:
            verification["notes"].append("no position where the merged model is confident: the f16 agreement "
                                         "check could not tell anything (a random or untrained model?)")
        elif f16_check and f16_check["confident_agreement"] < F16_MIN_CONFIDENT_AGREEMENT:
            raise ExportCheckFailed(f"f16 GGUF disagrees with the merged model where the model is confident: "
                                    f"{f16_check}. The previous export was left in place.")
    if recipe.export.adapter_gguf and files:
        t0 = time.perf_counter()
        adapter_only(run, adapter, ggufs, tokenizer, files, verification, sequences if verify else None, stops)
        timings["adapter_gguf_s"] = round(time.perf_counter() - t0, 1)
    timings["total_s"] = round(time.perf_counter() - started, 1)
    (ggufs / verify_file(run.name).name).write_text(json.dumps(verification, indent=2))
    return verification


# The adapter on the base in llama.cpp must agree with the merged model about as well as the merged GGUF of the
# same type does: LoRA applied at run time in llama.cpp vs folded into the weights before quantisation.
ADAPTER_MAX_AGREEMENT_GAP = 0.05


def adapter_only(run: Run, adapter: Path, ggufs: Path, tokenizer: Any, files: dict[str, dict],
                 verification: dict[str, Any], sequences: list[tuple] | None, stops: list[int]) -> None:
    """The adapter alone as GGUF, the base GGUF it applies to (smallest exported type), `Modelfile.adapter`,
    and (with `sequences`) its agreement with the merged model beside the merged GGUF's."""
    recipe = run.recipe
    base_dir = local_model_dir(recipe.model.name)
    if base_dir is None:
        verification["notes"].append(f"adapter GGUF skipped: {recipe.model.name} has no local copy to read its "
                                     "config from (the merged GGUF files are complete)")
        return
    print("writing the adapter alone as GGUF …")
    out = ggufs / adapter_gguf_file(run.name).name
    convert_lora(adapter, base_dir, out)
    base_type = min(files, key=lambda q: files[q]["size_mb"])
    base = base_gguf(recipe, base_dir, base_type)
    relative = os.path.relpath(base, gguf_dir(run.name))
    max_ctx = 2 * recipe.data.max_length
    (ggufs / modelfile_path(run.name, adapter=True).name).write_text(
        modelfile(relative, tokenizer, recipe.data.system_prompt, max_ctx, adapter_name=out.name))
    record: dict[str, Any] = {"file": out.name, "size_mb": round(out.stat().st_size / 2**20, 1),
                              "base": str(base), "base_type": base_type,
                              "base_size_mb": round(base.stat().st_size / 2**20, 1)}
    verification["adapter"] = record
    if sequences is None:
        return
    llm = load_gguf(base, n_ctx=max_ctx, logits_all=True, lora_path=out)
    if llm is None:
        return
    record["agreement"] = agreement(llm, sequences, stops, min(recipe.eval.max_new_tokens, 48))
    del llm
    merged_check = verification["checked"].get(base_type, {}).get("agreement")
    if merged_check and merged_check["confident_positions"]:
        gap = merged_check["confident_agreement"] - record["agreement"]["confident_agreement"]
        record["merged_same_type_confident_agreement"] = merged_check["confident_agreement"]
        if gap > ADAPTER_MAX_AGREEMENT_GAP:
            raise ExportCheckFailed(f"base {base_type} + adapter in llama.cpp agrees with the merged model on "
                                    f"{record['agreement']['confident_agreement']:.1%} of confident positions, the "
                                    f"merged {base_type} GGUF on {merged_check['confident_agreement']:.1%}. The "
                                    "previous export was left in place.")


def control_check(recipe: Recipe, ggufs: Path, sequences: list[tuple], stops: list[int], max_new: int,
                  verification: dict[str, Any], model_name: str | None = None) -> None:
    """Negative control: the base model without the adapter, converted the same way, should disagree visibly
    more; if it does not, the check could not tell whether the adapter is in the file. Needs the base weights
    on this machine; skipped with a note (never failing a finished export) where they are not."""
    base = local_model_dir(recipe.model.name)
    if base is None:
        verification["notes"].append(f"control skipped: {recipe.model.name} has no local copy (not materialised, "
                                     "not a directory, not in the Hugging Face cache)")
        return
    control = ggufs / ".control-base-f16.gguf"
    try:
        convert(base, control, "f16", model_name)
        llm = load_gguf(control, n_ctx=2 * recipe.data.max_length, logits_all=True)
        verification["control_base_without_adapter"] = agreement(llm, sequences, stops, max_new)
        del llm
    except Exception as exc:  # the control is a diagnostic: its failure must not throw away a checked export
        verification["notes"].append(f"control skipped: {type(exc).__name__}: {str(exc)[:300]}")
    finally:
        control.unlink(missing_ok=True)


def architecture_name(recipe: Recipe) -> str:
    from tunebook.models import architecture_config

    config = architecture_config(recipe.model.name)
    if config is None:
        path = Path(resolve_model_path(recipe.model.name)) / "config.json"
        return json.loads(path.read_text())["architectures"][0] if path.exists() else "unknown"
    return (config.architectures or [type(config).__name__.replace("Config", "ForCausalLM")])[0]


def write_model_card(run: Run, out: Path) -> None:
    from tunebook.reporting import metrics_table

    recipe = run.recipe
    lines = [
        f"# {run.name}", "",
        f"`{recipe.model.name}` fine-tuned with LoRA by [tunebook](../../../README.md) on the `{recipe.task}` task "
        "and merged into the base weights.", "",
        *([f"- data card: `datasets_cards/{recipe.task}.md`"] if Path("datasets_cards", f"{recipe.task}.md").exists()
          else []),
        f"- train split: `{recipe.data.train}`",
        f"- prompt format: the base model's chat template; system prompt: {recipe.data.system_prompt!r}", "",
    ]
    report = report_dir(run.name) / "report.json"
    if report.exists():
        lines += ["## Evaluation (base vs fine-tuned)", "", metrics_table(json.loads(report.read_text())), ""]
    lines += ["## Recipe", "", "```yaml", json.dumps(recipe.to_dict(), indent=2), "```", ""]
    (out / "README.md").write_text("\n".join(lines))
