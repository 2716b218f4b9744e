"""Batches: the deterministic order of a run, length grouping, and padding-free packing.

Order is a function of (seed, epoch, step) alone, so a resumed run needs no sampler state: step
s takes its samples from the epochs' permutations laid end to end.

Packing puts several examples in one flat row. Their positions restart at 0 and the row carries
the examples' cumulative lengths (`cu_seq_lens_q`), which sftkit's attention (`sftkit.attention`)
and flash-attention's varlen path read: a token never attends to another example. A model on
another attention gets, from the restarting position ids, transformers' block-diagonal mask.
"""

from __future__ import annotations

import bisect

import torch

from .render import IGNORE, Example


def pad_collate(examples: list[Example], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example, rounded up to a multiple of `multiple`; padding is masked
    out of attention and loss."""
    width = -(-max(len(e.input_ids) for e in examples) // multiple) * multiple
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "real_tokens": mask.sum()}


def pad_multiple() -> int:
    """Padded batches' widths are rounded up to this (training and loss evaluation). On GPUs, PyTorch's
    cuDNN attention builds a plan for each new sequence length (measured on an H100: ~2 s per new
    width; padded LoRA steps of the throughput benchmark at 0.55 s with plans cached against 2.7 s
    without); rounding to 64 leaves at most max_length / 64 widths. On CPU every padded token costs
    compute, so no rounding."""
    return 64 if torch.cuda.is_available() else 1


# Shorter common prefixes are not worth a segment of their own.
MIN_SHARED_PREFIX = 8


def shared_prefix_length(examples: list[Example], least: int = MIN_SHARED_PREFIX) -> int:
    """Tokens all `examples` start with that may be computed once for all of them: none of them
    trained, nor the token after (it would be predicted across a segment boundary), and each example
    keeping a token of its own. 0 when fewer than `least` or fewer than two examples."""
    if len(examples) < 2:
        return 0
    first = examples[0].input_ids
    n = min(len(e.input_ids) for e in examples) - 1
    for e in examples:
        trained = next((k for k, y in enumerate(e.labels) if y != IGNORE), len(e.labels))
        n = min(n, trained - 1)
        if e is not examples[0]:
            n = next((k for k in range(n) if e.input_ids[k] != first[k]), n)
    return n if n >= least else 0


def pack_collate(bins: list[list[Example]], pad_id: int, share_prefix: bool = False) -> dict[str, torch.Tensor]:
    """All the bins' examples end to end in one flat row, with no padding: positions restart at 0
    for each example, and `cu_seq_lens_q`/`_k` (cumulative lengths, flash-attention's varlen
    format) tell the attention where each example starts, so none attends to another.

    With `share_prefix`, the untrained tokens every example starts with (a system message, the
    template's opening) are laid down once as the row's first segment and each example continues
    from it: its positions go on from the prefix's and it attends to the prefix and to itself
    (`sftkit_prefix_of`: each segment's prefix segment or -1, read by `sftkit.attention`). The loss
    and its gradients are those of the examples laid out whole; the prefix is computed once instead
    of once per example."""
    examples = [e for b in bins for e in b]
    p = shared_prefix_length(examples) if share_prefix else 0
    segments = [(examples[0].input_ids[:p], examples[0].labels[:p], -1)] if p else []
    segments += [(e.input_ids[p:], e.labels[p:], 0 if p else -1) for e in examples]
    return packed_row(segments, sum(len(e.input_ids) for e in examples))


def packed_row(segments: list[tuple[list[int], list[int], int]], real_tokens: int) -> dict:
    """One flat row of (input ids, labels, parent) segments: a segment with parent -1 starts at
    position 0 and attends to itself; one with a parent continues that earlier segment (positions go
    on from the parent's; `sftkit_prefix_of`, read by `sftkit.attention`)."""
    lengths = [len(ids) for ids, _, _ in segments]
    parents = [parent for _, _, parent in segments]
    ids = torch.tensor([t for x, _, _ in segments for t in x], dtype=torch.long)[None]
    labels = torch.tensor([t for _, y, _ in segments for t in y], dtype=torch.long)[None]
    pos = torch.cat([torch.arange(n) + (lengths[parent] if parent >= 0 else 0) for n, parent in zip(lengths, parents)])[None]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    # The first token of a segment is never a target: predicting it would use the previous
    # segment's last token, i.e. attend across examples.
    labels[0, cu[:-1].long()] = IGNORE
    batch = {"input_ids": ids, "position_ids": pos, "labels": labels, "real_tokens": torch.tensor(real_tokens),
             "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths)}
    if any(parent >= 0 for parent in parents):
        batch["sftkit_prefix_of"] = parents
    return batch


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of indices whose lengths sum to at most `capacity`: longest first, each into the fullest bin it fits."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin id), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the bin capacity {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
            bins[b].append(i)
            if space - n > 0:
                bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            if capacity - n > 0:
                bisect.insort(free, (capacity - n, len(bins) - 1))
    return bins


def epoch_order(sizes: list[int], seed: int, epoch: int, per_step: int, group_by_length: bool) -> list[int]:
    """The order of epoch `epoch`: a seeded permutation, optionally grouped so each step holds similar lengths.

    Grouping sorts windows of 32 steps by length and shuffles the steps inside each window, so
    batches pad little while the order of data across the epoch stays random.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(sizes), generator=g).tolist()
    if not group_by_length or per_step <= 1:
        return order
    window = per_step * 32
    out: list[int] = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: -sizes[i])
        steps = [chunk[s : s + per_step] for s in range(0, len(chunk), per_step)]
        for k in torch.randperm(len(steps), generator=g).tolist():
            out += steps[k]
    return out


def step_slice(step: int, per_step: int, n: int, order) -> list[int]:
    """The `per_step` indices of step `step` (0-based) when the epochs' orders (`order(epoch)`, each a
    permutation of range(n)) are laid end to end: a step may end one epoch and begin the next."""
    out: list[int] = []
    pos = step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(pos, n)
        take = min(per_step - len(out), n - offset)
        out += order(epoch)[offset : offset + take]
        pos += take
    return out


class Batcher:
    """Micro-batches for each optimizer step, the same ones whatever process or restart asks."""

    def __init__(self, examples: list[Example], batch_size: int, grad_accum: int, seed: int, pad_id: int,
                 pack: bool = False, max_length: int = 0, group_by_length: bool = True, rank: int = 0, world: int = 1,
                 max_forward_tokens: int = 0, pad_multiple: int = 1, collate=None, example_ids: bool = False,
                 share_prefix: bool = False):
        self.share_prefix = share_prefix  # packed: a prefix all of a pass's examples share is computed once
        self.example_ids = example_ids  # add each batch's example indices, in the order its tokens come
        self.pad_multiple = pad_multiple  # padded widths rounded up to this (fewer shapes for GPU kernels)
        self.collate = collate  # bins of examples -> a batch; default: packed or padded token rows
        self.examples, self.bs, self.ga, self.seed, self.pad_id, self.pack = examples, batch_size, grad_accum, seed, pad_id, pack
        self.rank, self.world = rank, world
        self.max_forward_tokens = max_forward_tokens
        lengths = [len(e.input_ids) for e in examples]
        self.units = best_fit_decreasing(lengths, max_length) if pack else [[i] for i in range(len(examples))]
        self.sizes = [sum(lengths[i] for i in u) for u in self.units]
        self.group = group_by_length and not pack  # packed rows are already near max_length
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        """Units (examples, or bins when packing) per epoch."""
        return len(self.units)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.sizes, self.seed, epoch, self.bs * self.ga * self.world, self.group)}
        return self._orders[epoch]

    def step_units(self, step: int) -> list[int]:
        """Unit indices of optimizer step `step` (0-based), all processes': a slice of the epochs laid end to end."""
        return step_slice(step, self.bs * self.ga * self.world, len(self.units), self._order)

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This process's forward passes for step `step`: its share of the step's units, split into
        `grad_accum` micro-batches and, where a micro-batch holds more than `max_forward_tokens`
        (padded) tokens, into smaller passes. Splitting changes nothing in the result, because the
        loss is normalised by the trained tokens of the whole step; it only bounds activation memory."""
        share = self.bs * self.ga
        units = self.step_units(step)[self.rank * share : (self.rank + 1) * share]
        if self.group:  # similar lengths in each pass: little padding
            units = sorted(units, key=lambda u: -self.sizes[u])
        out = []
        for k in range(self.ga):
            for part in self._split(units[k * self.bs : (k + 1) * self.bs]):
                rows = [[self.examples[i] for i in self.units[u]] for u in part]
                if self.collate is not None:
                    batch = self.collate(rows)
                else:
                    batch = (pack_collate(rows, self.pad_id, self.share_prefix) if self.pack
                             else pad_collate([r[0] for r in rows], self.pad_id, self.pad_multiple))
                if self.example_ids:  # e.g. to find the examples' cached teacher log-probs (sftkit.distill)
                    batch["example_ids"] = torch.tensor([i for u in part for i in self.units[u]])
                out.append(batch)
        return out

    def _split(self, units: list[int]) -> list[list[int]]:
        if not self.max_forward_tokens:
            return [units]
        parts: list[list[int]] = []
        for u in sorted(units, key=lambda u: -self.sizes[u]):
            if parts and self._tokens(parts[-1] + [u]) <= self.max_forward_tokens:
                parts[-1].append(u)
            else:
                parts.append([u])
        return parts

    def _tokens(self, part: list[int]) -> int:
        """Tokens one pass over `part` runs: packed bins end to end without padding; padded rows
        as long as the longest, which comes first (parts are filled longest first)."""
        return sum(self.sizes[u] for u in part) if self.pack else len(part) * self.sizes[part[0]]
