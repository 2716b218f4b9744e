"""DPO throughput and memory: sftkit's task: preference against TRL's DPOTrainer, same pairs and model.

    .venv/bin/python benchmarks/dpo_throughput.py [--steps 4] [--batch 8]

Pairs are made from the throughput benchmark's real text (the Python documentation that ships with
CPython, via benchmarks/throughput.py's data): prompt and completion of a row are prompt and chosen,
the completion of another row is rejected. Both tools train SmolLM2-135M in fp32 with the same LoRA
(r=16, alpha=32, all linear layers), beta 0.1, lr 5e-6, batch 8 pairs, max_length 512, the reference being
the model with its adapter switched off; TRL with bf16=False (this CPU has no bf16), with and
without gradient checkpointing. Each row runs in a fresh process (peak RSS is per process). Tokens/s
counts the real tokens of both sides of the pairs over the steps after the first. Writes the section
"DPO throughput against TRL" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, matmul_gflops, update_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench-dpo"
ROWS = {"sftkit-dpo-lora": ("sftkit", {}),
        "sftkit-dpo-lora-unshared": ("sftkit", {"data.share_prefix": False}),
        "sftkit-dpo-lora-precomputed": ("sftkit", {"preference.precompute_reference": True}),
        "trl-dpo-lora": ("trl", {"gradient_checkpointing": False}),
        "trl-dpo-lora-ckpt": ("trl", {"gradient_checkpointing": True})}
BETA, LR, MAX_LENGTH = 0.1, 5e-6, 512
NON_EMBEDDING_PARAMS = 134_515_008 - 49152 * 576  # SmolLM2-135M, tied embeddings


def make_pairs() -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from throughput import make_data

    train, _ = make_data()
    rows = [json.loads(x) for x in open(train)]
    rng = random.Random(0)
    WORK.mkdir(parents=True, exist_ok=True)
    out = WORK / "pairs.jsonl"
    with open(out, "w") as f:
        for i, r in enumerate(rows):
            other = rows[(i + rng.randrange(1, len(rows))) % len(rows)]
            f.write(json.dumps({"prompt": r["prompt"], "chosen": r["completion"], "rejected": other["completion"]}) + "\n")
    return out


def run_sftkit(opts, pairs: Path, settings: dict) -> dict:
    from sftkit.config import load_config
    from sftkit.trainer import train

    train(load_config(None, {"task": "preference", "model.name": "smollm2-135m", "data.train": str(pairs),
                             "data.template": "plain", "data.max_length": MAX_LENGTH, "peft.r": 16, "peft.alpha": 32,
                             "preference.beta": BETA, "train.lr": LR, "train.batch_size": opts.batch,
                             "train.max_steps": opts.steps, "eval.reference": None, "output_dir": str(WORK / "sftkit"),
                             **settings}),
          overwrite=True)
    records = [json.loads(x) for x in open(WORK / "sftkit" / "metrics.jsonl")][1:]
    tokens, seconds = sum(r["tokens"] for r in records), sum(r["step_seconds"] for r in records)
    return {"tokens_per_s": tokens / seconds, "s_per_step": seconds / len(records), "loss": records[-1]["loss"]}


def run_trl(opts, pairs: Path, settings: dict) -> dict:
    import datasets
    import torch
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback

    from sftkit.models import load_tokenizer, resolve

    tok = load_tokenizer("smollm2-135m")
    times: list[float] = []
    counted: list[int] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    args = trl.DPOConfig(output_dir=str(WORK / "trl"), per_device_train_batch_size=opts.batch, max_length=MAX_LENGTH,
                         learning_rate=LR, beta=BETA, max_steps=opts.steps, logging_steps=1, report_to=[], bf16=False,
                         use_cpu=True, save_strategy="no", dataloader_num_workers=0, **settings)
    model = AutoModelForCausalLM.from_pretrained(resolve("smollm2-135m"), dtype=torch.float32)
    trainer = trl.DPOTrainer(model=model, args=args, processing_class=tok,
                             train_dataset=datasets.load_dataset("json", data_files=str(pairs), split="train"),
                             peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
                             callbacks=[Clock()])
    # Real tokens per step, counted from the batches the trainer draws (both sides of each pair).
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        counted.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    seconds = times[-1] - times[0]
    tokens = sum(counted[1 : len(times)])
    return {"tokens_per_s": tokens / seconds, "s_per_step": seconds / (len(times) - 1), "loss": logs[-1]["loss"]}


def child(name: str, opts) -> None:
    tool, settings = ROWS[name]
    pairs = WORK / "pairs.jsonl"
    out = run_sftkit(opts, pairs, settings) if tool == "sftkit" else run_trl(opts, pairs, settings)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.child:
        return child(opts.child, opts)
    make_pairs()
    results = {}
    for name in opts.only or ROWS:  # in the order given: run TRL first to check the order does not favour a tool
        gflops = matmul_gflops()  # the machine's speed drifts: each row is set against the rate just before it
        t0 = time.time()
        p = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(opts.steps), "--batch",
                            str(opts.batch)], capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:  # kept in the table: TRL's row without checkpointing peaks near this machine's 24 GB
            print(p.stderr[-3000:])
            why = "killed (SIGKILL: out of memory?)" if p.returncode == -9 else f"exit status {p.returncode}"
            results[name] = {"failed": why, "gflops": gflops}
            print(name, "failed:", why, flush=True)
            continue
        results[name] = {**json.loads(line[7:]), "gflops": gflops}
        print(name, results[name], f"({time.time() - t0:.0f}s)", flush=True)
    # A ceiling in real tokens/s at the measured matmul rate: per token, the policy's forward and its
    # backward to the activations (LoRA: no weight gradients for the base) and the reference's forward,
    # 2 FLOPs per non-embedding weight each; the head, attention and the adapter are left out.
    def ceiling(v: dict) -> float:
        return v["gflops"] * 1e9 / (3 * 2 * NON_EMBEDDING_PARAMS)

    best_trl = max((v for k, v in results.items() if k.startswith("trl") and "failed" not in v),
                   key=lambda v: v["tokens_per_s"], default=None)
    lines = ["| row | real tokens/s | matmul GFLOP/s before it | of the ceiling | s/step | peak RSS (MB) | loss (last step) "
             "| vs TRL's fastest |", "|---|---|---|---|---|---|---|---|"]
    for k, v in results.items():
        if "failed" in v:
            lines.append(f"| {k} | failed: {v['failed']} | {v['gflops']:.0f} | - | - | - | - | - |")
            continue
        ratio = (f"{v['tokens_per_s'] / best_trl['tokens_per_s']:.2f}x tokens/s, "
                 f"{v['peak_rss_mb'] / best_trl['peak_rss_mb']:.2f}x memory") if best_trl and k.startswith("sftkit") else "-"
        lines.append(f"| {k} | {v['tokens_per_s']:.1f} | {v['gflops']:.0f} | {v['tokens_per_s'] / ceiling(v):.0%} | "
                     f"{v['s_per_step']:.2f} | {v['peak_rss_mb']:.0f} | "
                     f"{v['loss']:.4f} | {ratio} |")
    body = (f"`.venv/bin/python benchmarks/dpo_throughput.py --steps {opts.steps} --batch {opts.batch}` on {machine()}: "
            "SmolLM2-135M, fp32, LoRA r=16 on all linear layers, beta 0.1, batches of "
            f"{opts.batch} pairs of real text (max_length {MAX_LENGTH}), the first step untimed; the reference is the "
            "model with its adapter off in both tools. Target: at least 3x TRL's tokens/s at no more than half its "
            f"peak memory. Rows ran in this order, each after an fp32 2048x2048 matmul measurement (the machine's "
            "speed drifts); a row's ceiling is three passes of 2 FLOPs per non-embedding weight "
            f"({NON_EMBEDDING_PARAMS / 1e6:.1f}M) per real token at that rate (policy forward, its backward to the "
            "activations, reference forward; the head, attention and the adapter left out; shared prompts counted "
            "as if computed twice).\n\n" + "\n".join(lines))
    print(body)
    print(f"wrote {update_section('DPO throughput against TRL', body)}")


if __name__ == "__main__":
    main()
