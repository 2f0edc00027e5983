"""Training-speed adjustments to the libraries, each measured in `make bench`."""

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


PACKED_ATTENTION = "tunebook_packed_sdpa"


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs):
    """Attention over a padding-free packed row, one packed example at a time.

    TRL's padding-free packing flattens a batch into one row (e.g. 2 x 768 tokens -> 1 x 1536) and, without
    flash-attn, transformers gives SDPA a dense block-diagonal mask over the whole row: on a CPU that computes
    and keeps for backward a (heads x 1536 x 1536) matrix per layer, mostly masked out. Here each example's
    slice (from TRL's `cu_seq_lens_q`) gets plain causal SDPA, which needs no mask and never attends across
    examples. Anything else (padded batches, generation) goes to transformers' own SDPA unchanged.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2] or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    edges = bounds.tolist()
    gqa = query.shape[1] != key.shape[1]
    parts = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], is_causal=True, scale=scaling,
            enable_gqa=gqa,
        )
        for start, end in zip(edges[:-1], edges[1:], strict=True) if end > start
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def register_packed_attention() -> str:
    """Register `packed_sdpa_attention` with transformers (same masks as SDPA); return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)
    return PACKED_ATTENTION
