"""Two processes on CPU (gloo) through accelerate: same losses as one, exact resume, fast failure."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ..conftest import write_jsonl

pytestmark = pytest.mark.slow  # end to end on a real tiny model: `pytest -m 'not slow'` leaves it out

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
       "OMP_NUM_THREADS": "1"}


def losses(run):
    return [json.loads(line)["loss"] for line in open(Path(run) / "metrics.jsonl")]


@pytest.fixture
def cfg(tmp_path, tiny_model_dir, chat_rows):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_model_dir)}, "data": {"train": str(data), "max_length": 128},
        "peft": {"r": 4}, "train": {"batch_size": 2, "grad_accum": 2, "max_steps": 8, "lr": 1e-3, "save_every": 3},
        "output_dir": str(tmp_path / "run")}))
    return path


def sftkit(*args, wait=True, tag="none"):
    cmd = [sys.executable, "-m", "sftkit", "train", *map(str, args)]
    env = {**ENV, "SFTKIT_TEST_TAG": tag}  # inherited by the launcher's workers, to find them
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    if not wait:
        return p
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    return out, err


def test_two_processes_give_the_losses_of_one_with_the_same_global_batch(cfg, tmp_path):
    sftkit(cfg, "--nproc", "2", f"output_dir={tmp_path / 'two'}")
    sftkit(cfg, f"output_dir={tmp_path / 'one'}", "train.batch_size=4")  # 4 x 2 = 2 x 2 x 2 processes
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(two) == len(one) == 8
    assert all(abs(a - b) < 1e-5 for a, b in zip(two, one)), (two, one)
    # Only rank 0 writes: one line per step, one final model.
    assert [json.loads(line)["step"] for line in open(tmp_path / "two" / "metrics.jsonl")] == list(range(1, 9))
    assert (tmp_path / "two" / "final" / "model" / "config.json").is_file()


def tagged(tag: str, rank: str | None = None) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"SFTKIT_TEST_TAG={tag}".encode() in env and (rank is None or f"LOCAL_RANK={rank}".encode() in env):
            pids.append(int(pid))
    return pids


def wait_steps(run, n, proc):
    t0 = time.time()
    while not ((Path(run) / "metrics.jsonl").exists() and len((Path(run) / "metrics.jsonl").read_text().splitlines()) >= n):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - t0 < 240
        time.sleep(0.02)


def test_two_process_checkpoint_resumes_in_two_processes_exactly(cfg, tmp_path):
    long = ["train.max_steps=60", "train.save_every=5", "peft.dropout=0.1"]
    sftkit(cfg, "--nproc", "2", f"output_dir={tmp_path / 'ref'}", *long)
    run = tmp_path / "cut"
    p = sftkit(cfg, "--nproc", "2", f"output_dir={run}", *long, wait=False, tag="cut")
    wait_steps(run, 12, p)
    for pid in tagged("cut"):  # launcher and both workers at once: no handler runs anywhere
        os.kill(pid, signal.SIGKILL)
    p.wait()
    while tagged("cut"):
        time.sleep(0.05)
    assert len(losses(run)) < 60
    with pytest.raises(AssertionError, match="written by 2 process"):
        sftkit(cfg, "--resume", f"output_dir={run}", *long)
    sftkit(cfg, "--nproc", "2", "--resume", f"output_dir={run}", *long)
    assert losses(run) == losses(tmp_path / "ref")


def test_a_dead_rank_brings_the_others_down_within_seconds(cfg, tmp_path):
    run = tmp_path / "dies"
    p = sftkit(cfg, "--nproc", "2", f"output_dir={run}", "train.max_steps=100000", "train.save_every=0", wait=False,
               tag="dies")
    wait_steps(run, 5, p)
    (victim,) = tagged("dies", rank="1")
    t0 = time.time()
    os.kill(victim, signal.SIGKILL)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert time.time() - t0 < 30
    assert "a training process failed" in err
    assert not tagged("dies")  # nothing left running


def test_sigterm_to_one_rank_saves_on_both_and_resumes_exactly(cfg, tmp_path):
    """The ranks agree on stopping before the save: a rank that saw the signal alone used to enter
    the checkpoint's collectives while its peer waited in a reduce, until the 600 s timeout."""
    from sftkit import checkpoint

    long = ["train.max_steps=40", "train.save_every=1000", "peft.dropout=0.1"]
    sftkit(cfg, "--nproc", "2", f"output_dir={tmp_path / 'ref'}", *long)
    run = tmp_path / "term"
    p = sftkit(cfg, "--nproc", "2", f"output_dir={run}", *long, wait=False, tag="term")
    wait_steps(run, 6, p)
    (victim,) = tagged("term", rank="1")
    t0 = time.time()
    os.kill(victim, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert time.time() - t0 < 30, err[-3000:]
    assert not tagged("term")
    done = len(losses(run))
    assert done < 40
    (ckpt,) = checkpoint.complete_checkpoints(run)
    assert checkpoint.read_meta(ckpt)["step"] == done and (ckpt / "rng-0.pt").is_file() and (ckpt / "rng-1.pt").is_file()
    sftkit(cfg, "--nproc", "2", "--resume", f"output_dir={run}", *long)
    assert losses(run) == losses(tmp_path / "ref")


def test_two_processes_distilling_from_a_cache_give_the_losses_of_one(cfg, tmp_path, tokenizer):
    """Each rank looks up its own share of the step's examples in the cache (sftkit.distill)."""
    import torch

    from sftkit.config import load_config
    from sftkit.distill import build

    from ..conftest import make_tiny_llama

    teacher = tmp_path / "teacher"
    model = make_tiny_llama(tokenizer, seed=1)
    with torch.no_grad():
        model.model.norm.weight.mul_(40)  # sharp distributions: a row looked up for the wrong example shows
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    build(load_config(cfg, {"train.distill.teacher": str(teacher), "train.distill.top_k": 16}), tmp_path / "cache")
    common = [f"train.distill.teacher={tmp_path / 'cache'}", "train.distill.weight=0.8", "train.max_steps=4",
              "train.save_every=0", "data.pack=true"]
    sftkit(cfg, "--nproc", "2", f"output_dir={tmp_path / 'two'}", *common)
    sftkit(cfg, f"output_dir={tmp_path / 'one'}", "train.batch_size=4", *common)
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(two) == len(one) == 4
    assert all(abs(a - b) < 1e-5 for a, b in zip(two, one)), (two, one)
