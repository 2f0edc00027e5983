"""`tunebook serve`: an OpenAI-compatible HTTP endpoint over a run's exported GGUF.

The server is llama-cpp-python's own (`llama_cpp.server`: FastAPI, `/v1/chat/completions`, `/v1/completions`,
`/v1/models`, streaming, OpenAI-style errors). tunebook adds what makes it answer as the report scored:

- the prompt is built by tunebook's prompt module from the trained tokenizer (chat template as trained, the
  recipe's system prompt unless the request sends one) and handed to llama.cpp as token ids, and answers are
  decoded by the same tokenizer, so temperature 0 gives `tunebook eval --gguf`'s answers token for token;
- `repeat_penalty` is 1.0 (llama.cpp's server would add 1.1, which is not an OpenAI parameter and would make
  greedy answers differ from the evaluated ones); OpenAI's `frequency_penalty`/`presence_penalty` still work;
- a request for a model the server does not serve gets a 404 `model_not_found` (llama.cpp's server would
  silently answer with its default model);
- with `adapter=True` every recipe is served from one base GGUF in memory with its LoRA adapter GGUF; a request
  switches adapters (llama.cpp keeps all of them loaded, a few MB each) instead of reloading a model.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunebook.config import Recipe
from tunebook.errors import RecipeError
from tunebook.exported import adapter_gguf, gguf_files, smallest_verified
from tunebook.outputs import merged_dir
from tunebook.runs import Run, identify

DEFAULT_PORT = 8000


@dataclass
class Served:
    """One model the server answers for: the run, its files, and the tokenizer it was trained with."""

    run: Run
    gguf: Path  # the merged GGUF, or the base GGUF when `adapter` is set
    adapter: Path | None
    qtype: str
    tokenizer: Any
    n_ctx: int

    @property
    def name(self) -> str:
        return self.run.name


def served_models(recipes: list[Recipe], qtype: str | None = None, adapter: bool = False) -> list[Served]:
    """Each recipe's exported file, checked (exists, from this run's adapter, not older, loads in llama.cpp)."""
    from tunebook.models import load_tokenizer

    served = []
    for recipe in recipes:
        run = identify(recipe)
        if adapter:
            base, lora = adapter_gguf(run, run.adapter_dir)
            chosen, path = base.stem.rsplit("-", 1)[-1], base
        else:
            chosen = qtype or smallest_verified(run)
            if chosen is None:
                raise RecipeError(recipe.source, None, "the recipe has no exported GGUF.",
                                  f"Run `tunebook export {run.command}` first (or `make export RECIPE={run.name}`).")
            path, lora = gguf_files(run, [chosen], run.adapter_dir, flag="--gguf", use="serve")[chosen], None
        tokenizer = load_tokenizer(str(merged_dir(run.name)), recipe.model.trust_remote_code)
        served.append(Served(run, path, lora, chosen, tokenizer, n_ctx=2 * recipe.data.max_length))
    names = [s.name for s in served]
    if len(set(names)) != len(names):
        raise RecipeError("tunebook serve", None, "a recipe is named twice.", "Name each recipe once.")
    if adapter and len({s.gguf for s in served}) > 1:
        raise RecipeError("tunebook serve", "--adapter", "these recipes do not share one base GGUF "
                          f"({', '.join(f'{s.name}: {s.gguf.name}' for s in served)}).",
                          "Serve recipes of one base model together, or leave out --adapter.")
    return served


def message_text(content: Any) -> str:
    """An OpenAI message's content as text (a string, or a list of parts of which the text ones count)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "" if content is None else str(content)


def prompt_ids(model: Served, messages: list[dict[str, Any]]) -> list[int]:
    """The request's conversation as the token ids the model was trained and evaluated on."""
    from tunebook.prompts import encode_prompt

    turns = [{"role": m["role"], "content": message_text(m.get("content"))} for m in messages
             if m.get("role") in ("system", "user", "assistant")]
    if not turns or turns[-1]["role"] == "assistant":
        raise ValueError("the conversation must end with a user message")
    return encode_prompt(model.tokenizer, {"messages": turns}, model.run.recipe.data.system_prompt)


def chat_handler(model: Served) -> Any:
    """A llama-cpp-python chat handler that builds the prompt with tunebook's prompt module."""
    from llama_cpp.llama_chat_format import _convert_completion_to_chat

    from tunebook.prompts import stop_strings

    trained_stops = stop_strings(model.tokenizer, model.run.recipe.data.system_prompt)

    def handle(*, llama: Any, messages: list[dict[str, Any]], stop: Any = None, tools: Any = None,
               functions: Any = None, response_format: Any = None, repeat_penalty: float = 1.0,
               logprobs: bool | None = None, top_logprobs: int | None = None, **kwargs: Any) -> Any:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        kwargs = {k: v for k, v in kwargs.items() if k in COMPLETION_KEYS}
        completion = llama.create_completion(prompt=prompt_ids(model, messages), stop=stops + trained_stops,
                                             repeat_penalty=1.0, logprobs=top_logprobs if logprobs else None,
                                             **kwargs)
        return _convert_completion_to_chat(completion, stream=bool(kwargs.get("stream")))

    return handle


