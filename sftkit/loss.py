"""Cross-entropy on trained tokens only, without building the full tokens x vocab logits.

The decoder runs once; the LM head then runs only on positions whose next token is trained, in
chunks. When the head is trained, each chunk is recomputed in the backward pass instead of keeping
its logits alive; when it is frozen (LoRA, QLoRA), each chunk's gradient with respect to the hidden
states is computed in the forward pass and its logits are dropped at once. The
result is a *sum* of token losses, so the caller can normalise by the trained tokens of the whole
optimizer step (all micro-batches, all processes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import compat
from .data.render import IGNORE
from .job import log

# What a batch passes to the model; packed rows add the examples' boundaries (see sftkit.attention).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "sftkit_prefix_of",
                 "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@dataclass
class LossSums:
    loss: torch.Tensor  # summed token cross-entropy (a graph for backward in training)
    tokens: int  # trained tokens summed over
    correct: int  # trained tokens whose argmax prediction was right
    parts: torch.Tensor | None = None  # distillation: the summed NLL and divergence, unweighted (logged apart)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)  # DDP
    get_base = getattr(model, "get_base_model", None)  # peft
    return get_base() if callable(get_base) else model


def _head_ce(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum"), (logits.argmax(-1) == targets).sum()


def _exp_in_place(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Overwrites float32 `logits` (rows, vocab) with exp(logits - row max): one exp over the
    vocabulary and no full-size temporary (the head's logits are the largest tensor of a step).
    Returns (target logit, log-sum-exp, sum of the exps) per row, the last two keeping their dim."""
    target_logit = logits.gather(-1, targets[:, None]).squeeze(-1)
    top = logits.amax(-1, keepdim=True)
    total = logits.sub_(top).exp_().sum(-1, keepdim=True)
    return target_logit, top + total.log(), total


