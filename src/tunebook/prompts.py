"""The one place an example becomes text and tokens.

Training, evaluation, the Gradio app and the exported Modelfile all go through these functions, so the
prompt a model is trained on is byte for byte the prompt it is asked at inference, and it stops where it
learned to stop.

An example is either an `{"instruction", "input", "output"}` row or a `{"messages": [...]}` conversation
(system/user/assistant turns, OpenAI style, ending with an assistant turn). Both become one conversation
(`conversation`): an instruction row is one user turn (instruction, then the input after a blank line) and one
assistant turn. Instruct models (those whose tokenizer carries a chat template) render it with their own
template; models without a template use the `### Instruction / ### Response` format below, each answer ended by
the EOS token. The prompt is the conversation before its last assistant turn; the answer is that turn. Training
puts loss on every assistant turn and its end-of-turn marker; evaluation generates the last one.
"""

from __future__ import annotations

from typing import Any

PLAIN_USER = "### Instruction:\n{content}\n\n### Response:\n"
PLAIN_SYSTEM = "{content}\n\n"
ROLES = ("system", "user", "assistant")


def is_chat(example: dict[str, Any]) -> bool:
    """Whether a row is a `{"messages": [...]}` conversation rather than an instruction row."""
    return "messages" in example


def user_message(example: dict[str, Any]) -> str:
    """The last user turn: for an instruction row, the instruction, then the input (if any) after a blank line."""
    if is_chat(example):
        return next(m["content"] for m in reversed(example["messages"]) if m["role"] == "user")
    instruction = example["instruction"].strip()
    extra = (example.get("input") or "").strip()
    return f"{instruction}\n\n{extra}" if extra else instruction


def reference_answer(example: dict[str, Any]) -> str:
    """The answer a model is scored against: the last assistant turn (an instruction row's `output`)."""
    return example["messages"][-1]["content"] if is_chat(example) else example["output"]


def conversation(example: dict[str, Any], system_prompt: str | None = None) -> list[dict[str, str]]:
    """The whole conversation, answer included; `system_prompt` opens it unless it has a system turn already."""
    if is_chat(example):
        messages = [{"role": m["role"], "content": m["content"]} for m in example["messages"]]
    else:
        messages = [{"role": "user", "content": user_message(example)}]
        if example.get("output") is not None:
            messages.append({"role": "assistant", "content": example["output"]})
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def chat_messages(example: dict[str, Any], system_prompt: str | None = None) -> list[dict[str, str]]:
    """The conversation up to (not including) the answer: what the model sees before it answers.

    An example without an answer (a question asked in the app, a Modelfile probe) is all prompt.
    """
    messages = conversation(example, system_prompt)
    return messages[:-1] if messages[-1]["role"] == "assistant" else messages


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, example: dict[str, Any], system_prompt: str | None = None) -> str:
    """The text the model sees before it answers (ends with the assistant header)."""
    return render_messages(tokenizer, chat_messages(example, system_prompt), add_generation_prompt=True)


def render_messages(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """A conversation as text: the model's chat template, or the plain format where it has none."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    parts = []
    for message in messages:
        if message["role"] == "assistant":
            parts.append(message["content"] + tokenizer.eos_token + "\n\n")
        else:
            parts.append((PLAIN_USER if message["role"] == "user" else PLAIN_SYSTEM).format(content=message["content"]))
    return "".join(parts)


def turn_segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The conversation as (text, trained) pieces: each assistant turn through its end-of-turn marker is trained.

    Rendered prefix by prefix with the template itself, so whatever the template writes around a turn is kept
    exactly; a template that rewrites earlier turns (so a prefix is not a prefix) is refused.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_messages(tokenizer, messages[:i], add_generation_prompt=True)
        full = render_messages(tokenizer, messages[: i + 1])
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(
                "The tokenizer's chat template renders a conversation that does not start with its own generation "
                "prompt, so training and inference prompts would differ. Use a tokenizer with a consistent template."
            )
        answer = full[len(prompt):].rstrip()
        if not any(stop in answer[len(message["content"].rstrip()):] for stop in end_markers(tokenizer)):
            answer += tokenizer.eos_token  # a template that writes no end marker: train EOS so the model stops
        segments += [(prompt[len(done):], False), (answer, True)]
        done = prompt + answer
    return segments


def render_completion(tokenizer: Any, example: dict[str, Any], system_prompt: str | None = None) -> str:
    """The answer as the template writes it, through its end-of-turn marker (the tokens trained with loss).

    For a chat template this is what the full conversation adds after the generation prompt, so whatever
    closes an assistant turn (`<|im_end|>`, `<|eot_id|>`, `<|end|>`, `</s>`) is trained exactly as the
    template writes it. Trailing whitespace after the marker is dropped: generation stops at the marker.
    """
    return turn_segments(tokenizer, conversation(example, system_prompt))[-1][0]


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
    tokenizer: Any, example: dict[str, Any], system_prompt: str | None = None, max_length: int | None = None,
    all_turns: bool = True,
) -> dict[str, list[int]] | None:
    """Training tokens and labels: loss on the assistant turns and their end-of-turn markers only (-100 elsewhere).

    `all_turns=False` trains (scores) the last answer only, as perplexity on the reference does. The prompt
    before the last answer is tokenized as `encode_prompt` does, so these ids are the ones evaluation feeds.
    Returns None when the whole exceeds `max_length`: truncating would silently cut the answer or the schema, so
    the caller drops the example and reports how many it dropped.
    """
    segments = turn_segments(tokenizer, conversation(example, system_prompt))
    input_ids = encode_prompt(tokenizer, example, system_prompt)
    last_prompt_len = len(input_ids)
    labels = [-100] * last_prompt_len
    if all_turns and len(segments) > 2:
        input_ids, labels = [], []
        for n, (text, trained) in enumerate(segments[:-1]):
            ids = tokenizer(text, add_special_tokens=n == 0 and not has_chat_template(tokenizer))["input_ids"]
            input_ids += ids
            labels += ids if trained else [-100] * len(ids)
    completion_ids = tokenizer(segments[-1][0], add_special_tokens=False)["input_ids"]
    input_ids = input_ids + completion_ids
    if max_length is not None and len(input_ids) > max_length:
        return None
    return {"input_ids": input_ids, "labels": labels + completion_ids}
