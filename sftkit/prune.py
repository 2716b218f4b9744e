"""`sftkit prune`: a smaller student by removing the decoder layers that change their input least.

Each layer is scored on calibration rows by the mean cosine similarity between the hidden states it
receives and the ones it returns (over real tokens): a layer whose output points where its input did
adds little, and goes first. Scored once, in one pass (not re-scored after each removal). The kept
layers are the original modules, untouched; the result is a plain transformers model folder.
Distillation (train.distill) then recovers what pruning lost.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .config import ConfigError, DataConfig, load_config
from .data import prepare, renderer_for, text_source
from .data.packing import pad_collate
from .data.render import build_examples
from .data.sources import load_rows
from .models import layer_list, load_model
from .rundir import final_model


@torch.no_grad()
def layer_similarity(model, batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """Per decoder layer: mean cosine similarity of its input and output hidden states on real tokens."""
    layers = layer_list(model)
    sums = [0.0] * len(layers)
    count = 0
    seen: dict[int, torch.Tensor] = {}

    def hook(i):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            seen[i] = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model.eval()
        for batch in batches:
            seen.clear()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            real = batch["attention_mask"].bool()
            for i in range(len(layers)):
                sums[i] += float(seen[i][real].sum())
            count += int(real.sum())
    finally:
        for h in handles:
            h.remove()
    return [s / max(count, 1) for s in sums]


def keep_layers(model, keep: list[int]) -> None:
    """Keep only these decoder layers (in order), renumbered for the KV cache, and say so in the config."""
    layers = layer_list(model)
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    owner = model.get_decoder()
    owner.layers = kept
    for new, layer in enumerate(kept):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new
    cfg = model.config
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    cfg.num_hidden_layers = len(keep)


def calibration_batches(tok, config: str | None, n_rows: int = 32, max_length: int = 256) -> list[dict]:
    """Rows to score layers on: the first training examples of a config (as training renders them),
    else the bundled general text that measures forgetting."""
    if config:
        cfg = load_config(config)
        examples = prepare(cfg.data, cfg.train.seed, renderer_for(cfg.data, tok)).train[:n_rows]
    else:
        renderer = renderer_for(DataConfig(max_length=max_length), tok)
        examples, _ = build_examples(load_rows(text_source("builtin"), "text"), renderer)
        examples = examples[:n_rows]
    if not examples:
        raise ConfigError("prune: no calibration rows (the config's training data kept none)")
    return [pad_collate(examples[i : i + 8], tok.pad_token_id if tok.pad_token_id is not None else 0)
            for i in range(0, len(examples), 8)]


def prune(model_name: str, keep_n: int, out: Path, config: str | None = None, overwrite: bool = False) -> dict:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"prune: {out} is not empty; pass --overwrite to replace what is there")
    model_name = final_model(model_name)  # a run directory: its final model
    model, tok = load_model(model_name, "float32")
    layers = layer_list(model)
    if layers is None or not hasattr(model, "get_decoder"):
        raise ConfigError(f"prune: {model_name} has no decoder layer stack to prune")
    if not 1 <= keep_n < len(layers):
        raise ConfigError(f"prune: --keep-layers must be between 1 and {len(layers) - 1} ({model_name} has {len(layers)} layers)")
    scores = layer_similarity(model, calibration_batches(tok, config))
    drop = sorted(sorted(range(len(layers)), key=lambda i: -scores[i])[: len(layers) - keep_n])
    keep = [i for i in range(len(layers)) if i not in drop]
    for i, s in enumerate(scores):
        print(f"  layer {i:>3}: input/output cosine {s:.4f}{'  (removed)' if i in drop else ''}", file=sys.stderr)
    keep_layers(model, keep)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"from": model_name, "layers_before": len(layers), "kept": keep, "removed": drop,
            "cosine_similarity": scores, "calibration": config or "builtin reference text"}
    (out / "pruning.json").write_text(json.dumps(info, indent=1))
    return info
