"""Batched greedy generation with the same rendering as training."""

from __future__ import annotations

import torch

from .data.render import Renderer


@torch.no_grad()
def generate(model, renderer: Renderer, prompts: list[list[dict[str, str]]], max_new_tokens: int = 64,
             batch_size: int = 16, progress=None) -> list[str]:
    """Replies to conversations that end with a user turn; stops at the end-of-turn token."""
    tok = renderer.tok
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    # Longest first keeps batches of similar length, so little compute goes to padding.
    encoded = [renderer.prompt_ids(p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    replies: dict[int, str] = {}
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        width = max(len(encoded[i]) for i in idx)
        # Left padding: every prompt ends at the same column, where generation starts.
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=sorted(renderer.end_ids), pad_token_id=pad,
                             temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(idx):
            replies[i] = tok.decode(gen[row, width:], skip_special_tokens=True)
        if progress is not None:
            progress(len(idx))
    out = [replies[i] for i in range(len(prompts))]
    model.train(was_training)
    return out
