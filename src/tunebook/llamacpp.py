"""Running GGUF files with llama.cpp (llama-cpp-python): export's checks and `tunebook eval --gguf` share it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def load_gguf(path: Path, n_ctx: int, logits_all: bool = False, lora_path: Path | None = None,
              **extra: Any) -> Any:
    """A llama.cpp model, or None without llama-cpp-python.

    Extra buffer types are off: on some VMs the CPU advertises AMX but faults in it (crashes on quantised GGUFs);
    the plain CPU path is safe. `logits_all` keeps every position's logits (the export's agreement check needs
    them; generation does not). `lora_path` applies a LoRA adapter GGUF to the model at load time; `extra` goes
    to `llama_cpp.Llama` as it is (e.g. `tokenizer`).
    """
    try:
        import llama_cpp
    except ImportError:
        return None
    from tunebook.console import native_output_to_log

    kwargs = dict(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False, n_threads=os.cpu_count(),
                  **({"lora_path": str(lora_path)} if lora_path else {}), **extra)
    # `verbose=False` does not reach everything: loading an adapter logs a line per tensor from C.
    with native_output_to_log():
        try:
            return llama_cpp.Llama(use_extra_bufts=False, **kwargs)
        except TypeError:  # older llama-cpp-python without that switch
            return llama_cpp.Llama(**kwargs)


def greedy_ids(llm: Any, prompt: list[int], stops: list[int], max_new_tokens: int) -> list[int]:
    """llama.cpp's greedy answer to one tokenised prompt, through the first stop token.

    llama-cpp-python keeps the KV cache of the previous prompt and reuses its longest common prefix, so callers
    that feed prompts sorted by their tokens (questions on one schema together) skip most of the prefill.
    """
    answer: list[int] = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        answer.append(token)
        if token in stops or len(answer) >= max_new_tokens:
            break
    return answer


def generate_ids(llm: Any, prompts: list[list[int]], stops: list[int], max_new_tokens: int,
                 progress: Any = None, on_batch: Any = None) -> list[list[int]]:
    """Greedy answers for many prompts, in the input order (run in token order to share cached prefixes).

    `on_batch([i], [answer ids])` gets each answer as soon as it exists.
    """
    answers: list[list[int]] = [[] for _ in prompts]
    for i in sorted(range(len(prompts)), key=lambda i: prompts[i]):
        answers[i] = greedy_ids(llm, prompts[i], stops, max_new_tokens)
        if on_batch is not None:
            on_batch([i], [answers[i]])
        if progress is not None:
            progress(1)
    return answers
