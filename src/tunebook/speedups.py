"""Training-speed adjustments to the libraries, each measured in `make bench` (see bench/README)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def score_trained_positions_only() -> bool:
    """Make TRL's fused LM head score only the positions that carry a label on CPU too; True when applied.

    TRL (1.x) projects hidden states through the 49k-word LM head "in tiles, only the positions whose next-token
    label is not -100" on CUDA/XPU, but on every other device it scores every position, to keep tile shapes
    static for compilers such as Neuron's. Eager CPU training compiles nothing, and in an SQL example the prompt
    (schema and question) is ~90% of the tokens, so on CPU the head's work and memory shrink about tenfold for
    the same loss and gradients (tests/test_train.py checks they are equal). TRL decides this in one private
    helper, `trl.trainer.utils._use_triton`; when a TRL release renames it, this does nothing and says so in the log.
    """
    try:
        import trl.trainer.utils as trl_utils
    except ImportError:
        return False
    original = getattr(trl_utils, "_use_triton", None)
    if original is None or not callable(original):
        log.warning("TRL has no trl.trainer.utils._use_triton: the LM head scores every position on CPU")
        return False
    if getattr(original, "_tunebook_compact", False):
        return True

    def compact_on_cpu(device) -> bool:
        return device.type == "cpu" or original(device)

    compact_on_cpu._tunebook_compact = True  # type: ignore[attr-defined]
    trl_utils._use_triton = compact_on_cpu
    return True
