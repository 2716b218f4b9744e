"""Checkpoints that are either complete or absent: written aside, then renamed into place.

Weights and optimizer state go through torch.distributed.checkpoint's state-dict functions, which
gather whole tensors from whatever wraps the model (nothing, DDP, FSDP) and put them back the same
way, so one checkpoint format serves every engine: the trainable weights by name
(`trainable.safetensors`) and the optimizer state by parameter name (`state.pt`). Under FSDP these
calls are collective: every rank makes them, rank 0 receives the whole tensors and writes them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .compat import unwrapped_name


def gather_state(model: torch.nn.Module, prefix: str = "", trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """Whole tensors on the CPU, by the unwrapped model's names (no DDP/FSDP prefixes) less `prefix`
    (the trainer passes its loss module, whose `model.` names the model). Collective under FSDP:
    every rank calls it, rank 0 receives the tensors, the others an empty dict."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    aliases = tied_aliases(model)
    return {n.removeprefix(prefix): t.detach().cpu().contiguous()
            for n, t in get_model_state_dict(model, options=opts).items() if unwrapped_name(n) not in aliases}


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """Names under which a parameter appears a second time (tied input and output embeddings).
    Saved once under its first name; loading that name fills every alias, since they share storage.
    safetensors refuses to write two names over one storage, so the aliases must be left out."""
    inner = _unwrap_ddp(model)
    every = {unwrapped_name(n) for n, _ in inner.named_parameters(remove_duplicate=False)}
    return every - {unwrapped_name(n) for n, _ in inner.named_parameters()}


def trainable_state(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Only what training changes: the adapter weights for LoRA, every weight for full."""
    return gather_state(model, prefix)


def load_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str, prefix: str = "") -> None:
    """Put trainable weights back into the (possibly wrapped or sharded) model; every rank calls it."""
    expected = {unwrapped_name(n).removeprefix(prefix) for n, p in _unwrap_ddp(model).named_parameters() if p.requires_grad}
    missing = expected - set(weights)
    if missing:
        raise ValueError(f"{source}: checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
    set_model_state_dict(model, {prefix + n: t for n, t in weights.items()},
                         options=StateDictOptions(full_state_dict=True, strict=False))


def _unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer, scheduler, extra: dict,
         rank: int = 0, barrier=None, prefix: str = "") -> Path:
    """Write checkpoints/step-N atomically and return its path.

    With several processes every rank calls this: the weights and optimizer state are gathered
    (a no-op under DDP, where every rank holds them whole), rank 0 writes them, each rank writes
    its own RNG state, and only then does rank 0 rename the directory into place.
    """
    barrier = barrier or (lambda: None)
    final = run_dir / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        _write(tmp, lambda: tmp.mkdir(parents=True))
    barrier()
    _write(tmp, lambda: torch.save(rng_state(), tmp / f"rng-{rank}.pt"))
    weights = trainable_state(model, prefix)
    optim = get_optimizer_state_dict(model, _inner(optimizer),
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        _write(tmp, lambda: save_file(weights, str(tmp / "trainable.safetensors")))
        _write(tmp, lambda: torch.save({"optimizer": optim, "scheduler": scheduler.state_dict()}, tmp / "state.pt"))
        _write(tmp, lambda: (tmp / "meta.json").write_text(json.dumps({"step": step, **extra}, indent=1)))
    barrier()
    if rank == 0:
        for f in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
            with open(f, "rb") as fh:
                _write(tmp, lambda fh=fh: os.fsync(fh.fileno()))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier()
    return final


class WriteError(OSError):
    """A checkpoint file could not be written (disk full, quota, read-only): one line, no traceback."""


def _write(tmp: Path, fn) -> None:
    """Run one write; a failed write becomes a WriteError, and the half-written directory is removed
    so that its space is given back."""
    try:
        fn()
    except Exception as e:
        why = write_failure(e, tmp.parent.parent)
        if why is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(28 if why.startswith("no space") else 5, why) from None


def write_failure(e: BaseException, where: Path) -> str | None:
    """What went wrong when `e` is a failed write, else None. The libraries report a full disk each
    their own way: OSError from Python, RuntimeError from torch.save's zip writer, SafetensorError
    from safetensors."""
    if not isinstance(e, (OSError, RuntimeError, SafetensorError)):
        return None
    # torch.save's zip writer: "file write failed", or "unexpected pos" when a write came up short.
    if isinstance(e, RuntimeError) and not any(k in str(e) for k in ("write", "unexpected pos", "inline_container")):
        return None
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    full = getattr(e, "errno", None) == 28 or "StorageFull" in str(e) or "No space" in str(e) or free == 0
    why = "no space left on device" if full else (getattr(e, "strerror", None) or str(e).splitlines()[0][:200])
    return why + (f" ({free / 2**20:.1f} MiB free)" if free is not None else "")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a `.tmp` directory is an interrupted save and is ignored)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and not p.name.endswith(".tmp")
                  and (p / "meta.json").is_file())


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def load(path: Path, model: torch.nn.Module, optimizer, scheduler, rank: int = 0, prefix: str = "") -> dict:
    """Restore trainable weights, optimizer, scheduler and RNG states; return the checkpoint's meta."""
    load_trainable(model, load_file(str(path / "trainable.safetensors")), str(path), prefix)
    state = torch.load(path / "state.pt", weights_only=False)
    set_optimizer_state_dict(model, _inner(optimizer), state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
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
        if p not in keep_set and _step_of(p) != best_step:
            shutil.rmtree(p, ignore_errors=True)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def size_estimate(model: torch.nn.Module) -> int:
    """Bytes one checkpoint takes: trainable weights plus AdamW's two moments, all fp32."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad) * 4 * 3


def problem(path: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a damaged file), or None when it reads back whole."""
    try:
        meta = read_meta(path)
        if not isinstance(meta, dict) or "step" not in meta:
            return f"{path / 'meta.json'}: no step recorded"
    except (OSError, ValueError) as e:
        return f"{path / 'meta.json'}: {e}"
    try:
        with safe_open(str(path / "trainable.safetensors"), "pt") as f:
            for name in f.keys():
                f.get_slice(name)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        return f"{path / 'trainable.safetensors'}: {str(e).splitlines()[0][:200] or type(e).__name__}"
    for name in ["state.pt", *sorted(p.name for p in path.glob("rng-*.pt"))]:
        try:
            with zipfile.ZipFile(path / name) as z:
                bad = z.testzip()
            if bad is not None:
                return f"{path / name}: damaged entry {bad}"
        except (OSError, zipfile.BadZipFile) as e:
            return f"{path / name}: {e}"
    return None
