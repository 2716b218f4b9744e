"""Does NEFTune help? The bundled SFT examples trained with and without `train.neftune_alpha`.

    .venv/bin/python benchmarks/neftune.py [--alpha 5] [--tasks dates tools]

Runs, one after another (never two at once), each a real `sftkit train` on the embedded SmolLM2-135M
with LoRA, the config as shipped plus `eval.generate: true`:
  dates   configs/quickstart.yaml (`make demo`'s task), exact match on the 200 held-out rows
  tools   configs/tools.yaml (examples/make_tools.py), the `tool_call` metric on 80 held-out questions
          (the call parses and names the right tool with the right arguments); the base model's
          score comes with the run without NEFTune
Every run has the same seed, so the runs of a task differ by the noise alone. With NEFTune each
example draws its own noise, so the packed examples cannot share the tools' 420-token system turn
(data.share_prefix is off): the tools run with it takes about 3x as long (~15 min here). Writes the
section "NEFTune" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, matmul_gflops, update_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench-neftune"
TASKS = {
    "dates": ["configs/quickstart.yaml", "eval.generate=true", "eval.max_new_tokens=12", "eval.batch_size=200",
              "eval.metric=exact_match"],
    "tools": ["configs/tools.yaml"],
}


def run(task: str, alpha: float, base: bool) -> dict:
    out = WORK / f"{task}-{alpha:g}"
    args = [sys.executable, "-m", "sftkit", "train", *TASKS[task], f"train.neftune_alpha={alpha}",
            f"eval.compare_base={'true' if base else 'false'}", f"output_dir={out}", "--overwrite"]
    t = time.time()
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    return {"seconds": time.time() - t, "metric": summary["metric"], **summary["scores"],
            "eval_loss": summary.get("eval_loss")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alpha", type=float, default=5.0)
    ap.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    opts = ap.parse_args()
    subprocess.run([sys.executable, "examples/make_tools.py"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    gflops = matmul_gflops()
    rows = []
    for task in opts.tasks:
        plain = run(task, 0.0, base=True)
        noisy = run(task, opts.alpha, base=False)
        rows.append((task, plain, noisy))
        print(task, plain, noisy, flush=True)
    lines = [f"| task | metric | base | plain SFT | NEFTune alpha {opts.alpha:g} | eval loss plain / NEFTune |",
             "|---|---|---|---|---|---|"]
    for task, plain, noisy in rows:
        lines.append(f"| {task} | {plain['metric']} | {plain.get('base', float('nan')):.3f} | {plain['tuned']:.3f} | "
                     f"{noisy['tuned']:.3f} | {plain['eval_loss']:.4f} / {noisy['eval_loss']:.4f} |")
    body = (f"`.venv/bin/python benchmarks/neftune.py --alpha {opts.alpha:g}` on {machine()} (matmul {gflops:.0f} "
            "GFLOP/s before it): the shipped configs with `eval.generate: true`, one run each with and without "
            "`train.neftune_alpha`, the same seed.\n\n" + "\n".join(lines))
    print(body)
    print(f"wrote {update_section('NEFTune', body)}")


if __name__ == "__main__":
    main()
