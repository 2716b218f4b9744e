"""Training throughput and memory: sftkit against TRL's SFTTrainer, same model, data and steps.

    .venv/bin/python benchmarks/throughput.py                 # every row, writes docs/benchmarks.md
    .venv/bin/python benchmarks/throughput.py --only sftkit-lora-packed --steps 3
    python benchmarks/throughput.py --device cuda --steps 30 --warmup 5    # GPU: bf16, TRL with Liger

Each row runs in a fresh process (peak RSS is per process). The data is real English text: the
Python documentation topics that ship with CPython (`pydoc_data`), cut into prompt/completion
pairs whose token lengths have a median near 150 and a 90th percentile near 350. Both tools train
SmolLM2-135M in fp32 with the same LoRA (r=16, alpha=32, all linear layers), batch 8, max_length
512, lr 2e-4, and render the rows the same way (prompt + completion + eos, loss on the completion:
tests/integration/test_trl_parity.py proves the labels equal). Throughput counts real (non-pad)
tokens per second over the steps after the first `--warmup` (one-time warm-up: allocator,
kernel compilation). After training, every row's model is scored with the same function on the
same held-out rows, so the loss column compares like with like.

On a GPU (`--device cuda`) both tools train in bf16 (sftkit's `model.dtype: auto`, TRL's
`bf16=True` on a bf16 model), TRL also with its Liger kernels (`use_liger_kernel=True`), and
the memory column is the peak GPU memory PyTorch allocated. `--model` takes any model directory;
`--random-weights` trains a freshly initialised copy of its architecture instead of its weights
(throughput does not depend on the values; for machines that hold only a config and tokenizer).
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

CPU_ROWS = {
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
# On a GPU: TRL at its fastest (no gradient checkpointing: memory is plentiful for these models), with
# and without Liger kernels, and at its default (checkpointing on); sftkit likewise.
GPU_ROWS = {
    "sftkit-lora-padded": ("sftkit", {"peft.method": "lora"}),
    "sftkit-lora-packed": ("sftkit", {"peft.method": "lora", "data.pack": True}),
    "sftkit-lora-packed-ckpt": ("sftkit", {"peft.method": "lora", "data.pack": True, "train.checkpointing": True}),
    "sftkit-full-packed": ("sftkit", {"peft.method": "full", "data.pack": True}),
    "trl-lora-padded": ("trl", {"packing": False, "gradient_checkpointing": False}),
    "trl-lora-packed": ("trl", {"packing": True, "gradient_checkpointing": False}),
    "trl-lora-padded-liger": ("trl", {"packing": False, "gradient_checkpointing": False, "use_liger_kernel": True}),
    "trl-lora-packed-liger": ("trl", {"packing": True, "gradient_checkpointing": False, "use_liger_kernel": True}),
    "trl-lora-packed-ckpt": ("trl", {"packing": True, "gradient_checkpointing": True}),
    "trl-full-packed-liger": ("trl", {"packing": True, "gradient_checkpointing": False, "use_liger_kernel": True,
                                      "full": True}),
}


def rows_for(device: str) -> dict:
    return GPU_ROWS if device == "cuda" else CPU_ROWS


def random_weights_copy(model: str) -> str:
    """A freshly initialised model of `model`'s architecture (seed 0) with its tokenizer, saved once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftkit.models import load_tokenizer, resolve

    target = WORK / ("random-" + Path(model).name)
    if not (target / "model.safetensors").is_file():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve(model))).save_pretrained(target)
        load_tokenizer(model).save_pretrained(target)
    return str(target)


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


def peak_memory() -> dict:
    import torch

    out = {"peak_rss_mb": peak_rss_mb()}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# -- one row, in its own process ------------------------------------------------------------------
def run_sftkit(name: str, settings: dict, opts, train: Path, held: Path) -> dict:
    from sftkit.config import load_config
    from sftkit.trainer import train as sft_train

    cfg = load_config(None, {"model.name": opts.model, "data.train": str(train), "data.template": "plain",
                             "data.max_length": MAX_LENGTH, "peft.r": 16, "peft.alpha": 32,
                             "train.batch_size": opts.batch, "train.lr": LR, "train.max_steps": opts.steps,
                             "output_dir": str(WORK / name), **settings})
    result = sft_train(cfg, overwrite=True)
    records = [json.loads(line) for line in open(WORK / name / "metrics.jsonl")]
    timed = records[opts.warmup:]
    tokens = sum(r["tokens"] for r in timed)
    seconds = sum(r["step_seconds"] for r in timed)
    return {"tokens_per_s": tokens / seconds, "s_per_step": seconds / len(timed),
            "tokens_per_step": tokens / len(timed), "train_loss": records[-1]["loss"],
            "heldout_loss": heldout_loss(result.model, _tok(opts.model), held), **peak_memory()}