# What a chat request may pass on to llama.cpp's completion (the rest is the chat layer's business).
COMPLETION_KEYS = {"temperature", "top_p", "top_k", "min_p", "typical_p", "stream", "seed", "max_tokens",
                   "presence_penalty", "frequency_penalty", "tfs_z", "mirostat_mode", "mirostat_tau",
                   "mirostat_eta", "model", "logits_processor", "grammar", "logit_bias"}


def streaming_tokenizer(tokenizer: Any) -> Any:
    """llama-cpp-python's wrapper of a transformers tokenizer, fixed for streaming. Its `detokenize(tokens,
    prev_tokens)` decodes both as text and cuts by byte length; a token that ends inside a character (an emoji,
    `ü`, a CJK character are several tokens) decodes to U+FFFD, three bytes that are not the character's, so the
    cut lands wrong and streamed answers showed `�` where the whole answer was right. Here a text that ends in
    U+FFFD is held back until the character is complete."""
    from llama_cpp.llama_tokenizer import LlamaHFTokenizer

    class Streaming(LlamaHFTokenizer):
        def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False) -> bytes:
            if prev_tokens is None:
                return super().detokenize(tokens, None, special)

            def text(ids: list[int]) -> str:
                return self.hf_tokenizer.decode(ids, skip_special_tokens=not special).rstrip("\ufffd")

            whole, before = text(prev_tokens + tokens), text(prev_tokens)
            return whole[len(before):].encode("utf-8") if whole.startswith(before) else b""

    return Streaming(tokenizer)


def load_llama(model: Served, lora: Path | None = None) -> Any:
    """llama.cpp over the model's GGUF, with the trained tokenizer for text in and out."""
    from tunebook import llamacpp

    return llamacpp.load_gguf(model.gguf, n_ctx=model.n_ctx, lora_path=lora,
                              tokenizer=streaming_tokenizer(model.tokenizer))


class Models:
    """What llama-cpp-python's server calls to get the model for a request (its `LlamaProxy` interface).

    Merged GGUFs: one model in memory at a time; a request for another loads it (the previous one is closed).
    Adapters: one base in memory, every adapter loaded beside it; a request sets its adapter as the only one.
    """

    def __init__(self, served: list[Served], adapters: bool) -> None:
        self.served = {s.name: s for s in served}
        self.default = served[0].name
        self.adapters = adapters
        self.current: str | None = None
        self.llama: Any = None
        self.loras: dict[str, Any] = {}
        if adapters:
            self.llama = load_llama(served[0])
            self.loras = {s.name: self._init_lora(s.adapter) for s in served}
        self.select(self.default)

    def _init_lora(self, path: Path | None) -> Any:
        import llama_cpp

        from tunebook.console import native_output_to_log

        with native_output_to_log():  # a line per tensor from C
            handle = llama_cpp.llama_adapter_lora_init(self.llama._model.model, str(path).encode())
        if handle is None:
            raise RecipeError(str(path), None, "llama.cpp cannot load this adapter.", "Run `tunebook export` again.")
        self.llama._stack.callback(llama_cpp.llama_adapter_lora_free, handle)
        return handle

    def select(self, name: str) -> Any:
        import ctypes

        import llama_cpp

        if name == self.current:
            return self.llama
        model = self.served[name]
        if self.adapters:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.loras[name])
            scales = (ctypes.c_float * 1)(1.0)
            if llama_cpp.llama_set_adapters_lora(self.llama._ctx.ctx, adapters, 1, scales):
                raise RuntimeError(f"llama.cpp could not switch to the adapter of {name}")
            self.llama.reset()  # the cached prefix was computed with another adapter
            self.llama._ctx.kv_cache_clear()
        else:
            if self.llama is not None:
                self.llama.close()
            self.llama, self.current = None, None  # a load that fails must not leave the old name on no model
            self.llama = load_llama(model)
        self.llama.chat_handler = chat_handler(model)
        self.current = name
        return self.llama

    def __call__(self, model: str | None = None) -> Any:
        from fastapi import HTTPException

        name = model or self.default
        if name not in self.served:
            raise HTTPException(status_code=404, detail=unknown_model(name, list(self.served)))
        return self.select(name)

    def __iter__(self):
        return iter(self.served)

    def __getitem__(self, name: str) -> dict[str, Any]:
        return {"model": str(self.served[name].gguf), "model_alias": name}

    def free(self) -> None:
        if self.llama is not None:
            self.llama.close()
        self.llama = None


