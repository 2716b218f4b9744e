"""Attention for packed rows without a tokens x tokens mask: each example attends causally to itself.

A packed micro-batch is one flat row of examples laid end to end, described by `cu_seq_lens_q`
(the cumulative example lengths, as flash-attention's varlen kernel takes them). On a GPU with
flash-attention installed the model uses `flash_attention_2`, which reads those same arguments.
Elsewhere the model uses `sftkit_sdpa`, registered here. With `cu_seq_lens_q`, on a GPU in
bf16/fp16 it is PyTorch's own varlen flash kernel (`torch.nn.attention.varlen`, one call for the
whole row); otherwise (CPU, fp32) it runs PyTorch's scaled-dot-product attention once per example
with `is_causal=True`, so the kernel skips the tiles above the diagonal and never computes the
tiles between examples that a block-diagonal mask would throw away. Without `cu_seq_lens_q`
(padded batches, generation) it is transformers' own `sdpa`.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from . import compat
from .data.packing import pack_collate
from .data.render import IGNORE, Example

NAME = "sftkit_sdpa"

try:  # PyTorch >= 2.10: flash-attention's varlen kernel, CUDA only
    from torch.nn.attention.varlen import varlen_attn
    # Causality is `window_size=(-1, 0)` in newer releases and `is_causal=True` in the first one.
    _CAUSAL = ({"window_size": (-1, 0)} if "window_size" in inspect.signature(varlen_attn).parameters
               else {"is_causal": True})
except ImportError:
    varlen_attn = None


def _torch_varlen(query, key, value, cu, max_len: int, scaling: float | None, window: int | None = None) -> torch.Tensor:
    """One varlen flash call over the whole row: (1, heads, tokens, dim) in, (1, tokens, heads, dim) out."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: one key/value head per group of query heads
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    cu = cu.to(device=q.device, dtype=torch.int32)
    causal = {"window_size": (window - 1, 0)} if window else _CAUSAL
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, **causal)[None]


def _window_mask(n: int, window: int, device) -> torch.Tensor:
    """Causal sliding-window mask as transformers defines it: query i sees keys j with i - window < j <= i."""
    i = torch.arange(n, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < window)


def varlen_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs) -> tuple[torch.Tensor, None]:
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1 or kwargs.get("past_key_values") is not None:
        return _SDPA(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    # query: (1, heads, tokens, head_dim); key/value may have fewer heads (grouped-query attention).
    # Sliding-window layers (Mistral, Qwen2, Gemma's local layers) pass their window: an example
    # longer than it must see only the last `window` keys, as the unpacked model does.
    window = kwargs.get("sliding_window")
    window = int(window) if isinstance(window, int) and window > 0 else None
    parents = kwargs.get("sftkit_prefix_of")
    if parents is not None:
        return _prefixed_attention(query, key, value, cu, parents, window, dropout, scaling), None
    if (varlen_attn is not None and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)
            and not (dropout and module.training) and (window is None or "window_size" in _CAUSAL)):
        max_len = kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max())
        return _torch_varlen(query, key, value, cu, int(max_len), scaling, window), None
    lengths = (cu[1:] - cu[:-1]).tolist()
    if sum(lengths) != query.shape[2]:
        raise ValueError(f"cu_seq_lens_q covers {sum(lengths)} tokens but the row has {query.shape[2]}")
    gqa = key.shape[1] != query.shape[1]

    def attend(q, k, v):
        n = q.shape[2]
        if window is not None and n > window:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=_window_mask(n, window, q.device),
                                                  dropout_p=dropout, scale=scaling, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)

    # split (not slicing) so that the backward pass concatenates the gradients in one go.
    outs = [attend(q, k, v) for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
    return torch.cat(outs, 2).transpose(1, 2).contiguous(), None


def _prefixed_attention(query, key, value, cu, parents: list[int], window: int | None, dropout: float,
                        scaling: float | None) -> torch.Tensor:
    """A packed row some of whose segments continue an earlier one (a prompt computed once):
    `parents[s]` is the segment that segment s continues, or -1. A segment with no parent attends
    causally to itself; one with a parent attends to the whole parent and causally to itself, with
    positions going on from the parent's, as it would laid out whole after it."""
    lengths = (cu[1:] - cu[:-1]).tolist()
    if len(parents) != len(lengths) or sum(lengths) != query.shape[2] or any(
            p >= s or (p >= 0 and parents[p] >= 0) for s, p in enumerate(parents)):
        raise ValueError(f"sftkit_prefix_of={parents} does not fit cu_seq_lens_q {cu.tolist()} of a row of "
                         f"{query.shape[2]} tokens (each parent an earlier segment that has none itself)")
    gqa = key.shape[1] != query.shape[1]
    qs, ks, vs = query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2)
    device = query.device

    def allowed(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        d = q_pos[:, None] - k_pos[None, :]
        return (d >= 0) & (d < window) if window is not None else d >= 0

    outs = []
    for q, k, v, parent in zip(qs, ks, vs, parents):
        n = q.shape[2]
        if parent < 0:
            if window is not None and n > window:
                pos = torch.arange(n, device=device)
                outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed(pos, pos), dropout_p=dropout,
                                                           scale=scaling, enable_gqa=gqa))
            else:
                outs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True,
                                                           enable_gqa=gqa))
            continue
        p = lengths[parent]
        own = p + torch.arange(n, device=device)
        mask = allowed(own, torch.cat([torch.arange(p, device=device), own]))
        outs.append(F.scaled_dot_product_attention(q, torch.cat([ks[parent], k], 2), torch.cat([vs[parent], v], 2),
                                                   attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa))
    return torch.cat(outs, 2).transpose(1, 2).contiguous()


