"""RL (GRPO) throughput, memory and held-out pass rate: sftkit's task: rl against TRL's GRPOTrainer.

    .venv/bin/python benchmarks/rl_throughput.py [--steps 30] [--ckpt-steps 6]

Both tools run the bundled RL example (examples/arith: two-digit sums, `number_match` as the
reward: sftkit.rewards.number_match, handed to GRPOTrainer unchanged, TRL's signature) on the
embedded SmolLM2-135M in fp32 with the same LoRA (r=16, alpha=32, all linear layers, no dropout):
4 prompts x 8 completions per step, at most 16 new tokens, temperature 0.8, top_p 1, loss grpo,
beta 0, epsilon 0.2, scale_rewards group, lr 1e-4 with a cosine schedule, no warmup, clipping at 1.0,
the prompts in the model's chat template. TRL with bf16=False (this CPU has no bf16) and its own
generation (no vLLM on CPU), without gradient checkpointing (its fastest here) and with it (its
default, fewer steps: speed only). Each row runs in a fresh process (peak RSS is per process).

Measured over the steps after the first: seconds per step, completion tokens per second (sampled and
trained), and sequence tokens per second (prompt + completion of every completion: TRL's
`num_tokens`, which sftkit's `tokens` counts the same way). After the run, the held-out pass rate of
greedy replies to examples/arith/eval.jsonl, computed for both tools' final models by the same
function (sftkit.tasks.rl.held_out, which sftkit's own evals use). Writes the section "RL (GRPO)
throughput against TRL" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, matmul_gflops, update_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench-rl"
TRAIN, HELD = ROOT / "examples" / "arith" / "train.jsonl", ROOT / "examples" / "arith" / "eval.jsonl"
ROWS = {"sftkit-grpo-lora": ("sftkit", {}),
        "trl-grpo-lora": ("trl", {"gradient_checkpointing": False}),
        "trl-grpo-lora-ckpt": ("trl", {"gradient_checkpointing": True})}
PROMPTS, G, NEW, TEMP, LR, SEED = 4, 8, 16, 0.8, 1e-4, 42


def pass_rate(model, tok) -> dict:
    """Greedy replies to the held-out prompts, scored by number_match: sftkit's held-out function."""
    from sftkit.config import DataConfig
    from sftkit.data import renderer_for
    from sftkit.rewards import parse_rewards
    from sftkit.tasks.rl import held_out, read_prompt_rows

    rows, _ = read_prompt_rows(str(HELD), {})
    h = held_out(model, renderer_for(DataConfig(), tok), rows, parse_rewards([{"function": "number_match"}]), {}, NEW,
                 1.0, 32)
    return h.metrics["eval_pass_rate"]


def run_sftkit(steps: int, settings: dict) -> dict:
    from sftkit.config import load_config
    from sftkit.trainer import train

    out = WORK / "sftkit"
    train(load_config(None, {"task": "rl", "model.name": "smollm2-135m", "data.train": str(TRAIN), "data.eval": str(HELD),
                             "data.max_length": 256, "peft.r": 16, "peft.alpha": 32, "rl.loss": "grpo",
                             "rl.num_generations": G, "rl.max_new_tokens": NEW, "rl.temperature": TEMP,
                             "rl.rewards": [{"function": "number_match"}], "train.lr": LR, "train.batch_size": PROMPTS,
                             "train.max_steps": steps, "train.seed": SEED, "eval.reference": None, "eval.batch_size": 32,
                             "output_dir": str(out), **settings}), overwrite=True)
    records = [json.loads(x) for x in open(out / "metrics.jsonl") if '"loss"' in x][1:]
    seconds = sum(r["step_seconds"] for r in records)
    summary = json.loads((out / "summary.json").read_text())
    return {"s_per_step": seconds / len(records), "completion_tokens_per_s": sum(r["generated_tokens"] for r in records) / seconds,
            "tokens_per_s": sum(r["tokens"] for r in records) / seconds,
            "generate_share": sum(r["generate_seconds"] for r in records) / seconds,
            "reward": sum(r["reward"] for r in records) / len(records),
            "base_pass_rate": summary["scores"].get("base"), "pass_rate": summary["scores"].get("tuned")}


def run_trl(steps: int, settings: dict, evaluate: bool) -> dict:
    import datasets
    import torch
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback

    from sftkit.models import load_tokenizer, resolve
    from sftkit.rewards import number_match

    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    tok = load_tokenizer("smollm2-135m")
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    rows = [json.loads(x) for x in open(TRAIN)]
    data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                       for r in rows])
    args = trl.GRPOConfig(output_dir=str(WORK / "trl"), per_device_train_batch_size=PROMPTS * G, num_generations=G,
                          max_completion_length=NEW, temperature=TEMP, top_p=1.0, loss_type="grpo", beta=0.0,
                          epsilon=0.2, scale_rewards="group", learning_rate=LR, lr_scheduler_type="cosine",
                          warmup_steps=0, max_grad_norm=1.0, max_steps=steps, seed=SEED, bf16=False, use_cpu=True,
                          report_to=[], logging_steps=1, save_strategy="no", dataloader_num_workers=0, **settings)
    model = AutoModelForCausalLM.from_pretrained(resolve("smollm2-135m"), dtype=torch.float32)
    base = pass_rate(model, tok) if evaluate else None
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[number_match], args=args, train_dataset=data,
                              processing_class=tok, callbacks=[Clock()],
                              peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "num_tokens" in h]
    seconds = times[-1] - times[0]
    completion = sum(h["completions/mean_length"] * PROMPTS * G for h in logs[1:])
    tuned = pass_rate(trainer.model, tok) if evaluate else None
    return {"s_per_step": seconds / (len(times) - 1), "completion_tokens_per_s": completion / seconds,
            "tokens_per_s": (logs[-1]["num_tokens"] - logs[0]["num_tokens"]) / seconds,
            "reward": sum(h["reward"] for h in logs[1:]) / len(logs[1:]), "base_pass_rate": base, "pass_rate": tuned}


