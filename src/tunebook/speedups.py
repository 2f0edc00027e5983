"""Training-speed adjustments to the libraries, each measured in `make bench`."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Iterator
from typing import Any

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


def share_preference_prompts(model: Any) -> bool:
    """Make a DPO batch read each pair's prompt once; True when installed on `model`.

    DPOTrainer scores a batch of B pairs as 2B rows, [prompt + chosen] then [prompt + rejected], so every prompt
    runs through the model twice; in an SQL pair the prompt (schema and question) is ~90% of the tokens. TRL has
    no shared-prefix mode, so this wraps the forward TRL's fused LM head puts on the model: each pair becomes one
    row, prompt then the chosen and the rejected answer as two branches that see the prompt but not each other
    (a 4-D attention mask, and position ids that restart both branches where the prompt ends), and TRL's own fused
    head scores the answers' tokens. Its outputs go back to the 2B-row layout TRL expects, so every DPO loss and
    metric is computed as before, on the same log-probabilities up to float rounding (tests/test_stages.py).
    A batch that is not a set of pairs sharing prompts, or a model whose attention takes no 4-D mask, runs as TRL
    runs it.
    """
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa" or config.get_text_config() is not config:
        return False
    fused = model.forward  # TRL's fused-LM-head forward
    window = getattr(config, "sliding_window", None)

    def forward(*args, fused_lm_head=False, labels=None, **kwargs):
        rows = None
        if fused_lm_head and not args and labels is not None:
            rows = SharedPromptRows.build(kwargs, labels)
        if rows is None or (window and rows.input_ids.shape[1] > window):
            return fused(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        shared = fused(input_ids=rows.input_ids, attention_mask=rows.attention_mask, position_ids=rows.position_ids,
                       shift_labels=rows.shift_labels, fused_lm_head=True, use_cache=False)
        return rows.unshare(shared, labels)

    functools.update_wrapper(forward, type(model).forward)  # `generate` checks its kwargs against the signature
    model.forward = forward
    return True


@dataclasses.dataclass
class SharedPromptRows:
    """B pairs as B rows `prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected`, and where their scores go back.

    The prompt's last token starts both branches (its next token is the first answer token, which differs between
    them), so each branch repeats it at the same position: 1 token per branch instead of a whole prompt.
    """

    input_ids: Any
    attention_mask: Any  # (B, 1, L, L) bool, True where a query may attend to a key
    position_ids: Any
    shift_labels: Any  # the token each position predicts, -100 where none is scored
    source: tuple[list[int], list[int]]  # (row, position) in these rows of each scored token...
    target: tuple[list[int], list[int]]  # ...and its (row, position) in TRL's 2B-row, shifted layout

    @classmethod
    def build(cls, inputs: dict[str, Any], labels: Any) -> SharedPromptRows | None:
        """The shared rows of TRL's [chosen; rejected] batch, or None when it is not one (then nothing changes)."""
        import torch

        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        others = [k for k, v in inputs.items() if v is not None and k not in ("input_ids", "attention_mask", "use_cache")]
        if others or ids is None or mask is None or ids.dim() != 2 or ids.shape[0] % 2 or labels.shape != ids.shape:
            return None
        pairs = ids.shape[0] // 2
        tokens, scored = [], []
        for row in range(ids.shape[0]):
            length = int(mask[row].sum())
            if not bool(mask[row, :length].all()):
                return None  # not right-padded
            scored_here = (labels[row, :length] != -100).tolist()
            start = scored_here.index(True) if True in scored_here else length
            if start == 0 or not all(scored_here[start:]):
                return None  # the answer must follow the prompt to the row's end
            tokens.append(ids[row, :length].tolist())
            scored.append(start)
        rows, sources, targets = [], ([], []), ([], [])
        for pair in range(pairs):
            chosen, rejected = tokens[pair], tokens[pairs + pair]
            start = scored[pair]
            if scored[pairs + pair] != start or chosen[:start] != rejected[:start]:
                return None
            prefix, branches = chosen[:start - 1], (chosen[start - 1:], rejected[start - 1:])
            row, labels_row, segments = list(prefix), [-100] * len(prefix), [0] * len(prefix)
            positions = list(range(len(prefix)))
            for branch, (trl_row, branch_ids) in enumerate(zip((pair, pairs + pair), branches, strict=True), 1):
                offset = len(row)
                row += branch_ids
                labels_row += branch_ids[1:] + [-100]
                segments += [branch] * len(branch_ids)
                positions += range(len(prefix), len(prefix) + len(branch_ids))
                for k in range(len(branch_ids) - 1):  # the branch's k-th position predicts answer token k
                    sources[0].append(pair)
                    sources[1].append(offset + k)
                    targets[0].append(trl_row)
                    targets[1].append(start - 1 + k)
            rows.append((row, labels_row, segments, positions))
        width = max(len(r[0]) for r in rows)

        def padded(values: list[list[int]], fill: int) -> Any:
            return torch.tensor([v + [fill] * (width - len(v)) for v in values], device=ids.device)

        segment = padded([r[2] for r in rows], -1)
        index = torch.arange(width, device=ids.device)
        causal = index[None, :, None] >= index[None, None, :]
        same_or_prompt = (segment[:, None, :] == 0) | (segment[:, :, None] == segment[:, None, :])
        real = (segment >= 0)[:, :, None] & (segment >= 0)[:, None, :]
        attend = (causal & same_or_prompt & real) | torch.eye(width, dtype=torch.bool, device=ids.device)  # pads: self
        return cls(input_ids=padded([r[0] for r in rows], int(ids[0, 0])), attention_mask=attend[:, None],
                   position_ids=padded([r[3] for r in rows], 0), shift_labels=padded([r[1] for r in rows], -100),
                   source=sources, target=targets)

    def unshare(self, shared: Any, labels: Any) -> Any:
        """TRL's fused output for the shared rows, moved to the 2B-row layout it would have computed."""
        shape = (labels.shape[0], labels.shape[1] - 1)
        fields = {}
        for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"):
            value = getattr(shared, name)
            if value is not None:
                moved = value.new_zeros(shape)
                moved[self.target] = value[self.source]
                value = moved
            fields[name] = value
        label_mask = labels[:, 1:] != -100
        loss = -fields["log_probs"].sum() / label_mask.sum().clamp(min=1)
        return type(shared)(loss=loss, label_mask=label_mask, aux_loss=None, **fields)


@contextlib.contextmanager
def preference_prompts_shared() -> Iterator[dict[str, bool]]:
    """While DPOTrainer is built (it adds its fused LM head, then scores the reference), share each pair's prompt.

    Yields {"shared_prompts": bool}: whether the trainer's model got the shared-prompt forward. TRL adds the head
    through `trl.trainer.dpo_trainer.add_fused_lm_head`; if a release renames it, nothing is shared and the log
    says so.
    """
    import trl.trainer.dpo_trainer as dpo

    facts = {"shared_prompts": False}
    original = getattr(dpo, "add_fused_lm_head", None)
    if original is None:
        log.warning("TRL has no trl.trainer.dpo_trainer.add_fused_lm_head: each DPO prompt is read twice")
        yield facts
        return

    def add_then_share(model: Any, *args: Any, **kwargs: Any) -> None:
        original(model, *args, **kwargs)
        facts["shared_prompts"] = share_preference_prompts(model) or facts["shared_prompts"]

    dpo.add_fused_lm_head = add_then_share
    try:
        yield facts
    finally:
        dpo.add_fused_lm_head = original
