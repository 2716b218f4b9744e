"""Training throughput and memory: sftkit against TRL's SFTTrainer, same model, data and steps.

    .venv/bin/python benchmarks/throughput.py                 # every row, writes docs/benchmarks.md
    .venv/bin/python benchmarks/throughput.py --only sftkit-lora-packed --steps 3

Each row runs in a fresh process (peak RSS is per process). The data is real English text: the
Python documentation topics that ship with CPython (`pydoc_data`), cut into prompt/completion
pairs whose token lengths have a median near 150 and a 90th percentile near 350. Both tools train
SmolLM2-135M in fp32 with the same LoRA (r=16, alpha=32, all linear layers), batch 8, max_length
512, lr 2e-4, and render the rows the same way (prompt + completion + eos, loss on the completion:
tests/integration/test_trl_parity.py proves the labels equal). Throughput counts real (non-pad)
tokens per second over the steps after the first (the first includes one-time warm-up). After
training, every row's model is scored with the same function on the same held-out rows, so the
loss column compares like with like.
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
from _common import machine, update_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench"
MODEL = "smollm2-135m"
MAX_LENGTH, BATCH, LR = 512, 8, 2e-4

ROWS = {
    # name: (tool, settings)
    "sftkit-lora-padded": ("sftkit", {"peft.method": "lora"}),
    "sftkit-lora-packed": ("sftkit", {"peft.method": "lora", "data.pack": True}),
    "sftkit-full-packed": ("sftkit", {"peft.method": "full", "data.pack": True}),
    "sftkit-qlora-packed": ("sftkit", {"peft.method": "qlora", "data.pack": True}),
    "sftkit-lora-packed-ckpt": ("sftkit", {"peft.method": "lora", "data.pack": True, "train.checkpointing": True}),
    "trl-lora-padded": ("trl", {"packing": False, "gradient_checkpointing": False}),
    "trl-lora-packed": ("trl", {"packing": True, "gradient_checkpointing": False}),
    "trl-lora-packed-ckpt": ("trl", {"packing": True, "gradient_checkpointing": True}),
    "trl-lora-padded-ckpt": ("trl", {"packing": False, "gradient_checkpointing": True}),
}


# -- data -----------------------------------------------------------------------------------------
def make_data() -> tuple[Path, Path]:
    """Real text cut into prompt/completion rows; deterministic."""
    import pydoc_data.topics as topics

    WORK.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = []
    for name, text in sorted(topics.topics.items()):
        paras = [p.strip() for p in text.split("\n\n") if p.strip()]
        chunk: list[str] = []
        target = rng.lognormvariate(6.4, 0.65)  # characters: median ~600 (~150 tokens), p90 ~1400
        for p in paras:
            chunk.append(p)
            if sum(len(c) for c in chunk) >= target:
                rows.append({"prompt": f"Python documentation, topic '{name}':\n", "completion": "\n\n".join(chunk)})
                chunk, target = [], rng.lognormvariate(6.4, 0.65)
    rng.shuffle(rows)
    train, held = rows[:-40], rows[-40:]
    paths = WORK / "train.jsonl", WORK / "heldout.jsonl"
    for path, data in zip(paths, (train, held)):
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return paths


def heldout_loss(model, tok, held: Path) -> float:
    """The same scoring for every row: mean loss per trained token on the held-out rows."""
    from sftkit.data.render import Renderer, build_examples
    from sftkit.data.sources import load_rows
    from sftkit.evaluate import loss_metrics

    exs, _ = build_examples(load_rows(str(held)), Renderer(tok, template="plain", max_length=MAX_LENGTH))
    return loss_metrics(model, exs, 8, tok.pad_token_id)["eval_loss"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- one row, in its own process ------------------------------------------------------------------
def run_sftkit(name: str, settings: dict, steps: int, train: Path, held: Path) -> dict:
    from sftkit.config import load_config
    from sftkit.trainer import train as sft_train

    cfg = load_config(None, {"model.name": MODEL, "data.train": str(train), "data.template": "plain",
                             "data.max_length": MAX_LENGTH, "peft.r": 16, "peft.alpha": 32,
                             "train.batch_size": BATCH, "train.lr": LR, "train.max_steps": steps,
                             "output_dir": str(WORK / name), **settings})
    result = sft_train(cfg, overwrite=True)
    records = [json.loads(line) for line in open(WORK / name / "metrics.jsonl")]
    timed = records[1:]
    tokens = sum(r["tokens"] for r in timed)
    seconds = sum(r["step_seconds"] for r in timed)
    return {"tokens_per_s": tokens / seconds, "s_per_step": seconds / len(timed),
            "tokens_per_step": tokens / len(timed), "train_loss": records[-1]["loss"],
            "heldout_loss": heldout_loss(result.model, _tok(), held), "peak_rss_mb": peak_rss_mb()}


def _tok():
    from sftkit.models import load_tokenizer

    return load_tokenizer(MODEL)


def run_trl(name: str, settings: dict, steps: int, train: Path, held: Path) -> dict:
    import datasets
    import torch
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback

    from sftkit.models import resolve

    path = resolve(MODEL)
    tok = _tok()
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    args = trl.SFTConfig(output_dir=str(WORK / name), per_device_train_batch_size=BATCH, max_length=MAX_LENGTH,
                         learning_rate=LR, max_steps=steps, logging_steps=1, report_to=[], bf16=False,
                         use_cpu=True, save_strategy="no", dataloader_num_workers=0, **settings)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=tok,
                             train_dataset=datasets.load_dataset("json", data_files=str(train), split="train"),
                             peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"),
                             callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    tokens = [h["num_tokens"] for h in logs]  # cumulative real (non-pad) tokens, as TRL counts them
    seconds = times[-1] - times[0]
    del start
    return {"tokens_per_s": (tokens[-1] - tokens[0]) / seconds, "s_per_step": seconds / (len(times) - 1),
            "tokens_per_step": (tokens[-1] - tokens[0]) / (len(times) - 1), "train_loss": logs[-1]["loss"],
            "heldout_loss": heldout_loss(trainer.model, tok, held), "peak_rss_mb": peak_rss_mb()}


def child(name: str, steps: int) -> None:
    tool, settings = ROWS[name]
    train, held = WORK / "train.jsonl", WORK / "heldout.jsonl"
    fn = run_sftkit if tool == "sftkit" else run_trl
    print("RESULT " + json.dumps(fn(name, settings, steps, train, held)), flush=True)


# -- the table ------------------------------------------------------------------------------------
def data_stats(train: Path) -> str:
    from sftkit.data.quality import percentile
    from sftkit.data.render import Renderer, build_examples
    from sftkit.data.sources import load_rows

    exs, _ = build_examples(load_rows(str(train)), Renderer(_tok(), template="plain", max_length=MAX_LENGTH))
    lengths = [len(e.input_ids) for e in exs]
    return (f"{len(exs)} rows, tokens per row p50 {percentile(lengths, 50)}, p90 {percentile(lengths, 90)}, "
            f"max {max(lengths)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per row (the first is not timed)")
    ap.add_argument("--only", nargs="*", help="rows to run (default: all)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    if args.child:
        child(args.child, args.steps)
        return
    train, _ = make_data()
    names = args.only or list(ROWS)
    try:
        import trl  # noqa: F401
    except ImportError:
        names = [n for n in names if ROWS[n][0] != "trl"]
        print("trl is not installed (pip install -e '.[bench]'): sftkit rows only", file=sys.stderr)
    results = {}
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        t0 = time.time()
        p = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps)],
                           capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            print(p.stderr[-3000:], file=sys.stderr)
            results[name] = {"error": (p.stderr.strip().splitlines() or ["failed"])[-1][:200]}
            continue
        results[name] = json.loads(line[len("RESULT "):])
        results[name]["steps"] = args.steps
        (WORK / "results").mkdir(exist_ok=True)
        (WORK / "results" / f"{name}.json").write_text(json.dumps(results[name]))
        print(f"   {results[name]} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    # The table holds every row measured so far (rows not re-run come from runs/bench/results/).
    for name in ROWS:
        saved = WORK / "results" / f"{name}.json"
        if name not in results and saved.exists():
            results[name] = json.loads(saved.read_text())
    write_table({n: results[n] for n in ROWS if n in results}, args, train)


def write_table(results: dict, args, train: Path) -> None:
    ok = {k: v for k, v in results.items() if "error" not in v}
    trl_best = max((v["tokens_per_s"] for k, v in ok.items() if k.startswith("trl")), default=None)
    trl_best_rss = min((v["peak_rss_mb"] for k, v in ok.items() if k.startswith("trl")), default=None)
    head = "| row | real tokens/s | s/step | real tokens/step | peak RSS (MB) | train loss (last step) | held-out loss | vs TRL best tokens/s |"
    lines = [head, "|" + "---|" * 8]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |" + " |" * 7)
            continue
        speed = f"{r['tokens_per_s'] / trl_best:.2f}x" if trl_best else "-"
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['s_per_step']:.2f} | {r['tokens_per_step']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['train_loss']:.4f} | {r['heldout_loss']:.4f} | {speed} |")
    table = "\n".join(lines)
    print("\n" + table)
    text = [
        f"Machine: {machine()}.  ",
        f"Data: {data_stats(train)} (Python documentation text, `benchmarks/throughput.py`).  ",
        f"Every row: SmolLM2-135M fp32, batch {BATCH}, max_length {MAX_LENGTH}, lr {LR}, {args.steps} optimizer steps "
        "(first step untimed), LoRA r=16 alpha=32 on all linear layers unless the row says full/qlora. "
        "TRL rows: SFTTrainer with `bf16=False`; TRL's default is `gradient_checkpointing=True` (the -ckpt rows), "
        "shown beside its faster setting without it. Held-out loss: the same function scores every row's final "
        "model on the same 40 held-out rows.", "",
        "Command: `.venv/bin/python benchmarks/throughput.py" + (f" --steps {args.steps}" if args.steps != 4 else "")
        + (" --only " + " ".join(args.only) if args.only else "") + "`", "",
        table, "",
    ]
    if trl_best and trl_best_rss:
        text.append(f"TRL's best real tokens/s: {trl_best:.1f}; TRL's lowest peak RSS: {trl_best_rss:.0f} MB.")
    out = update_section("Training throughput and memory against TRL", "\n".join(text), Path(args.out))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
