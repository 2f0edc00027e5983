"""Grammar-constrained decoding, one grammar text for both runtimes: xgrammar for transformers, llama.cpp's own
GBNF sampler for the GGUF files.

A grammar is GBNF text (llama.cpp's format, which xgrammar reads too). It constrains the answer only: once the
grammar is complete, the model may emit only its stop tokens.
"""

from __future__ import annotations

import functools
from typing import Any


class HFGrammars:
    """Grammars compiled for one tokenizer (xgrammar), cached by their text."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]):
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._compiled: dict[str, Any] = {}

    def compile(self, grammar: str) -> Any:
        if grammar not in self._compiled:
            self._compiled[grammar] = self._compiler.compile_grammar(grammar)
        return self._compiled[grammar]

    def follows(self, grammar: str, ids: list[int]) -> bool:
        """Whether the grammar takes these tokens one by one (through the stop token, if they end with one).

        When a greedy answer does, constrained greedy decoding would pick exactly the same tokens: at each step
        the argmax was allowed, and masking other tokens cannot change an argmax that is allowed."""
        import xgrammar as xgr

        matcher = xgr.GrammarMatcher(self.compile(grammar))
        return all(matcher.accept_token(token) for token in ids)

    def processor(self, grammars: list[str]) -> Any:
        """A fresh logits processor for one `generate` call, one grammar per row of the batch (xgrammar's own)."""
        import xgrammar as xgr

        return xgr.contrib.hf.LogitsProcessor([self.compile(g) for g in grammars])


@functools.lru_cache(maxsize=64)
def llama_grammar(grammar: str) -> Any:
    """The grammar for llama.cpp's sampler (llama-cpp-python's LlamaGrammar)."""
    from llama_cpp import LlamaGrammar

    return LlamaGrammar.from_string(grammar, verbose=False)
