"""The one place an example becomes text and tokens.

Training, evaluation, the Gradio app and the exported Modelfile all go through these functions, so the
prompt a model is trained on is byte for byte the prompt it is asked at inference, and it stops where it
learned to stop.

Instruct models (those whose tokenizer carries a chat template) see instruction + input as the user turn and
the output as the assistant turn, rendered by the model's own template. Models without a template use the
`### Instruction / ### Input / ### Response` format below, ended by the EOS token.
"""

from __future__ import annotations

from typing import Any

PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PLAIN_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def user_message(example: dict[str, Any]) -> str:
    """The user turn: the instruction, then the input (if any) after a blank line."""
    instruction = example["instruction"].strip()
    extra = (example.get("input") or "").strip()
    return f"{instruction}\n\n{extra}" if extra else instruction


def chat_messages(example: dict[str, Any], system_prompt: str | None = None) -> list[dict[str, str]]:
    """The conversation up to (not including) the assistant's answer."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": user_message(example)})
    return messages


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, example: dict[str, Any], system_prompt: str | None = None) -> str:
    """The text the model sees before it answers (ends with the assistant header)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            chat_messages(example, system_prompt), tokenize=False, add_generation_prompt=True
        )
    extra = (example.get("input") or "").strip()
    template = PLAIN_PROMPT if extra else PLAIN_PROMPT_NO_INPUT
    return template.format(instruction=example["instruction"].strip(), input=extra)


def render_completion(tokenizer: Any, example: dict[str, Any], system_prompt: str | None = None) -> str:
    """The answer as the template writes it, through its end-of-turn marker (the tokens trained with loss).

    For a chat template this is what the full conversation adds after the generation prompt, so whatever
    closes an assistant turn (`<|im_end|>`, `<|eot_id|>`, `<|end|>`, `</s>`) is trained exactly as the
    template writes it. Trailing whitespace after the marker is dropped: generation stops at the marker.
    """
    answer = example["output"]
    if not has_chat_template(tokenizer):
        return answer + tokenizer.eos_token
    prompt = render_prompt(tokenizer, example, system_prompt)
    full = tokenizer.apply_chat_template(
        [*chat_messages(example, system_prompt), {"role": "assistant", "content": answer}], tokenize=False
    )
    if not full.startswith(prompt):
        raise ValueError(
            "The tokenizer's chat template renders a conversation that does not start with its own generation "
            "prompt, so training and inference prompts would differ. Use a tokenizer with a consistent template."
        )
    completion = full[len(prompt):].rstrip()
    if not any(stop in completion[len(answer.rstrip()):] for stop in end_markers(tokenizer)):
        completion += tokenizer.eos_token  # a template that writes no end marker: train EOS so the model stops
    return completion


def end_markers(tokenizer: Any) -> list[str]:
    """Special tokens that can close a turn (EOS and the template's end-of-turn tokens)."""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    specials |= {str(t) for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values()}
    return sorted(s for s in specials if s) + ([tokenizer.eos_token] if tokenizer.eos_token else [])


def stop_strings(tokenizer: Any, system_prompt: str | None = None) -> list[str]:
    """The token strings that end the assistant's turn, in the order the template writes them.

    Derived by rendering a probe answer, so it is always the marker the model was trained to emit; EOS is
    always included. Generation, the app and the Modelfile's `PARAMETER stop` all use this list.
    """
    probe = {"instruction": "probe", "input": "", "output": "PROBE_ANSWER"}
    tail = render_completion(tokenizer, probe, system_prompt).split("PROBE_ANSWER", 1)[1]
    found = sorted({m for m in end_markers(tokenizer) if m in tail}, key=tail.find)
    if tokenizer.eos_token and tokenizer.eos_token not in found:
        found.append(tokenizer.eos_token)
    return found


def stop_token_ids(tokenizer: Any, system_prompt: str | None = None) -> list[int]:
    """Token ids for `generate(eos_token_id=...)`."""
    ids = []
    for marker in stop_strings(tokenizer, system_prompt):
        token_id = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


def encode_prompt(tokenizer: Any, example: dict[str, Any], system_prompt: str | None = None) -> list[int]:
    """Prompt token ids, exactly as in training (a chat template writes its own BOS)."""
    return tokenizer(
        render_prompt(tokenizer, example, system_prompt), add_special_tokens=not has_chat_template(tokenizer)
    )["input_ids"]


def encode_example(
    tokenizer: Any, example: dict[str, Any], system_prompt: str | None = None, max_length: int | None = None
) -> dict[str, list[int]] | None:
    """Training tokens and labels: loss on the answer and its end-of-turn marker only (-100 elsewhere).

    Returns None when prompt + answer exceed `max_length`: truncating would silently cut the answer or the
    schema, so the caller drops the example and reports how many it dropped.
    """
    prompt_ids = encode_prompt(tokenizer, example, system_prompt)
    completion_ids = tokenizer(render_completion(tokenizer, example, system_prompt), add_special_tokens=False)[
        "input_ids"
    ]
    input_ids = prompt_ids + completion_ids
    if max_length is not None and len(input_ids) > max_length:
        return None
    return {"input_ids": input_ids, "labels": [-100] * len(prompt_ids) + completion_ids}
