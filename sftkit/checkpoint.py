"""Checkpoints that are either complete or absent: written aside, then renamed into place."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only what training changes: the adapter weights for LoRA, every weight for full."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items() if n in names}


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer, scheduler, extra: dict,
         rank: int = 0, barrier=None) -> Path:
    """Write checkpoints/step-N atomically and return its path.

    With several processes every rank calls this: rank 0 writes the weights and optimizer (the
    same on every rank under DDP), each rank its own RNG state, and only then does rank 0 rename
    the directory into place.
    """
    barrier = barrier or (lambda: None)
    final = run_dir / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    if rank == 0:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, **extra}, indent=1))
    barrier()
    if rank == 0:
        for f in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier()
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a `.tmp` directory is an interrupted save and is ignored)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and not p.name.endswith(".tmp")
                  and (p / "meta.json").is_file())


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def load(path: Path, model: torch.nn.Module, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore trainable weights, optimizer, scheduler and RNG states; return the checkpoint's meta."""
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainable.safetensors"))
    missing = set(trainable_state(model)) - set(weights)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
    model.load_state_dict(weights, strict=False)
    state = torch.load(path / "state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = torch.load(path / f"rng-{rank}.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return read_meta(path)


def prune(run_dir: Path, keep: int, best_step: int | None) -> None:
    """Keep the newest `keep` checkpoints and the best one; remove the rest."""
    ckpts = complete_checkpoints(run_dir)
    keep_set = set(ckpts[-keep:]) if keep > 0 else set()
    for p in ckpts:
        if p not in keep_set and read_meta(p)["step"] != best_step:
            shutil.rmtree(p, ignore_errors=True)


def size_estimate(model: torch.nn.Module) -> int:
    """Bytes one checkpoint takes: trainable weights plus AdamW's two moments, all fp32."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad) * 4 * 3
