"""Where one training step's time goes: torch.profiler over a packed LoRA step of the throughput benchmark.

    .venv/bin/python benchmarks/profile_step.py                  # LoRA, packed, as sftkit trains it
    .venv/bin/python benchmarks/profile_step.py --method qlora

Uses the same data, model and settings as benchmarks/throughput.py (run that once first, or this
makes the data), times a few steps without the profiler, then profiles one and prints the time per
operator and the share of the step it takes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import BATCH, MAX_LENGTH, MODEL, WORK, make_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="lora", choices=["lora", "qlora", "full"])
    ap.add_argument("--rows", type=int, default=25, help="operators to list")
    args = ap.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from sftkit.attention import use_packed_attention
    from sftkit.config import PeftConfig, load_config
    from sftkit.data.packing import Batcher
    from sftkit.data.render import Renderer, build_examples
    from sftkit.data.sources import load_rows
    from sftkit.loss import token_loss
    from sftkit.models import apply_method, load_model
    from sftkit.tasks.sft import forward_tokens

    train = WORK / "train.jsonl"
    if not train.exists():
        train, _ = make_data()
    model, tok = load_model(MODEL, load_in_4bit=args.method == "qlora")
    print("attention:", use_packed_attention(model))
    model = apply_method(model, PeftConfig(method=args.method, r=16, alpha=32)).train()  # as the trainer runs it
    exs, _ = build_examples(load_rows(str(train)), Renderer(tok, template="plain", max_length=MAX_LENGTH))
    passes = forward_tokens(load_config(None, {"model.name": MODEL, "data.train": str(train)}))
    batcher = Batcher(exs, BATCH, 1, 0, tok.pad_token_id, pack=True, max_length=MAX_LENGTH, max_forward_tokens=passes)

    def step(s: int) -> tuple[int, float]:
        t0, n = time.perf_counter(), 0
        for mb in batcher.micro_batches(s):
            token_loss(model, mb).loss.backward()
            n += int(mb["real_tokens"])
        model.zero_grad(set_to_none=True)
        return n, time.perf_counter() - t0

    step(0)  # warm-up
    for s in (1, 2, 3):
        n, sec = step(s)
        print(f"step {s}: {n} tokens in {sec:.1f} s = {n / sec:.0f} tokens/s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        n, sec = step(4)
    print(f"profiled step: {n} tokens in {sec:.1f} s (profiler overhead included)")
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    print("\n| operator | self time (s) | share | calls |\n|---|---|---|---|")
    for e in events[: args.rows]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / total:.1%} | {e.count} |")


if __name__ == "__main__":
    main()
