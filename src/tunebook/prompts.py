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

import functools
from typing import Any

PLAIN_USER = "### Instruction:\n{content}\n\n### Response:\n"
PLAIN_SYSTEM = "{content}\n\n"
ROLES = ("system", "user", "assistant")


def is_chat(example: dict[str, Any]) -> bool:
    """Whether a row is a `{"messages": [...]}` conversation rather than an instruction row."""
    return "messages" in example


def is_preference(example: dict[str, Any]) -> bool:
    """Whether a row is a preference pair in TRL's format: `prompt`, `chosen`, `rejected`."""
    return "chosen" in example and "rejected" in example


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


SYSTEM_PROBE, USER_PROBE, ANSWER_PROBE = "SYSTEM_PROBE_1", "USER_PROBE_1", "ANSWER_PROBE_1"


def system_handling(tokenizer: Any) -> str:
    """What the tokenizer's chat template does with a system turn: `kept` where it is written (SmolLM2, Llama-3),
    `dropped` (Phi-3-mini's template has no system role: it writes nothing for it), or `moved` (Mistral's writes
    it into the last user turn)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return "kept"
    return _system_handling(tokenizer, template)


@functools.lru_cache(maxsize=16)
def _system_handling(tokenizer: Any, template: str) -> str:
    system = {"role": "system", "content": SYSTEM_PROBE}
    one = tokenizer.apply_chat_template([system, {"role": "user", "content": USER_PROBE}], tokenize=False,
                                        add_generation_prompt=True)
    if SYSTEM_PROBE not in one:
        return "dropped"
    two = tokenizer.apply_chat_template([system, {"role": "user", "content": USER_PROBE},
                                         {"role": "assistant", "content": ANSWER_PROBE},
                                         {"role": "user", "content": "USER_PROBE_2"}], tokenize=False,
                                        add_generation_prompt=True)
    return "moved" if two.find(SYSTEM_PROBE) > two.find(ANSWER_PROBE) else "kept"


def for_template(tokenizer: Any, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation as this template can write it: where the template drops system turns (Phi-3-mini), the
    system prompt opens the first user turn instead ("system\n\nuser"), so it is never silently lost."""
    if not messages or messages[0]["role"] != "system" or system_handling(tokenizer) != "dropped":
        return messages
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    first_user = next((m for m in rest if m["role"] == "user"), None)
    if first_user is not None:
        first_user["content"] = f"{system}\n\n{first_user['content']}"
    return rest


# Put in front of a template that drops system turns (exported with the model): the system prompt opens the first
# user turn, as `for_template` does in training, so a client of the GGUF's own template gets the trained prompt.
FOLD_SYSTEM = ("{%- if messages and messages[0]['role'] == 'system' and messages | length > 1 -%}"
               "{%- set messages = [{'role': messages[1]['role'], 'content': messages[0]['content'] + '\\n\\n' + "
               "messages[1]['content']}] + messages[2:] -%}{%- endif -%}")


def template_as_trained(tokenizer: Any) -> str | None:
    """The chat template that writes conversations exactly as tunebook trains on them (for the exported model)."""
    template = getattr(tokenizer, "chat_template", None)
    if template and system_handling(tokenizer) == "dropped":
        return FOLD_SYSTEM + template
    return template


