"""configs/accelerate/fsdp.yaml launched end to end on a GPU (accelerate enables FSDP on GPUs only):
one process, LoRA and full fine-tuning, a checkpoint that resumes into the same losses, and a final
model that plain transformers loads. Skipped without CUDA; CPU runs of the sharded checkpoint code
are in test_fsdp_checkpoint.py."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ..conftest import write_jsonl
from .test_distributed import ENV, ROOT, losses

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate runs FSDP on GPUs only")


def launch(cfg: Path, *overrides: str) -> str:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/fsdp.yaml"),
           "--num_processes", "1", "-m", "sftkit", "train", str(cfg), *overrides]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return p.stderr


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_config_trains_resumes_and_saves_on_a_gpu(tmp_path, tiny_model_dir, chat_rows, method):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_model_dir)}, "data": {"train": str(data), "max_length": 128},
        "peft": {"method": method, "r": 4},
        "train": {"batch_size": 2, "grad_accum": 2, "max_steps": 8, "lr": 1e-3, "save_every": 3},
        "output_dir": str(tmp_path / "ref")}))
    err = launch(cfg)
    assert "(FSDP)" in err, err[-3000:]
    ref = tmp_path / "ref"
    # Resume from the step-3 checkpoint of a copy, as if the run had been stopped there.
    cut = tmp_path / "cut"
    shutil.copytree(ref, cut, ignore=shutil.ignore_patterns("final"))
    for ckpt in (cut / "checkpoints").iterdir():
        if ckpt.name != "step-0000003":
            shutil.rmtree(ckpt)
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step-0000003"]
    launch(cfg, f"output_dir={cut}", "--resume")
    a, b = losses(ref), losses(cut)
    assert len(a) == len(b) == 8
    assert a[:3] == b[:3]
    assert all(abs(x - y) <= 1e-3 * abs(x) for x, y in zip(a[3:], b[3:])), (a, b)
    # The gradients clipped are the sharded parameters' (a stale list would give a norm of 0).
    assert all(json.loads(line)["grad_norm"] > 0 for line in open(ref / "metrics.jsonl"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ref / "final" / "model")
    assert model.config.vocab_size == json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    assert (ref / "final" / "adapter").is_dir() == (method == "lora")