def _tok(model: str = MODEL):
    from sftkit.models import load_tokenizer

    return load_tokenizer(model)


def run_trl(name: str, settings: dict, opts, train: Path, held: Path) -> dict:
    import datasets
    import torch
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback

    from sftkit.models import resolve

    path = resolve(opts.model)
    tok = _tok(opts.model)
    times: list[float] = []
    gpu = opts.device == "cuda"
    settings = dict(settings)
    full = settings.pop("full", False)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    args = trl.SFTConfig(output_dir=str(WORK / name), per_device_train_batch_size=opts.batch, max_length=MAX_LENGTH,
                         learning_rate=LR, max_steps=opts.steps, logging_steps=1, report_to=[], bf16=gpu,
                         use_cpu=not gpu, save_strategy="no", dataloader_num_workers=0, **settings)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if gpu else torch.float32)
    peft_config = None if full else LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=tok,
                             train_dataset=datasets.load_dataset("json", data_files=str(train), split="train"),
                             peft_config=peft_config, callbacks=[Clock()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    tokens = [h["num_tokens"] for h in logs]  # cumulative real (non-pad) tokens, as TRL counts them
    # times[k] ends step k+1; tokens[k] counts through step k+1: time steps warmup+1..last.
    w = opts.warmup - 1
    seconds, n = times[-1] - times[w], len(times) - 1 - w
    return {"tokens_per_s": (tokens[-1] - tokens[w]) / seconds, "s_per_step": seconds / n,
            "tokens_per_step": (tokens[-1] - tokens[w]) / n, "train_loss": logs[-1]["loss"],
            "heldout_loss": heldout_loss(trainer.model, tok, held), **peak_memory()}


def child(name: str, opts) -> None:
    tool, settings = rows_for(opts.device)[name]
    train, held = WORK / "train.jsonl", WORK / "heldout.jsonl"
    fn = run_sftkit if tool == "sftkit" else run_trl
    print("RESULT " + json.dumps(fn(name, settings, opts, train, held)), flush=True)


# -- the table ------------------------------------------------------------------------------------
def data_stats(train: Path, model: str) -> str:
    from sftkit.data.quality import percentile
    from sftkit.data.render import Renderer, build_examples
    from sftkit.data.sources import load_rows

    exs, _ = build_examples(load_rows(str(train)), Renderer(_tok(model), template="plain", max_length=MAX_LENGTH))
    lengths = [len(e.input_ids) for e in exs]
    return (f"{len(exs)} rows, tokens per row p50 {percentile(lengths, 50)}, p90 {percentile(lengths, 90)}, "
            f"max {max(lengths)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when there is one")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per row (default 4 on CPU, 30 on GPU)")
    ap.add_argument("--warmup", type=int, default=None, help="first steps not timed (default 1 on CPU, 5 on GPU)")
    ap.add_argument("--batch", type=int, default=BATCH, help="samples (packed: rows) per optimizer step")
    ap.add_argument("--model", default=MODEL, help="alias or model directory (default: the embedded SmolLM2-135M)")
    ap.add_argument("--random-weights", action="store_true",
                    help="train a freshly initialised model of --model's architecture (needs only its config)")
    ap.add_argument("--only", nargs="*", help="rows to run (default: all)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    args.steps = args.steps or (30 if gpu else 4)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    if not 1 <= args.warmup < args.steps:
        ap.error("--warmup must be at least 1 and below --steps")
    if args.child:
        child(args.child, args)
        return
    rows = rows_for(args.device)
    train, _ = make_data()
    args.model_arg = args.model
    if args.random_weights:
        args.model = random_weights_copy(args.model)
    names = args.only or list(rows)
    try:
        import trl  # noqa: F401
    except ImportError:
        names = [n for n in names if rows[n][0] != "trl"]
        print("trl is not installed (pip install -e '.[bench]'): sftkit rows only", file=sys.stderr)
    results = {}
    # Rows kept from earlier invocations join the table only when measured with the same settings.
    setting = {"steps": args.steps, "warmup": args.warmup, "batch": args.batch, "model": args.model_arg,
               "random_weights": args.random_weights}
    saved_dir = WORK / ("results" if not gpu else "results-cuda")
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        t0 = time.time()
        p = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--warmup",
                            str(args.warmup), "--batch", str(args.batch), "--model", args.model, "--device", args.device],
                           capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            print(p.stderr[-3000:], file=sys.stderr)
            results[name] = {"error": (p.stderr.strip().splitlines() or ["failed"])[-1][:200]}
            continue
        results[name] = json.loads(line[len("RESULT "):])
        results[name].update(setting)
        saved_dir.mkdir(exist_ok=True)
        (saved_dir / f"{name}.json").write_text(json.dumps(results[name]))
        print(f"   {results[name]} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    # The table holds every row measured so far (rows not re-run come from runs/bench/results/).
    for name in rows:
        saved = saved_dir / f"{name}.json"
        if name not in results and saved.exists():
            old = json.loads(saved.read_text())
            if {k: old.get(k) for k in setting} == setting:
                results[name] = old
    write_table({n: results[n] for n in rows if n in results}, args, train)


def method_of(row: str) -> str:
    return next((m for m in ("full", "qlora") if f"-{m}-" in row), "lora")


def write_table(results: dict, args, train: Path) -> None:
    gpu = args.device == "cuda"
    ok = {k: v for k, v in results.items() if "error" not in v}
    trl = {k: v for k, v in ok.items() if k.startswith("trl")}
    # Each row against TRL's fastest row of the same method (TRL's LoRA where TRL has no such row).
    best = {m: max((v["tokens_per_s"] for k, v in trl.items() if method_of(k) == m), default=None)
            for m in ("lora", "full", "qlora")}
    mem_key, mem_name = ("peak_gpu_mb", "peak GPU memory") if gpu else ("peak_rss_mb", "peak RSS")
    head = (f"| row | real tokens/s | s/step | real tokens/step | {mem_name} (MB) | train loss (last step) | held-out loss "
            "| vs TRL's best (same method) |")
    lines = [head, "|" + "---|" * 8]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |" + " |" * 7)
            continue
        ref = best[method_of(name)] or best["lora"]
        speed = f"{r['tokens_per_s'] / ref:.2f}x" if ref else "-"
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['s_per_step']:.3f} | {r['tokens_per_step']:.0f} | "
                     f"{r[mem_key]:.0f} | {r['train_loss']:.4f} | {r['heldout_loss']:.4f} | {speed} |")
    table = "\n".join(lines)
    print("\n" + table)
    model = "SmolLM2-135M" if args.model == MODEL else f"`{Path(args.model).name}`"
    if gpu:
        setting = (f"Every row: {model} in bf16, batch {args.batch}, max_length {MAX_LENGTH}, lr {LR}, {args.steps} optimizer "
                   f"steps (the first {args.warmup} untimed), LoRA r=16 alpha=32 on all linear layers unless the row "
                   "says full. TRL rows: SFTTrainer with `bf16=True` on the bf16 model, without gradient "
                   "checkpointing (its fastest setting here), with and without `use_liger_kernel=True` (-liger rows); "
                   "TRL's default turns checkpointing on (-ckpt row). Memory: `torch.cuda.max_memory_allocated` "
                   "over the whole process.")
    else:
        setting = (f"Every row: {model} fp32, batch {args.batch}, max_length {MAX_LENGTH}, lr {LR}, {args.steps} optimizer "
                   f"steps (the first {args.warmup} untimed), LoRA r=16 alpha=32 on all linear layers unless the row "
                   "says full/qlora. TRL rows: SFTTrainer with `bf16=False`; TRL's default is "
                   "`gradient_checkpointing=True` (the -ckpt rows), shown beside its faster setting without it.")
    if args.random_weights:
        setting += " Weights: a fresh random initialisation of the model's architecture (`--random-weights`)."
    command = "python benchmarks/throughput.py" if gpu else ".venv/bin/python benchmarks/throughput.py"
    for flag, value, default in (("--device", args.device, "cpu"), ("--steps", args.steps, 4),
                                 ("--warmup", args.warmup, 1), ("--batch", args.batch, BATCH)):
        if value != default:
            command += f" {flag} {value}"
    if args.random_weights:
        command += f" --model {args.model_arg} --random-weights"
    if args.only:
        command += " --only " + " ".join(args.only)
    text = [
        f"Machine: {machine()}.  ",
        f"Data: {data_stats(train, args.model)} (Python documentation text, `benchmarks/throughput.py`).  ",
        setting + " Held-out loss: the same function scores every row's final model on the same 40 held-out rows.",
        "", f"Command: `{command}`", "", table, "",
    ]
    if best["lora"]:
        low = min(v[mem_key] for k, v in trl.items() if method_of(k) == "lora")
        text.append(f"TRL's best LoRA real tokens/s: {best['lora']:.1f}; TRL's lowest LoRA {mem_name}: {low:.0f} MB.")
    title = ("Training throughput on a GPU against TRL with Liger kernels" if gpu
             else "Training throughput and memory against TRL")
    out = update_section(title, "\n".join(text), Path(args.out))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