def render_messages(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """A conversation as text: the model's chat template, or the plain format where it has none."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(for_template(tokenizer, messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    parts = []
    for message in messages:
        if message["role"] == "assistant":
            parts.append(message["content"] + tokenizer.eos_token + "\n\n")
        else:
            parts.append((PLAIN_USER if message["role"] == "user" else PLAIN_SYSTEM).format(content=message["content"]))
    return "".join(parts)


def trains_last_turn_only(tokenizer: Any, messages: list[dict[str, str]]) -> bool:
    """Whether only the last answer of this conversation can be trained: a template that moves the system prompt
    into the last user turn (Mistral-7B-Instruct-v0.3) writes it only while a user turn is last, so a whole
    conversation renders without it and every earlier answer follows a prompt the model is never asked."""
    return bool(messages) and messages[0]["role"] == "system" and system_handling(tokenizer) == "moved"


def turn_segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The conversation as (text, trained) pieces: each assistant turn through its end-of-turn marker is trained.

    Rendered prefix by prefix with the template itself, so whatever the template writes around a turn is kept
    exactly. Where the template moves the system prompt (`trains_last_turn_only`), the conversation is written as
    the template writes it whole, and only its last answer is trained. A template that rewrites earlier turns in
    any other way (so a prefix is not a prefix) is refused.
    """
    if trains_last_turn_only(tokenizer, messages):
        # The prompt as inference writes it (system prompt in the last user turn), then the answer as the template
        # writes an answer (measured without the system turn, which the template would otherwise drop).
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = render_messages(tokenizer, messages[:last], add_generation_prompt=True)
        plain = messages[1:]
        bare_prompt = render_messages(tokenizer, plain[: last - 1], add_generation_prompt=True)
        bare_full = render_messages(tokenizer, plain[:last])
        if not bare_full.startswith(bare_prompt):
            raise ValueError("The tokenizer's chat template does not write an answer after its own generation prompt.")
        return [(prompt, False), (_answer_text(tokenizer, bare_full[len(bare_prompt):], messages[last]), True)]
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
        answer = _answer_text(tokenizer, full[len(prompt):], message)
        segments += [(prompt[len(done):], False), (answer, True)]
        done = prompt + answer
    return segments


def _answer_text(tokenizer: Any, written: str, message: dict[str, str]) -> str:
    """What the template wrote for one answer, through its end-of-turn marker (EOS added where it writes none)."""
    answer = written.rstrip()
    if not any(stop in answer[len(message["content"].rstrip()):] for stop in end_markers(tokenizer)):
        answer += tokenizer.eos_token  # a template that writes no end marker: train EOS so the model stops
    return answer


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


def earlier_answer_labels(tokenizer: Any, segments: list[tuple[str, bool]], prompt_ids: list[int]) -> list[int]:
    """Labels for the prompt before the last answer: its earlier answers (and their end-of-turn markers) trained.

    The prompt is tokenized whole, exactly as `encode_prompt` feeds it at inference; which of its tokens belong to
    an answer is read from the tokenizer's character offsets. (Tokenizing the turns one by one would not give the
    same ids: Phi-3's special tokens swallow the newline after them only when it follows them in one string.)
    """
    text = "".join(piece for piece, _ in segments)
    trained, start = [], 0
    for piece, is_answer in segments:
        if is_answer:
            trained.append((start, start + len(piece)))
        start += len(piece)
    encoded = tokenizer(text, add_special_tokens=not has_chat_template(tokenizer), return_offsets_mapping=True)
    if encoded["input_ids"] != prompt_ids:
        raise ValueError("The chat template's turns do not add up to the prompt it writes for the last answer.")
    return [token if any(a <= begin < b for a, b in trained) else -100
            for token, (begin, _) in zip(prompt_ids, encoded["offset_mapping"], strict=True)]


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
    labels = [-100] * len(input_ids)
    if all_turns and len(segments) > 2:
        labels = earlier_answer_labels(tokenizer, segments[:-1], input_ids)
    completion_ids = tokenizer(segments[-1][0], add_special_tokens=False)["input_ids"]
    input_ids = input_ids + completion_ids
    if max_length is not None and len(input_ids) > max_length:
        return None
    return {"input_ids": input_ids, "labels": labels + completion_ids}


def special_markers(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens as text (`<|im_end|>`, `<|eot_id|>` …), longest first."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    markers = set(tokenizer.all_special_tokens) | {t.content for t in added.values() if getattr(t, "special", False)}
    return sorted((m for m in markers if m), key=len, reverse=True)


def text_fields(example: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, text) of every text a row gives the model: instruction/input/output, each turn's content, or a
    preference row's prompt and answers."""
    if is_chat(example):
        return [(f"messages[{i}].content", m.get("content") or "") for i, m in enumerate(example["messages"])]
    out = []
    for key in ("instruction", "input", "output", "prompt", "chosen", "rejected"):
        value = example.get(key)
        if isinstance(value, str):
            out.append((key, value))
        elif isinstance(value, list):
            out += [(f"{key}[{i}].content", str(m.get("content") or "")) for i, m in enumerate(value)
                    if isinstance(m, dict)]
    return out

