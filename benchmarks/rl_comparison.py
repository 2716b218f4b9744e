"""After SFT, RL or DPO? Held-out pass rate of the bundled RL example for five ways of spending the budget.

    .venv/bin/python benchmarks/rl_comparison.py [--keep]   # --keep: reuse runs an earlier invocation finished

On examples/arith (two-digit sums; the reward `number_match`: 1 when the reply's last number is the
sum), with the embedded SmolLM2-135M and LoRA r=16 everywhere, one run after another (never two at
once), each a real `sftkit train`:

  base          the starting model
  base + GRPO   configs/rl-arith.yaml: 30 steps x 4 prompts x 8 sampled completions = 960 completions
  SFT           configs/sft-arith.yaml: the 400 training prompts with the right sum, one epoch
  SFT + GRPO    configs/rl-arith.yaml started from the SFT model
  DPO (best of n) the same budget offline: 960 completions sampled from the base model (120 prompts x 8,
                the same temperature and length), each scored by number_match; a right vs a wrong one of
                the same prompt makes a pair (best vs worst of its 8); task: preference (DPO + the chosen
                replies' NLL, as configs/compare-dpo.yaml) for 30 steps on those pairs

Every pass rate is the same function: greedy replies to the 100 held-out prompts of
examples/arith/eval.jsonl, scored by number_match (sftkit.tasks.rl.held_out, which the RL runs' own
evals and `sftkit compare` use). Writes the section "RL against SFT and DPO" of docs/benchmarks.md.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, matmul_gflops, update_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench-rl-comparison"
ARITH = ROOT / "examples" / "arith"
SFTKIT = [sys.executable, "-m", "sftkit"]
BUDGET_PROMPTS, G, NEW, TEMP = 120, 8, 16, 0.8


KEEP = "--keep" in sys.argv  # reuse a finished run of an earlier invocation (the runs are deterministic)


def train(args: list[str]) -> float:
    out = Path(next(a for a in args if a.startswith("output_dir=")).split("=", 1)[1])
    if KEEP and (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())["seconds"]
    t = time.time()
    subprocess.run([*SFTKIT, "train", *args, "--overwrite"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.time() - t


def pass_rate(model_dir: Path) -> float:
    """Greedy held-out pass rate of a model directory, in a fresh process (one heavy job at a time)."""
    code = ("import sys, json; sys.path.insert(0, 'benchmarks'); from rl_throughput import pass_rate; "
            "from sftkit.models import load_model; m, t = load_model(sys.argv[1], 'float32')[:2]; "
            "print('RATE', pass_rate(m, t))")
    out = subprocess.run([sys.executable, "-c", code, str(model_dir)], check=True, cwd=ROOT, capture_output=True,
                         text=True).stdout
    return float(next(x for x in out.splitlines() if x.startswith("RATE")).split()[1])


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())["scores"]


def best_of_n_pairs(out: Path) -> tuple[int, int]:
    """Samples the budget from the base model and writes best-vs-worst pairs; (completions, pairs)."""
    from sftkit.config import DataConfig
    from sftkit.data import renderer_for
    from sftkit.generate import best_of_n
    from sftkit.models import load_model
    from sftkit.rewards import number_match

    rows = [json.loads(x) for x in open(ARITH / "train.jsonl")]
    rows = random.Random(0).sample(rows, BUDGET_PROMPTS)
    model, tok = load_model("smollm2-135m", "float32")[:2]
    renderer = renderer_for(DataConfig(), tok)
    prompts = [(r, [{"role": "user", "content": r["prompt"]}]) for r in rows]

    def score(items: list) -> list[float]:  # G replies of each prompt in a row, as best_of_n asks them
        answers = [rows[i // G]["answer"] for i in range(len(items))]
        return number_match([p for p, _ in items], [[r[0]] for _, r in items], answer=answers)

    pairs = best_of_n(model, renderer, prompts, score, G, str(out / "best.jsonl"), str(out / "pairs.jsonl"),
                      max_new_tokens=NEW, batch_size=64, temperature=TEMP)
    return len(rows) * G, pairs


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    gflops = matmul_gflops()
    t0 = time.time()
    results: dict[str, dict] = {}
    seconds = train(["configs/rl-arith.yaml", f"output_dir={WORK / 'grpo'}"])
    s = summary(WORK / "grpo")
    results["base"] = {"rate": s["base"], "how": "-"}
    results["base + GRPO"] = {"rate": s["tuned"], "how": f"30 RL steps, 960 sampled completions, {seconds:.0f} s"}
    print(results, flush=True)

    seconds = train(["configs/sft-arith.yaml", f"output_dir={WORK / 'sft'}"])
    results["SFT"] = {"rate": pass_rate(WORK / "sft" / "final" / "model"),
                      "how": f"1 epoch of the 400 training prompts with their answers (50 steps), {seconds:.0f} s"}
    print(results, flush=True)

    seconds = train(["configs/rl-arith.yaml", f"model.name={WORK / 'sft' / 'final' / 'model'}",
                     f"output_dir={WORK / 'sft-grpo'}"])
    s = summary(WORK / "sft-grpo")
    results["SFT + GRPO"] = {"rate": s["tuned"], "how": f"the SFT model, then 30 RL steps (base {s['base']:.2f}), "
                                                         f"{seconds:.0f} s"}
    print(results, flush=True)

    (WORK / "dpo").mkdir(exist_ok=True)
    t = time.time()
    budget, pairs = best_of_n_pairs(WORK / "dpo")
    sampling = time.time() - t
    dpo = ["configs/compare-dpo.yaml", "model.name=smollm2-135m", f"data.train={WORK / 'dpo' / 'pairs.jsonl'}",
           "data.eval=null", "train.max_steps=30", "train.eval_every=0", f"output_dir={WORK / 'dpo-run'}"]
    seconds = train(dpo)
    results["DPO on best-of-n pairs"] = {
        "rate": pass_rate(WORK / "dpo-run" / "final" / "model"),
        "how": f"{budget} completions sampled from the base model ({sampling:.0f} s), {pairs} right-vs-wrong pairs, "
               f"30 DPO steps ({seconds:.0f} s)"}
    print(results, flush=True)

    lines = ["| model | held-out pass rate | how |", "|---|---|---|"]
    lines += [f"| {k} | {v['rate']:.2f} | {v['how']} |" for k, v in results.items()]
    body = (f"`.venv/bin/python benchmarks/rl_comparison.py` on {machine()} (fp32 2048x2048 matmul {gflops:.0f} "
            f"GFLOP/s before it; {time.time() - t0:.0f} s in all). examples/arith, SmolLM2-135M, LoRA r=16; pass "
            "rate: greedy replies to 100 held-out sums scored by number_match (one run each: a binomial standard "
            "error of about 0.05).\n\n" + "\n".join(lines))
    print(body)
    print(f"wrote {update_section('RL against SFT and DPO', body)}")


if __name__ == "__main__":
    main()
