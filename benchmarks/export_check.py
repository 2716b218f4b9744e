"""How far each export is from the model the run trained, on the embedded SmolLM2-135M.

Trains a short LoRA run on the bundled dates example (or takes --run DIR), exports it as a merged
folder and as GGUF in f32, f16 and q8_0, and prints each export's largest next-token logit
difference against the run's model over a few training rows (the same check `sftkit export` makes),
the GGUF sizes, and the tolerances sftkit enforces. Writes the section "Export fidelity" of
docs/benchmarks.md.

    .venv/bin/python benchmarks/export_check.py [--run runs/quickstart]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import machine, update_section

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", help="an existing run directory (default: a 20-step LoRA run on the dates example)")
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftkit.config import load_config
    from sftkit.export import EXPORT_TOLERANCE, load_gguf, logit_agreement, probe_rows, write_gguf

    tmp = Path(tempfile.mkdtemp(prefix="sftkit-export-"))
    run = Path(args.run) if args.run else tmp / "run"
    if not args.run:
        subprocess.run([sys.executable, "-m", "sftkit", "train", str(ROOT / "configs" / "quickstart.yaml"),
                        "train.max_steps=20", "train.eval_every=0", f"output_dir={run}"], check=True, cwd=ROOT)
    cfg = load_config(run / "config.yaml")
    model = AutoModelForCausalLM.from_pretrained(run / "final" / "model", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(run / "final" / "model")
    rows = probe_rows(run)
    with torch.no_grad():
        scale = max(float(model(input_ids=torch.tensor([r])).logits.abs().max()) for r in rows)
    table = ["| export | max abs logit difference | same top-1 token | tolerance | size |", "|---|---|---|---|---|"]
    if (run / "final" / "adapter").is_dir():
        from peft import PeftModel

        from sftkit.models import load_model

        base, _ = load_model(cfg.model.name, "float32", cfg.model.revision)
        unmerged = PeftModel.from_pretrained(base, str(run / "final" / "adapter")).eval()
        diff, top1 = logit_agreement(unmerged, model, rows)
        table.append(f"| merged folder vs base + adapter | {diff:.2e} | {top1:.1%} | {EXPORT_TOLERANCE['merge']:g} | - |")
    for kind in ("f32", "f16", "q8_0"):
        path = tmp / f"model-{kind}.gguf"
        write_gguf(model, tok, path, kind)
        reloaded, _ = load_gguf(path)
        diff, top1 = logit_agreement(model, reloaded, rows)
        table.append(f"| GGUF {kind} | {diff:.2e} | {top1:.1%} | {EXPORT_TOLERANCE[kind]:g} | "
                     f"{path.stat().st_size / 2**20:.0f} MiB |")
        print(table[-1], flush=True)
    body = (f"`.venv/bin/python benchmarks/export_check.py` on {machine()}: SmolLM2-135M after a LoRA run on the "
            f"dates example, {sum(map(len, rows))} positions of {len(rows)} training rows (largest logit magnitude "
            f"{scale:.1f}). The tolerances are what `sftkit export` enforces.\n\n" + "\n".join(table))
    print("\n".join(table))
    print(f"wrote {update_section('Export fidelity', body)}")


if __name__ == "__main__":
    main()
