"""Checkpoints of a model sharded by FSDP (torch's fully_shard, two CPU processes on gloo).

accelerate only turns its FSDP plugin on for GPUs, so the trainer's FSDP runs cannot be launched
here; what can be checked on CPU is the part sftkit owns: that checkpoint.save gathers the shards
into the same whole tensors a one-process run holds, and that checkpoint.load puts them (and the
optimizer state) back so training continues exactly.
"""

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from sftkit import checkpoint
from sftkit.config import PeftConfig
from sftkit.models import apply_method

from ..conftest import make_tiny_llama

pytestmark = pytest.mark.slow  # end to end on a real tiny model: `pytest -m 'not slow'` leaves it out

STEPS, LR = 2, 1e-2


def batches(vocab: int, rank: int | None) -> list[torch.Tensor]:
    """Each step's batch: two rows per rank; rank None = both ranks' rows (the one-process run)."""
    g = torch.Generator().manual_seed(0)
    steps = [torch.randint(0, vocab, (4, 16), generator=g) for _ in range(STEPS + 1)]
    return [b if rank is None else b[2 * rank : 2 * rank + 2] for b in steps]


def build(tokenizer, method: str, shard: bool):
    model = apply_method(make_tiny_llama(tokenizer), PeftConfig(method=method, r=4))
    if shard:
        from torch.distributed.fsdp import fully_shard

        inner = model.get_base_model() if method == "lora" else model
        for layer in inner.model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def train_step(model, opt, ids):
    model(input_ids=ids, labels=ids).loss.backward()  # FSDP averages the ranks' gradients
    opt.step()
    opt.zero_grad(set_to_none=True)


def worker(rank: int, port: int, run: str, method: str, tokenizer) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, opt, sched = build(tokenizer, method, shard=True)
        assert any(type(p).__name__ == "DTensor" for p in model.parameters())  # really sharded
        data = batches(len(tokenizer), rank)
        for ids in data[:STEPS]:
            train_step(model, opt, ids)
        path = checkpoint.save(Path(run), STEPS, model, opt, sched, {"state": {}}, rank, dist.barrier)
        train_step(model, opt, data[STEPS])  # the uninterrupted run's next step
        after = checkpoint.trainable_state(model)

        fresh, fresh_opt, fresh_sched = build(tokenizer, method, shard=True)  # a restarted run
        checkpoint.load(path, fresh, fresh_opt, fresh_sched, rank)
        train_step(fresh, fresh_opt, data[STEPS])
        resumed = checkpoint.trainable_state(fresh)
        if rank == 0:
            torch.save({"after": after, "resumed": resumed}, Path(run) / "continued.pt")
        dist.barrier()  # leave together: a rank that exits while its peer still talks can abort it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_sharded_checkpoint_holds_whole_weights_and_resumes_exactly(tokenizer, tmp_path, method):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(worker, args=(port, str(tmp_path), method, tokenizer), nprocs=2)

    # One process, both ranks' rows in each batch: the same updates, unsharded.
    model, opt, _ = build(tokenizer, method, shard=False)
    data = batches(len(tokenizer), None)
    for ids in data[:STEPS]:
        train_step(model, opt, ids)
    reference = checkpoint.trainable_state(model)
    saved = load_file(str(tmp_path / "checkpoints" / f"step-{STEPS:07d}" / "trainable.safetensors"))
    assert saved.keys() == reference.keys() and saved
    for name, tensor in reference.items():
        assert saved[name].shape == tensor.shape, name  # whole tensors, not one rank's shard
        # Sums over ranks round differently from one sum; Adam (lr 1e-2) can lift that to ~1e-6.
        torch.testing.assert_close(saved[name], tensor, rtol=1e-5, atol=1e-5, msg=name)

    continued = torch.load(tmp_path / "continued.pt")
    for name, tensor in continued["after"].items():
        assert torch.equal(continued["resumed"][name], tensor), name  # resumed == uninterrupted, bitwise