def child(name: str, opts) -> None:
    tool, settings = ROWS[name]
    steps = opts.ckpt_steps if name.endswith("-ckpt") else opts.steps
    out = run_sftkit(steps, settings) if tool == "sftkit" else run_trl(steps, settings, evaluate=not name.endswith("-ckpt"))
    out["steps"] = steps
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--ckpt-steps", type=int, default=6)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.child:
        return child(opts.child, opts)
    WORK.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in opts.only or ROWS:
        gflops = matmul_gflops()  # the machine's speed drifts: each row is set against the rate just before it
        t0 = time.time()
        p = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(opts.steps), "--ckpt-steps",
                            str(opts.ckpt_steps)], capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(p.stderr[-3000:])
            why = "killed (SIGKILL: out of memory?)" if p.returncode == -9 else f"exit status {p.returncode}"
            results[name] = {"failed": why, "gflops": gflops}
            print(name, "failed:", why, flush=True)
            continue
        results[name] = {**json.loads(line[7:]), "gflops": gflops, "wall": time.time() - t0}
        print(name, results[name], flush=True)
    done = {k: v for k, v in results.items() if "failed" not in v}
    best_trl = max((v for k, v in done.items() if k.startswith("trl")), key=lambda v: v["tokens_per_s"], default=None)
    lines = ["| row | steps | s/step | sequence tokens/s | completion tokens/s | matmul GFLOP/s before it | peak RSS (MB) "
             "| mean reward (steps 2-) | held-out pass rate: base -> tuned | vs TRL's fastest |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for k, v in results.items():
        if "failed" in v:
            lines.append(f"| {k} | failed: {v['failed']} | - | - | - | {v['gflops']:.0f} | - | - | - | - |")
            continue
        ratio = (f"{v['tokens_per_s'] / best_trl['tokens_per_s']:.2f}x tokens/s, "
                 f"{v['peak_rss_mb'] / best_trl['peak_rss_mb']:.2f}x memory") if best_trl and k.startswith("sftkit") else "-"
        rate = (f"{fmt(v['base_pass_rate'], '.2f')} -> {fmt(v['pass_rate'], '.2f')}" if v.get("pass_rate") is not None
                else "- (speed only)")
        lines.append(f"| {k} | {v['steps']} | {v['s_per_step']:.2f} | {v['tokens_per_s']:.1f} | "
                     f"{v['completion_tokens_per_s']:.1f} | {v['gflops']:.0f} | {v['peak_rss_mb']:.0f} | {v['reward']:.3f} | "
                     f"{rate} | {ratio} |")
    share = done.get("sftkit-grpo-lora", {}).get("generate_share")
    body = (f"`.venv/bin/python benchmarks/rl_throughput.py --steps {opts.steps} --ckpt-steps {opts.ckpt_steps}` on "
            f"{machine()}: the bundled RL example (examples/arith, `number_match`), SmolLM2-135M fp32, LoRA r=16 on all "
            f"linear layers, {PROMPTS} prompts x {G} completions per step, at most {NEW} new tokens, temperature {TEMP}, "
            "loss grpo, beta 0, lr 1e-4 cosine; TRL's GRPOTrainer with bf16=False and its own generation (no vLLM on "
            "CPU), with and without gradient checkpointing (its default is with). Rows ran in this order, each in its "
            "own process after an fp32 2048x2048 matmul measurement (the machine's speed drifts). Sequence tokens: "
            "prompt + completion of every completion (TRL's `num_tokens`; sftkit computes each prompt once per group "
            "but counts it per completion here, the same way); completion tokens: sampled and trained. Times over the "
            "steps after the first. Held-out pass rate: greedy replies to the 100 prompts of examples/arith/eval.jsonl, "
            "both tools' models scored by the same function (sftkit.tasks.rl.held_out). Target: at least 3x TRL's "
            "tokens/s at no more than half its peak memory, the same pass rate within noise (one run each: a binomial "
            "standard error of about 0.05 at 100 prompts)."
            + (f" sftkit spent {share:.0%} of its step time generating." if share else "") + "\n\n" + "\n".join(lines))
    print(body)
    print(f"wrote {update_section('RL (GRPO) throughput against TRL', body)}")


if __name__ == "__main__":
    main()