def _softmax_minus_onehot(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrites `logits` with softmax - one-hot(targets), the cross-entropy's gradient with respect
    to them; returns (log-sum-exp, target logit) per row."""
    target_logit, lse, total = _exp_in_place(logits, targets)
    logits.div_(total)
    logits[torch.arange(len(targets), device=logits.device), targets] -= 1
    return lse.squeeze(-1), target_logit


def target_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row, without a gradient, overwriting float32 `logits`: as
    log_softmax(...).gather(...) with one exp over the vocabulary and no full-size output."""
    target_logit, lse, _ = _exp_in_place(logits, targets)
    return target_logit - lse.squeeze(-1)


class _FrozenHeadCE(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, for a head that is not trained.

    The gradient with respect to `hidden` is computed here, in the forward pass: softmax - one-hot,
    written over the logits in place, times the weight. Backward only scales it. So the logits are
    never kept for backward, never recomputed, and the log-softmax's own backward pass is skipped."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        logits = F.linear(hidden, weight).float()
        correct = (logits.argmax(-1) == targets).sum()
        lse, target_logit = _softmax_minus_onehot(logits, targets)
        ctx.save_for_backward(logits.to(hidden.dtype) @ weight)
        ctx.mark_non_differentiable(correct)
        return (lse - target_logit).sum(), correct

    @staticmethod
    def backward(ctx, grad_loss, grad_correct):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None


class FrozenHeadLogp(torch.autograd.Function):
    """Each position's log-prob of its target under `hidden @ weight.T`, for a head that is not
    trained (preference optimisation sums them per reply). As _FrozenHeadCE: the gradient with
    respect to `hidden` ((softmax - one-hot) times the weight, negated in backward) is computed in
    the forward pass, so no logits are kept; backward scales each position's row by its incoming gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, entropy: list | None = None):
        logits = F.linear(hidden, weight).float()
        if entropy is not None:  # the distributions' entropy from the same logits (no second head pass)
            entropy.append(_entropy(logits))
        lse, target_logit = _softmax_minus_onehot(logits, targets)
        ctx.save_for_backward(logits.to(hidden.dtype) @ weight)
        return target_logit - lse

    @staticmethod
    def backward(ctx, grad_logp):
        (minus_grad,) = ctx.saved_tensors
        return minus_grad * -grad_logp[:, None].to(minus_grad.dtype), None, None, None


def frozen_plain_head(head: torch.nn.Module) -> bool:
    return type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad


def _head_ce_kl(head, hidden, targets, base_hidden, coef: float):
    """Cross-entropy plus coef * KL(base || tuned) of the next-token distributions, summed over tokens."""
    logits = head(hidden).float()
    logp = F.log_softmax(logits, -1)
    with torch.no_grad():
        base_logp = F.log_softmax(head(base_hidden).float(), -1)
    kl = (base_logp.exp() * (base_logp - logp)).sum()
    ce = F.nll_loss(logp, targets, reduction="sum")
    return ce + coef * kl, (logits.argmax(-1) == targets).sum()


@dataclass
class Distill:
    """A teacher's next-token distributions to learn on trained tokens (train.distill): a model run
    beside the student, or an offline cache of its top-k log-probs (sftkit.distill.TeacherCache,
    looked up by the batch's `example_ids`)."""

    teacher: torch.nn.Module | None
    weight: float = 0.5
    temperature: float = 1.0
    kind: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    top_k: int = 0
    cache: object | None = None  # TeacherCache: lookup(example_ids, device) -> (log-probs, token ids), [tokens, k]


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               kind: str = "forward_kl", top_k: int = 0) -> torch.Tensor:
    """Summed over tokens: the divergence between teacher and student next-token distributions, both
    softened by `temperature`. forward_kl = KL(teacher || student) (mode-covering, as Hinton et al.),
    reverse_kl = KL(student || teacher) (mode-seeking), jsd = the Jensen-Shannon divergence. With
    top_k, the teacher keeps its k most likely tokens, renormalised (forward_kl only): what an offline
    cache of top-k log-probs holds; k = the vocabulary size gives the full divergence."""
    s = F.log_softmax(student_logits.float() / temperature, -1)
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    if top_k:
        t, idx = t.topk(min(top_k, t.shape[-1]), -1)
        return _top_k_forward_kl(s, t, idx)
    if kind == "forward_kl":
        return (t.exp() * (t - s)).sum()
    if kind == "reverse_kl":
        return (s.exp() * (s - t)).sum()
    m = torch.logsumexp(torch.stack([s, t]), 0) - torch.log(torch.tensor(2.0))
    return 0.5 * (t.exp() * (t - m)).sum() + 0.5 * (s.exp() * (s - m)).sum()


def _top_k_forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) with the teacher's mass on its top-k tokens `idx` only, renormalised
    there; the student's log-probs are over its whole vocabulary (not renormalised)."""
    t = teacher_logp - torch.logsumexp(teacher_logp, -1, keepdim=True)
    return (t.exp() * (t - student_logp.gather(-1, idx))).sum()


def cached_divergence(student_logits: torch.Tensor, teacher_logp: torch.Tensor, idx: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """forward_kl from an offline cache: the teacher's top-k log-probs taken at temperature 1 and their
    token ids. Dividing them by the temperature and renormalising over the k gives exactly the top-k of
    the teacher's distribution at that temperature, renormalised (the shift by the teacher's
    log-partition cancels), so this equals divergence(..., top_k=k) from the teacher's logits."""
    s = F.log_softmax(student_logits.float() / temperature, -1)
    return _top_k_forward_kl(s, teacher_logp.float() / temperature, idx)


def _distilled(logits: torch.Tensor, targets: torch.Tensor, d: Distill, teacher):
    """(1 - weight) * NLL + weight * divergence, summed, with the two sums apart (detached, for the log).
    `teacher`: its logits, compared over the shared vocabulary (a model may pad its output layer
    beyond the tokenizer), or an offline cache's top-k (log-probs, token ids)."""
    ce = F.cross_entropy(logits.float(), targets, reduction="sum")
    if isinstance(teacher, tuple):
        div = cached_divergence(logits, *teacher, d.temperature)
    else:
        v = min(logits.shape[-1], teacher.shape[-1])
        div = divergence(logits[:, :v], teacher[:, :v], d.temperature, d.kind, d.top_k)
    return (1 - d.weight) * ce + d.weight * div, (logits.argmax(-1) == targets).sum(), torch.stack([ce, div]).detach()


def _head_distill(head, hidden, targets, d: Distill, teacher):
    """`teacher`: (its output layer, its hidden states), run here without gradients, or a cache's top-k."""
    if isinstance(teacher[0], torch.nn.Module):
        with torch.no_grad():
            teacher = teacher[0](teacher[1]).float()
    return _distilled(head(hidden).float(), targets, d, teacher)


def head_is_logits(base: torch.nn.Module, input_ids: torch.Tensor) -> bool:
    """Whether the model's logits are exactly its output layer applied to the decoder's last hidden
    states, checked numerically once per model on a few real tokens (in eval mode, so dropout
    cannot differ). Models that scale, cap or otherwise transform their logits (Gemma-2's
    soft-capping, Cohere's logit scale, Granite's and Falcon-H1's multipliers, and any model to come)
    fail it and take the full-logits path; no list of model types to keep up to date."""
    cached = getattr(base, "_sftkit_head_is_logits", None)
    if cached is not None:
        return cached
    ok = False
    if hasattr(base, "get_decoder") and base.get_output_embeddings() is not None:
        ids = input_ids[:1, :16]
        was_training = base.training
        base.eval()
        # bitsandbytes' 4-bit layers repack their weights into another layout on their first eval-mode
        # pass without gradients; the probe must leave the model as it found it, so they stay in
        # training mode (they hold no dropout of their own).
        for m in base.modules():
            if compat.is_bitsandbytes_layer(m):
                m.training = True
        try:
            with torch.no_grad():
                hidden = base.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
                mine = base.get_output_embeddings()(hidden).float()
                theirs = base(input_ids=ids, use_cache=False).logits.float()
            scale = max(1.0, float(theirs.abs().max()))
            ok = mine.shape == theirs.shape and bool(torch.allclose(mine, theirs, rtol=1e-4, atol=1e-4 * scale))
        finally:
            base.train(was_training)
    if not ok:
        log(f"{type(base).__name__}: its logits are not its output layer applied to the hidden states "
            "(a logit scale or cap); the loss uses the model's own logits (slower, same result)")
    base._sftkit_head_is_logits = ok
    return ok


def _full_logits_loss(model, inputs: dict, targets: torch.Tensor, keep: torch.Tensor, kl_coef: float,
                      frozen: torch.nn.Module | None, distill: Distill | None = None, cached=None) -> LossSums:
    """The plain computation from the model's own logits, for models whose logits are transformed.
    `cached`: the batch's top-k from an offline teacher cache, when distilling from one."""
    logits = model(**inputs).logits[:, :-1][keep].float()
    t = targets[keep]
    if distill is not None:
        teacher = cached
        if teacher is None:
            with torch.no_grad():
                teacher = unwrap(distill.teacher)(**inputs).logits[:, :-1][keep].float()
        loss, ok, parts = _distilled(logits, t, distill, teacher)
        return LossSums(loss, int(t.numel()), int(ok), parts)
    loss = F.cross_entropy(logits, t, reduction="sum")
    if kl_coef > 0:
        with torch.no_grad():
            if frozen is not None:
                base_logits = unwrap(frozen)(**inputs).logits
            else:
                peft_model = getattr(model, "module", model)
                with peft_model.disable_adapter():
                    base_logits = peft_model(**inputs).logits
            base_logp = F.log_softmax(base_logits[:, :-1][keep].float(), -1)
        loss = loss + kl_coef * (base_logp.exp() * (base_logp - F.log_softmax(logits, -1))).sum()
    return LossSums(loss, int(t.numel()), int((logits.argmax(-1) == t).sum()))


def base_hidden_states(model: torch.nn.Module, inputs: dict, frozen: torch.nn.Module | None) -> torch.Tensor:
    """The base model's last hidden states: LoRA with its adapters switched off (no second copy in
    memory), or a frozen copy of the model for full and partial fine-tuning."""
    with torch.no_grad():
        if frozen is not None:
            return unwrap(frozen).get_decoder()(**inputs).last_hidden_state
        peft_model = getattr(model, "module", model)
        with peft_model.disable_adapter():
            return unwrap(peft_model).get_decoder()(**inputs).last_hidden_state


def token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 1024,
               kl_coef: float = 0.0, frozen_base: torch.nn.Module | None = None,
               distill: Distill | None = None) -> LossSums:
    """Summed next-token cross-entropy over positions with a trained label.

    With kl_coef > 0, adds kl_coef * KL(base || tuned) on the same positions: distillation towards
    the model training started from, which keeps it from drifting on what it already knew. With
    `distill`, the loss is (1 - weight) * NLL + weight * divergence from a teacher's distributions,
    the teacher's head also run on trained positions only, chunk by chunk, without gradients."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    n = int(keep.sum())
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    # No cache: training never needs one, and with packed rows a cache would stop transformers from
    # building the block-diagonal mask out of the position ids.
    inputs["use_cache"] = False
    base = unwrap(model)
    teacher = unwrap(distill.teacher) if distill is not None and distill.teacher is not None else None
    cached = None
    if distill is not None and distill.cache is not None:  # the teacher's top-k, in the order of `keep`
        cached = distill.cache.lookup(batch["example_ids"], labels.device)
        if len(cached[0]) != n:
            raise RuntimeError(f"the distillation cache holds {len(cached[0])} trained tokens for this batch's "
                               f"examples, the batch has {n}")
    if not head_is_logits(base, batch["input_ids"]) or (teacher is not None and not head_is_logits(teacher, batch["input_ids"])):
        return _full_logits_loss(model, inputs, targets, keep, kl_coef, frozen_base, distill, cached)
    # Calling the decoder (not the whole model) skips the head over every position; LoRA layers
    # injected by peft live inside the decoder, so they are applied all the same.
    hidden = base.get_decoder()(**inputs).last_hidden_state[:, :-1][keep]
    t = targets[keep]
    head = base.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    correct, parts = 0, torch.zeros(2, dtype=torch.float32)
    if distill is not None:
        if cached is None:
            with torch.no_grad():
                teacher_h = teacher.get_decoder()(**inputs).last_hidden_state[:, :-1][keep]
            teacher_head = teacher.get_output_embeddings()
        for i in range(0, n, chunk_size):
            sl = slice(i, i + chunk_size)
            part = (cached[0][sl], cached[1][sl]) if cached is not None else (teacher_head, teacher_h[sl])
            args = (head, hidden[sl], t[sl], distill, part)
            loss, ok, part = checkpoint(_head_distill, *args, use_reentrant=False) \
                if torch.is_grad_enabled() and n > chunk_size else _head_distill(*args)
            total, correct, parts = total + loss, correct + int(ok), parts + part.cpu()
        return LossSums(total, n, correct, parts)
    if kl_coef > 0:
        base_h = base_hidden_states(model, inputs, frozen_base)[:, :-1][keep]
        for i in range(0, n, chunk_size):
            sl = slice(i, i + chunk_size)
            loss, ok = checkpoint(_head_ce_kl, head, hidden[sl], t[sl], base_h[sl], kl_coef, use_reentrant=False) \
                if torch.is_grad_enabled() and n > chunk_size else _head_ce_kl(head, hidden[sl], t[sl], base_h[sl], kl_coef)
            total, correct = total + loss, correct + int(ok)
        return LossSums(total, n, correct)
    fused = torch.is_grad_enabled() and hidden.requires_grad and frozen_plain_head(head)
    for i in range(0, n, chunk_size):
        h, y = hidden[i : i + chunk_size], t[i : i + chunk_size]
        if fused:  # LoRA, QLoRA, freeze without the head: the gradient is taken in the forward pass
            loss, ok = _FrozenHeadCE.apply(h, head.weight, y)
        elif torch.is_grad_enabled() and h.requires_grad and n > chunk_size:
            # Several chunks: recompute each chunk's logits in backward rather than keep them all.
            # One chunk: keeping its logits costs the same memory as recomputing them, and less time.
            loss, ok = checkpoint(_head_ce, head, h, y, use_reentrant=False)
        else:
            loss, ok = _head_ce(head, h, y)
        total = total + loss
        correct += int(ok)
    return LossSums(total, n, correct)


@torch.no_grad()
def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


def token_logps(model, batch: dict, chunk: int = 1024, temperature: float = 1.0,
                entropy: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each trained token, the row or packed sequence it belongs to), in label order,
    from the hidden states at those positions only: the LM head runs on trained positions, in chunks,
    and never keeps the tokens x vocab logits. `temperature`: of logits / temperature (as sampled).
    A packed row names each token's sequence in `sequence_ids`. `entropy`: a list that receives the
    entropy of each of those positions' distributions (no gradient; one more head pass per chunk)."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    if "sequence_ids" in batch:  # one packed row of several sequences
        rows = batch["sequence_ids"][:, 1:][keep]
    else:
        rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)[keep]
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    inputs["use_cache"] = False
    base = unwrap(model)
    head = base.get_output_embeddings()
    plain = head_is_logits(base, batch["input_ids"]) and (temperature == 1.0 or getattr(head, "bias", None) is None)
    if plain:
        hidden = base.get_decoder()(**inputs).last_hidden_state[:, :-1][keep]
        if temperature != 1.0:  # a head without bias: head(h) / T == head(h / T)
            hidden = hidden / temperature
        t = targets[keep]
        if torch.is_grad_enabled() and hidden.requires_grad and frozen_plain_head(head):
            # LoRA and friends: the head's gradient taken in its forward pass, no logits kept
            parts = [FrozenHeadLogp.apply(hidden[i : i + chunk], head.weight, t[i : i + chunk], entropy)
                     for i in range(0, len(hidden), chunk)]
            entropy = None  # taken in the same pass
        elif not torch.is_grad_enabled():  # a reference, the old policy, evaluation: no logits kept at all
            parts = [target_logps(head(hidden[i : i + chunk]).float(), t[i : i + chunk]) for i in range(0, len(hidden), chunk)]
        else:
            parts = [torch.log_softmax(head(hidden[i : i + chunk]).float(), -1).gather(-1, t[i : i + chunk, None])[:, 0]
                     for i in range(0, len(hidden), chunk)]
        if entropy is not None:
            entropy += [_entropy(head(hidden[i : i + chunk].detach())) for i in range(0, len(hidden), chunk)]
        return (torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)), rows
    # A model that transforms its logits: its own logits, at the trained positions
    logits = model(**inputs).logits[:, :-1][keep].float() / temperature
    if entropy is not None:
        entropy.append(_entropy(logits.detach()))
    return torch.log_softmax(logits, -1).gather(-1, targets[keep][:, None])[:, 0], rows


class NEFTune:
    """NEFTune (Jain et al. 2023): while the model trains, its input embeddings get uniform noise in
    [-1, 1] scaled by alpha / sqrt(L * d), L the sequence's length and d the hidden size; never at
    eval or generation (the hook looks at the embedding module's training flag). A padded batch
    takes L as its padded width, as transformers' Trainer (and so TRL) does; in a packed row each
    example's positions take L from that example's own length, as the paper defines it (one L for
    the whole packed row would shrink every example's noise by how full the row is)."""

    def __init__(self, model: torch.nn.Module, alpha: float):
        self.alpha = alpha
        self.segments: torch.Tensor | None = None  # cu_seq_lens of the packed row being computed
        self.handle = model.get_input_embeddings().register_forward_hook(self)

    def __call__(self, module, args, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        d = output.shape[-1]
        if self.segments is not None and output.shape[0] == 1:
            lengths = self.segments.diff().to(output.device).long()
            per_token = torch.repeat_interleave(self.alpha / torch.sqrt(lengths.double() * d), lengths)
            scale = output.new_zeros(output.shape[1])  # padding after the examples (if any) gets none
            scale[: len(per_token)] = per_token.to(output.dtype)
            scale = scale[None, :, None]
        else:
            scale = self.alpha / math.sqrt(output.shape[1] * d)
        return output + torch.empty_like(output).uniform_(-1, 1) * scale


class TokenLoss(torch.nn.Module):
    """The model plus its loss as one module, so DDP (which hooks `forward`) sees the whole step.

    forward(batch) returns (summed token loss, trained tokens, correct predictions) as tensors; when
    distilling, the third is {"nll": sum, "distill": sum}, which the engine logs per trained token.
    """

    def __init__(self, model: torch.nn.Module, chunk_size: int = 1024, kl_coef: float = 0.0,
                 frozen_base: torch.nn.Module | None = None, distill: Distill | None = None,
                 neftune: NEFTune | None = None):
        super().__init__()
        self.model = model
        self._neftune = [neftune]
        self.chunk_size = chunk_size
        self.kl_coef = kl_coef
        # Kept out of the module tree: DDP and the optimizer must not see the frozen copy or the teacher.
        self._frozen = [frozen_base]
        self._distill = [distill]

    def forward(self, **batch: torch.Tensor):
        # The teacher shapes the training loss only: an eval pass (no gradients) scores the plain NLL.
        distill = self._distill[0] if torch.is_grad_enabled() else None
        if self._neftune[0] is not None:
            self._neftune[0].segments = batch.get("cu_seq_lens_q")
        sums = token_loss(self.model, batch, self.chunk_size, self.kl_coef, self._frozen[0], distill)
        if sums.parts is not None:  # the engine logs each per trained token: `nll` and `distill`
            return sums.loss, torch.tensor(sums.tokens), {"nll": sums.parts[0], "distill": sums.parts[1]}
        return sums.loss, torch.tensor(sums.tokens), torch.tensor(sums.correct)