_SDPA = compat.sdpa_attention_forward()
# Padded batches still get transformers' SDPA mask under our name.
compat.register_attention(NAME, varlen_sdpa_forward)


def flash_attention_available(model: torch.nn.Module) -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return bool(getattr(model, "_supports_flash_attn", False))


def use_packed_attention(model: torch.nn.Module) -> str:
    """Switch a model that uses SDPA to the packing-aware attention; returns the implementation in use.

    Models on eager or another implementation are left alone: they get the block-diagonal mask that
    transformers builds from the restarting position ids, which is also exact, only slower."""
    current = compat.attention_implementation(model)
    if current not in ("sdpa", NAME):
        return current
    target = "flash_attention_2" if flash_attention_available(model) else NAME
    if current != target:
        model.set_attn_implementation(target)
    return target


def packing_problem(model: torch.nn.Module, examples: list) -> str | None:
    """Why packing would change this model's results (None: it does not), checked numerically on
    two real examples in eval mode: the second example's logits packed after the first must equal
    its logits alone. Catches attention that ignores the examples' boundaries (ALiBi models such as
    Bloom, implementations that build no per-example mask) and anything else that would let packed
    examples see each other, for any model type, without a list to keep up to date."""
    if len(examples) < 2:
        return None
    a, b = sorted(examples[:64], key=lambda e: -len(e.input_ids))[:2]
    keys = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    device = next(model.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in pack_collate([[a, b]], 0).items() if k in keys}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(**batch, use_cache=False).logits[0, len(a.input_ids):].float()
            alone = model(input_ids=torch.tensor([b.input_ids], device=device), use_cache=False).logits[0].float()
    finally:
        model.train(was_training)
    scale = max(1.0, float(alone.abs().max()))
    tol = (1e-4 if alone.dtype == torch.float32 and packed.dtype == torch.float32 else 2e-2) * scale
    diff = float((packed - alone).abs().max())
    if diff <= tol:
        return None
    return (f"data.pack=true: packing is not exact for model type {model.config.model_type!r} "
            f"(attention {compat.attention_implementation(model)}): an example packed after another "
            f"gives other logits than alone (max difference {diff:.2e}), so examples would see each other; "
            "set data.pack=false")


def prefix_sharing_problem(model: torch.nn.Module, examples: list) -> str | None:
    """Why a prefix that a packed row's examples share cannot be computed once for this model (None:
    it can). Needs `sftkit_sdpa` (use_packed_attention) on a CPU: on GPUs a packed row is one varlen
    flash call, which the per-example attention a shared prefix needs is not measured against.
    Checked numerically as packing is: two sequences that share their first 16 tokens, laid out as
    [prefix][rest of one][rest of the other], must give each one's logits alone."""
    impl = compat.attention_implementation(model)
    if impl != NAME:
        return f"attention {impl} (a shared prefix needs {NAME})"
    device = next(model.parameters()).device
    if device.type != "cpu":
        return f"device {device.type} (a packed row there is one varlen attention call)"
    if not examples:
        return None
    ids = max(examples[:64], key=lambda e: len(e.input_ids)).input_ids
    ids = (ids * (32 // len(ids) + 1))[:32]
    a, b = ids, ids[:16] + ids[16:][::-1]
    batch = pack_collate([[Example(a, [IGNORE] * 32), Example(b, [IGNORE] * 32)]], 0, share_prefix=True)
    batch.pop("labels"), batch.pop("real_tokens")
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    p = int(batch["cu_seq_lens_q"][1])  # 16, or more where b's reversed rest happens to start as a's
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            shared = model(**batch, use_cache=False).logits[0, p:].float()
            alone = torch.cat([model(input_ids=torch.tensor([x], device=device), use_cache=False).logits[0, p:].float()
                               for x in (a, b)])
    finally:
        model.train(was_training)
    scale = max(1.0, float(alone.abs().max()))
    diff = float((shared - alone).abs().max())
    if diff <= 1e-4 * scale:
        return None
    return (f"model type {model.config.model_type!r} gives other logits with a shared prefix than without "
            f"(max difference {diff:.2e})")


def packed_layout(model: torch.nn.Module, examples: list) -> tuple[bool, bool]:
    """(pack, share_prefix) for a loss pass with no gradients over `examples`: packed where packing is
    exact for the model (switching SDPA to sftkit_sdpa, which runs padded batches and generation as
    SDPA does), the shared prefix computed once where that is exact too."""
    if use_packed_attention(model) not in (NAME, "flash_attention_2") or packing_problem(model, examples):
        return False, False
    return True, prefix_sharing_problem(model, examples) is None


def shared_layout_problem(models: list, sides: list) -> str | None:
    """Why a prompt cannot be computed once for several continuations on these models (packing or
    prefix sharing not exact for one of them, checked numerically on `sides`), or None."""
    for m in models:
        use_packed_attention(m)
        why_not = packing_problem(m, sides) or prefix_sharing_problem(m, sides)
        if why_not:
            return why_not
    return None
