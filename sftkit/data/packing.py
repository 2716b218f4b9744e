"""Batches: right-padded micro-batches, and the deterministic sample order of a run."""

from __future__ import annotations

import torch

from .render import IGNORE, Example


def pad_collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sample_order(n: int, seed: int, epoch: int) -> list[int]:
    """The permutation of epoch `epoch`: a function of (seed, epoch) alone, so resume needs no state."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def step_indices(n: int, seed: int, step: int, per_step: int) -> list[int]:
    """Sample indices for optimizer step `step` (0-based): a slice of the epochs laid end to end."""
    out = []
    pos = step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(pos, n)
        order = sample_order(n, seed, epoch)
        take = min(per_step - len(out), n - offset)
        out += order[offset : offset + take]
        pos += take
    return out