def create_app(served: list[Served], adapters: bool = False) -> Any:
    """llama-cpp-python's FastAPI app, answering with tunebook's models."""
    from fastapi import HTTPException, Request
    from fastapi.responses import JSONResponse
    from llama_cpp.server import app as server_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    settings = [ModelSettings(model=str(s.gguf), model_alias=s.name, n_ctx=s.n_ctx, verbose=False) for s in served]
    # create_app loads its own model from the settings; build it over the first file, then swap in ours.
    original = server_app.LlamaProxy
    server_app.LlamaProxy = _Deferred
    try:
        # llama.cpp's server cuts off a stream in progress when any other request arrives (`interrupt_requests`,
        # on by default): two users, or a UI polling /v1/models, would get half answers. Requests queue instead.
        app = server_app.create_app(server_settings=ServerSettings(interrupt_requests=False), model_settings=settings)
    finally:
        server_app.LlamaProxy = original
    server_app._llama_proxy = Models(served, adapters)

    @app.exception_handler(HTTPException)
    async def openai_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail),
                                                                   "type": "invalid_request_error"}
        return JSONResponse({"error": detail}, status_code=exc.status_code)

    by_name = {s.name: s for s in served}

    @app.middleware("http")
    async def check_body(request: Request, call_next: Any) -> Any:
        # llama.cpp's error handler re-reads a body that failed to parse and crashes with a 500; OpenAI answers
        # a body that is not JSON, or not a valid request, with a 400 invalid_request_error.
        request_type = REQUEST_TYPES.get(request.url.path) if request.method == "POST" else None
        if request_type is not None:
            body = await request.body()
            problem = body_problem(body, request_type())
            if problem:
                return JSONResponse({"error": {"message": problem, "type": "invalid_request_error",
                                               "param": None, "code": None}}, status_code=400)
            data = json.loads(body)
            if data.get("max_completion_tokens") is not None:  # OpenAI's newer name, which llama.cpp's server drops
                data["max_tokens"] = data.pop("max_completion_tokens")
                request._body = json.dumps(data).encode()  # what Starlette hands the route (its cached body)
            refused = served_problem(data, by_name, served[0].name)
            if refused:
                return JSONResponse({"error": refused[1]}, status_code=refused[0])
        return await call_next(request)

    return app


def _chat_request() -> Any:
    from llama_cpp.server.types import CreateChatCompletionRequest

    return CreateChatCompletionRequest


def _completion_request() -> Any:
    from llama_cpp.server.types import CreateCompletionRequest

    return CreateCompletionRequest


REQUEST_TYPES = {"/v1/chat/completions": _chat_request, "/v1/completions": _completion_request}


def body_problem(body: bytes, request_type: Any) -> str | None:
    """Why a request body is not a valid request, in OpenAI's words, or None."""
    import pydantic

    try:
        data = json.loads(body)
    except ValueError:
        return ("We could not parse the JSON body of your request. The API expects a JSON payload, but what "
                "was sent was not valid JSON.")
    if not isinstance(data, dict):
        return "The request body must be a JSON object."
    try:
        request = request_type(**data)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        return f"Invalid request: '{where}': {first.get('msg', 'invalid value')}."
    problem = sampling_problem(data)
    if problem is None and hasattr(request, "messages"):
        return chat_problem(data)
    return problem


def sampling_problem(data: dict[str, Any]) -> str | None:
    """Settings outside OpenAI's ranges, which llama.cpp would take as something else (a max_tokens of 0 as
    "unlimited", a negative temperature as sampling from the unfiltered distribution), or None."""
    limits = {key: data.get(key) for key in ("max_tokens", "max_completion_tokens")}
    for key, limit in limits.items():
        if isinstance(limit, int | float) and not isinstance(limit, bool) and limit < 1:
            return f"Invalid request: '{key}': {limit} is less than the minimum of 1."
        if limit is not None and not isinstance(limit, int):
            return f"Invalid request: '{key}': {limit!r} is not an integer."
    if None not in limits.values() and len(set(limits.values())) > 1:
        return "Invalid request: 'max_completion_tokens' and 'max_tokens' differ; give one of them."
    temperature = data.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool) and not 0 <= temperature <= 2:
        return f"Invalid request: 'temperature': {temperature} is not between 0 and 2."
    if data.get("n") not in (None, 1):
        return "Invalid request: 'n': this server returns one choice per request; use n = 1."
    if data.get("logprobs") or data.get("top_logprobs"):  # llama.cpp would answer 500, or silently null
        return "Invalid request: 'logprobs': this server does not return log probabilities."
    return None


