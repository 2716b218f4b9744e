"""DPO whole runs, sftkit beside TRL's DPOTrainer, on the embedded SmolLM2-135M-Instruct.

    .venv/bin/python benchmarks/dpo_whole_run.py [--train 240] [--only NAME ...]   # writes docs/dpo-vs-trl.md

Arithmetic preference pairs ("What is 37 + 48?": the right sum against a near miss), made here with a
fixed seed. Every run: LoRA r=16, alpha 32, all linear layers, no dropout, DPO (sigmoid) beta 0.1,
lr 2e-4, batch 8, one epoch, from the same base model, which is also the reference (the adapter off).
Each final model is scored by the same function on the same held-out pairs: preference accuracy =
the chosen reply has a higher summed log-probability than the rejected one, after the chat template.

Rows: sftkit with its defaults, sftkit with the settings it had before (cosine schedule, pairs
grouped by length), and TRL with its defaults for what is not named above (linear decay, no warmup, its own
random order). Run one heavy job at a time: the times are only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, matmul_gflops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "dpo-vs-trl"
COMMON = {"task": "preference", "model.name": "smollm2-135m", "peft.method": "lora", "peft.r": 16, "peft.alpha": 32,
          "peft.dropout": 0.0, "preference.loss": "dpo", "preference.beta": 0.1, "train.lr": 2e-4,
          "train.batch_size": 8, "train.epochs": 1, "train.seed": 42, "eval.reference": None, "data.max_length": 256}
VARIANTS = {
    "sftkit (defaults: pairs in random order, linear schedule)": {},
    "sftkit, cosine schedule (the SFT default)": {"train.schedule": "cosine"},
    "sftkit, cosine schedule, pairs grouped by length (the defaults before this comparison)":
        {"train.schedule": "cosine", "train.group_by_length": True},
}


def make_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        wrong = a + b + rng.choice([-10, -1, 1, 10])
        rows.append({"prompt": f"What is {a} + {b}? Answer with the number only.", "chosen": str(a + b),
                     "rejected": str(wrong)})
    return rows


def accuracy(model, tok, eval_path: Path) -> float:
    import torch

    from sftkit.config import load_config
    from sftkit.data import renderer_for
    from sftkit.data.pairs import read_pairs
    from sftkit.data.sources import ReadStats
    from sftkit.tasks.preference import build_pairs, preference_accuracy

    cfg = load_config(None, {"data.train": str(eval_path), "data.eval_fraction": 0, "data.max_length": 256})
    pairs, _ = read_pairs(cfg, ReadStats())
    exs, _ = build_pairs(pairs, renderer_for(cfg.data, tok))
    return preference_accuracy(model, exs, tok.pad_token_id, torch.device("cpu"), 16)


def run_sftkit(name: str, over: dict, train_path: Path, eval_path: Path) -> dict:
    from sftkit.config import load_config
    from sftkit.models import load_model
    from sftkit.trainer import train

    out = OUT / ("sftkit-" + str(abs(hash(name)) % 10_000))
    cfg = load_config(None, {**COMMON, **over, "data.train": str(train_path), "data.eval": str(eval_path),
                             "output_dir": str(out)})
    t0 = time.time()
    result = train(cfg, overwrite=True)
    seconds = time.time() - t0
    model, tok = load_model(str(out / "final" / "model"), "float32")
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    return {"accuracy": accuracy(model, tok, eval_path), "seconds": seconds, "steps": result.steps, "losses": losses}


def run_trl(train_rows: list[dict], eval_path: Path) -> dict:
    import trl
    from datasets import Dataset
    from peft import LoraConfig

    from sftkit.models import load_model

    def chat(r):  # conversational rows: TRL applies the chat template, as sftkit does
        return {"prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}]}

    model, tok = load_model("smollm2-135m", "float32")
    args = trl.DPOConfig(output_dir=str(OUT / "trl"), per_device_train_batch_size=8, num_train_epochs=1,
                         learning_rate=2e-4, beta=0.1, loss_type=["sigmoid"], bf16=False, use_cpu=True, report_to=[],
                         logging_steps=1, save_strategy="no", max_length=256, seed=42)
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    t = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list([chat(r) for r in train_rows]),
                       processing_class=tok, peft_config=peft_cfg)
    t0 = time.time()
    t.train()
    seconds = time.time() - t0
    merged = t.model.merge_and_unload().eval()
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    return {"accuracy": accuracy(merged, tok, eval_path), "seconds": seconds, "steps": t.state.global_step,
            "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=240, help="training pairs (one epoch of batch 8)")
    ap.add_argument("--eval", type=int, default=200, help="held-out pairs")
    ap.add_argument("--only", nargs="*", help="run only the rows whose name starts with one of these")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rows = make_pairs(args.train + args.eval, seed=0)
    train_path, eval_path = OUT / "train.jsonl", OUT / "eval.jsonl"
    train_path.write_text("".join(json.dumps(r) + "\n" for r in rows[: args.train]))
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in rows[args.train :]))
    from sftkit.models import load_model

    gflops = matmul_gflops()
    # Rows measured by an earlier invocation (--only runs some) are kept, each with its day's matmul figure.
    store = OUT / f"results-{args.train}.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    base, tok = load_model("smollm2-135m", "float32")
    results["base model (no training)"] = {"accuracy": accuracy(base.eval(), tok, eval_path), "gflops": gflops}
    del base
    names = list(VARIANTS) + ["TRL DPOTrainer"]
    for name in names:
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        results[name] = run_trl(rows[: args.train], eval_path) if name.startswith("TRL") else \
            run_sftkit(name, VARIANTS[name], train_path, eval_path)
        r = results[name]
        r["gflops"] = gflops
        store.write_text(json.dumps(results, indent=1))
        print(f"{name}: accuracy {r['accuracy']:.3f}, {r['steps']} steps in {r['seconds']:.0f} s", flush=True)
    order = ["base model (no training)"] + names
    results = {k: results[k] for k in order if k in results}
    lines = ["| run | held-out preference accuracy | steps | training s | first / last step loss | matmul GFLOP/s that run |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        ls = r.get("losses") or []
        trained = f"{r['steps']} | {r['seconds']:.0f} | {ls[0]:.4f} / {ls[-1]:.4f}" if ls else "- | - | -"
        lines.append(f"| {name} | {r['accuracy']:.3f} | {trained} | {r.get('gflops', 0):.0f} |")
    body = "\n".join([
        "# DPO whole runs: sftkit beside TRL", "",
        f"Generated by `.venv/bin/python benchmarks/dpo_whole_run.py --train {args.train}` on {machine()}; rows may "
        "come from more than one invocation (`--only`), each with the fp32 2048x2048 matmul rate measured before it. "
        "Times are comparable only between rows of one invocation.", "",
        f"{args.train} arithmetic preference pairs (`What is 37 + 48?`: the sum against a near miss, +-1 or +-10), "
        f"{args.eval} held out. Every run: LoRA r=16, alpha 32, all linear layers, DPO beta 0.1, lr 2e-4, batch 8, one "
        "epoch, the base model as the reference. Accuracy: the chosen reply has the higher summed log-probability, "
        "scored by one function for every row. 200 held-out pairs: one pair is 0.005, and the standard error of an "
        "accuracy near 0.8 is about 0.028.", "", *lines, "",
        "Where a whole run could differ from TRL's: the mechanics do not (five steps of full fine-tuning on the whole "
        "set, so the order of rows cannot differ, give TRL's loss, learning rate, gradient norm and margin at every "
        "step, with its linear schedule and with cosine (with warmup sftkit's first step is at lr/warmup, transformers' at 0): `tests/integration/test_preference.py::"
        "test_a_whole_short_run_follows_trl_dpo_trainer_step_for_step`). What differed were two defaults: the order "
        "of pairs (sftkit grouped pairs of like length into a step, as it does for SFT to save padding, which a "
        "packed preference pass does not need, and which makes a step's pairs alike) and the schedule (cosine "
        "against TRL's linear decay). `task: preference` now takes pairs in random order and decays linearly unless "
        "the config says otherwise; the differences left (0.805 / 0.810 / 0.815) are within one or two pairs.", ""])
    (ROOT / "docs" / "dpo-vs-trl.md").write_text(body)
    print(body)


if __name__ == "__main__":
    main()
