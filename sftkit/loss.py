"""Cross-entropy on trained tokens only, without building the full tokens x vocab logits.

The decoder runs once; the LM head then runs only on positions whose next token is trained, in
chunks, each chunk recomputed in the backward pass instead of keeping its logits alive. The
result is a *sum* of token losses, so the caller can normalise by the trained tokens of the whole
optimizer step (all micro-batches, all processes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data.render import IGNORE

# Models whose logits are more than `lm_head(hidden)`; they take the plain full-logits path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class LossSums:
    loss: torch.Tensor  # summed token cross-entropy (a graph for backward in training)
    tokens: int  # trained tokens summed over
    correct: int  # trained tokens whose argmax prediction was right


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)  # DDP
    get_base = getattr(model, "get_base_model", None)  # peft
    return get_base() if callable(get_base) else model


def _head_ce(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum"), (logits.argmax(-1) == targets).sum()


def _has_logit_transform(config) -> bool:
    return any(getattr(config, name, None) not in (None, 1.0) for name in _LOGIT_TRANSFORMS)


def token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 1024) -> LossSums:
    """Summed next-token cross-entropy over positions with a trained label."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    n = int(keep.sum())
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    # No cache: training never needs one, and with packed rows a cache would stop transformers from
    # building the block-diagonal mask out of the position ids.
    inputs["use_cache"] = False
    base = _unwrap(model)
    if _has_logit_transform(base.config) or not hasattr(base, "get_decoder"):
        logits = model(**inputs).logits[:, :-1][keep].float()
        t = targets[keep]
        return LossSums(F.cross_entropy(logits, t, reduction="sum"), n, int((logits.argmax(-1) == t).sum()))
    # Calling the decoder (not the whole model) skips the head over every position; LoRA layers
    # injected by peft live inside the decoder, so they are applied all the same.
    hidden = base.get_decoder()(**inputs).last_hidden_state[:, :-1][keep]
    t = targets[keep]
    head = base.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    correct = 0
    for i in range(0, n, chunk_size):
        h, y = hidden[i : i + chunk_size], t[i : i + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad and n > chunk_size:
            # Several chunks: recompute each chunk's logits in backward rather than keep them all.
            # One chunk: keeping its logits costs the same memory as recomputing them, and less time.
            loss, ok = checkpoint(_head_ce, head, h, y, use_reentrant=False)
        else:
            loss, ok = _head_ce(head, h, y)
        total = total + loss
        correct += int(ok)
    return LossSums(total, n, correct)


class TokenLoss(torch.nn.Module):
    """The model plus its loss as one module, so DDP (which hooks `forward`) sees the whole step.

    forward(batch) returns (summed token loss, trained tokens, correct predictions) as tensors.
    """

    def __init__(self, model: torch.nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, **batch: torch.Tensor):
        sums = token_loss(self.model, batch, self.chunk_size)
        return sums.loss, torch.tensor(sums.tokens), torch.tensor(sums.correct)