def chat_problem(data: dict[str, Any]) -> str | None:
    """What this server cannot answer in a well-formed chat request, or None."""
    messages = data.get("messages") or []
    roles = [m.get("role") for m in messages if isinstance(m, dict)]
    if not roles or roles[-1] != "user":
        return "Invalid request: 'messages' must end with a message whose role is 'user'."
    turns = roles[1:] if roles[0] == "system" else roles
    if any(role != ("user", "assistant")[i % 2] for i, role in enumerate(turns)):
        return ("Invalid request: 'messages': after an optional first system message, roles must alternate user, "
                "assistant, user … (as the model was trained; some chat templates refuse anything else).")
    if data.get("tools") or data.get("functions"):
        return "Invalid request: 'tools': this model was fine-tuned without tools, so tools are not supported."
    if (data.get("response_format") or {}).get("type") not in (None, "text"):
        return "Invalid request: 'response_format': only type 'text' is supported."
    return None


def unknown_model(name: str, served: list[str]) -> dict[str, Any]:
    """OpenAI's error for a model this server does not serve."""
    return {"message": f"The model '{name}' does not exist; this server serves {', '.join(served)}.",
            "type": "invalid_request_error", "param": "model", "code": "model_not_found"}


def served_problem(data: dict[str, Any], served: dict[str, Served], default: str) -> tuple[int, dict] | None:
    """(status, OpenAI error) for a request naming a model not served here or a prompt the context cannot hold,
    or None. llama.cpp's server finds both only once a stream has begun, and a streaming client then got an HTTP
    200 and an empty stream; checked here before any answer starts, streamed or not, the two get the same error."""
    name = data.get("model") or default
    model = served.get(name)
    if model is None:
        return 404, unknown_model(name, list(served))
    if "messages" in data:
        length, param = len(prompt_ids(model, data["messages"])), "messages"
    elif isinstance(data.get("prompt"), str):  # as llama.cpp tokenizes it, through the trained tokenizer
        length, param = len(model.tokenizer.encode(data["prompt"], add_special_tokens=True)), "prompt"
    else:
        return None
    if length < model.n_ctx:
        return None
    return 400, {"message": f"This model's maximum context length is {model.n_ctx} tokens. However, your "
                            f"{param} resulted in {length} tokens. Please reduce the length of the {param}.",
                 "type": "invalid_request_error", "param": param, "code": "context_length_exceeded"}


class _Deferred:
    """Stands in for llama.cpp's LlamaProxy while its app is built, so that it loads nothing."""

    def __init__(self, models: Any) -> None:
        pass


def check_port(host: str, port: int) -> None:
    """A port that is taken is a one-line error now, not uvicorn's traceback after the models load."""
    with contextlib.closing(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise RecipeError("tunebook serve", "--port", f"port {port} on {host} {why}.",
                              "Pass another --port, or stop what listens there.") from None


def usage(served: list[Served], host: str, port: int) -> str:
    """The base URL and ready-to-paste calls."""
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
    url = f"http://{shown}:{port}/v1"
    model = served[0].name
    lines = [f"serving at {url}  (OpenAI-compatible; Ctrl-C stops)"]
    for s in served:
        what = f"{s.gguf.name} + {s.adapter.name}" if s.adapter else s.gguf.name
        lines.append(f"  model {s.name}: {what}, context {s.n_ctx} tokens")
    lines += ["", "curl:", f"  curl {url}/chat/completions -H 'Content-Type: application/json' \\",
              f"    -d '{{\"model\": \"{model}\", \"temperature\": 0, "
              f"\"messages\": [{{\"role\": \"user\", \"content\": \"...\"}}]}}'",
              "", "Python (pip install openai):",
              "  from openai import OpenAI",
              f"  client = OpenAI(base_url=\"{url}\", api_key=\"unused\")",
              f"  reply = client.chat.completions.create(model=\"{model}\", temperature=0,",
              "                                         messages=[{\"role\": \"user\", \"content\": \"...\"}])",
              "  print(reply.choices[0].message.content)"]
    if host not in ("127.0.0.1", "localhost", "::1"):
        lines.append(f"\nnote: bound to {host}: anyone who can reach this machine can use the model (no API key).")
    return "\n".join(lines)


def free_port(host: str = "127.0.0.1") -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def in_background(served: list[Served], adapters: bool = False) -> Iterator[str]:
    """The server in a thread of this process on a free local port (the bench and the tests); yields its URL."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(served, adapters), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and thread.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(30)


def serve(recipes: list[Recipe], qtype: str | None = None, adapter: bool = False, host: str = "127.0.0.1",
          port: int = DEFAULT_PORT) -> None:
    """Check everything, then serve until interrupted."""
    import uvicorn

    check_port(host, port)
    served = served_models(recipes, qtype, adapter)
    app = create_app(served, adapter)
    print(usage(served, host, port), flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                workers=1, timeout_keep_alive=int(os.environ.get("TUNEBOOK_KEEP_ALIVE", "5")))
