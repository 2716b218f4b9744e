"""Fine-tune or retrieve? `sftkit compare` with shots and retrieval on two bundled tasks.

    .venv/bin/python benchmarks/retrieve_or_tune.py [--keep]

One process at a time, nothing else running (seconds per answer are measured):
  dates      `make demo`'s task (configs/quickstart.yaml). The index holds the training rows as
             documents (question and answer), so retrieval can at best show solved examples.
  knowledge  examples/make_knowledge.py: questions about made-up towns whose facts only the documents
             hold; the held-out towns are never in training. Trained plain (configs/knowledge.yaml)
             and with retrieved context (configs/knowledge-rag.yaml, data.rag), the last row.
Each compare: base, base + 3 first shots, base + 3 nearest shots, base + RAG (top 3), tuned,
tuned + RAG, on the task metric (exact match), with prompt tokens and seconds per answer.
`--keep` reuses runs and indexes already made. Writes the section "Fine-tune or retrieve" of
docs/benchmarks.md.
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
WORK = ROOT / "runs" / "bench-rag"
SFTKIT = [sys.executable, "-m", "sftkit"]


def sh(args: list[str]) -> float:
    t = time.time()
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.time() - t


def train(config: str, out: Path, keep: bool) -> float:
    """Seconds the run trained (its summary.json's, also for a run reused with --keep)."""
    if not (keep and (out / "summary.json").is_file()):
        sh([*SFTKIT, "train", config, f"output_dir={out}", "--overwrite"])
    return json.loads((out / "summary.json").read_text())["seconds"]


def index(docs: str, out: Path, keep: bool) -> None:
    if not (keep and (out / "sftkit-index.json").is_file()):
        sh([*SFTKIT, "index", "build", docs, "--out", str(out)])


def compare(run: Path, data: str, new_tokens: int, extra: list[str], metrics: str = "exact_match") -> dict[str, dict]:
    sh([*SFTKIT, "compare", "smollm2-135m", str(run), "--data", data, "--metrics", metrics,
        "--max-new-tokens", str(new_tokens), "--batch-size", "64", *extra])
    return {p.name: json.loads((p / "eval.json").read_text())["metrics"] for p in sorted((run / "compare").iterdir())}


LABELS = {"base": "base", "base+3first": "base + first 3 shots", "base+3nearest": "base + nearest 3 shots",
          "base+rag": "base + RAG (top 3)", "tuned": "tuned", "tuned+rag": "tuned + RAG (top 3)"}
ORDER = list(LABELS)


def table(rows: list[tuple[str, dict]], metrics: list[str]) -> str:
    lines = ["| row | " + " | ".join(metrics) + " | prompt tokens per answer | seconds per answer |",
             "|---|" + "---|" * (len(metrics) + 2)]
    for name, m in rows:
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in metrics)
                     + f" | {m['prompt_tokens']:.0f} | {m['seconds_per_answer']:.3f} |")
    return "\n".join(lines)


def saved(run: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / "eval.json").read_text())["metrics"] for p in sorted((run / "compare").iterdir())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", action="store_true", help="reuse runs and indexes already made")
    ap.add_argument("--only", choices=["dates", "knowledge"],
                    help="measure one task; the other's rows are read from its last comparison (runs/bench-rag)")
    opts = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    gflops = matmul_gflops()
    sh([sys.executable, "examples/make_knowledge.py"])
    sections = []

    # dates: the training rows as documents
    docs = WORK / "dates-docs.jsonl"
    with open(docs, "w") as f:
        for line in open(ROOT / "examples/dates/train.jsonl"):
            r = json.loads(line)
            f.write(json.dumps({"text": f"{r['prompt']} {r['completion']}"}) + "\n")
    t_dates = train("configs/quickstart.yaml", WORK / "dates", True) if (WORK / "dates" / "summary.json").is_file() else 0.0
    t_plain = train("configs/knowledge.yaml", WORK / "knowledge", True) if (WORK / "knowledge" / "summary.json").is_file() else 0.0
    t_rag = (train("configs/knowledge-rag.yaml", WORK / "knowledge-rag", True)
             if (WORK / "knowledge-rag" / "summary.json").is_file() else 0.0)
    if opts.only in (None, "dates"):
        index(str(docs), WORK / "dates-index", opts.keep)
        t_dates = train("configs/quickstart.yaml", WORK / "dates", opts.keep)
        dates = compare(WORK / "dates", "examples/dates/eval.jsonl", 12,
                        ["--few-shot", "3", "--rag", str(WORK / "dates-index"), "--k", "3"])
    else:
        dates = saved(WORK / "dates")
    print(dates, flush=True)

    # knowledge: plain and retrieval-augmented fine-tuning. The base model answers in sentences:
    # `contains` (the answer's words in the reply) is the task metric, exact match beside it.
    k_metrics = "contains,exact_match"
    if opts.only in (None, "knowledge"):
        index("examples/knowledge/docs.jsonl", ROOT / "runs" / "knowledge-index", opts.keep)
        t_plain = train("configs/knowledge.yaml", WORK / "knowledge", opts.keep)
        know = compare(WORK / "knowledge", "examples/knowledge/eval.jsonl", 24,
                       ["--few-shot", "3", "--rag", str(ROOT / "runs" / "knowledge-index"), "--k", "3"], k_metrics)
        t_rag = train("configs/knowledge-rag.yaml", WORK / "knowledge-rag", opts.keep)
        rag_run = compare(WORK / "knowledge-rag", "examples/knowledge/eval.jsonl", 24, [], k_metrics)
    else:
        know, rag_run = saved(WORK / "knowledge"), saved(WORK / "knowledge-rag")
    print(know, rag_run, flush=True)

    d_rows = [(LABELS[k], dates[k]) for k in ORDER if k in dates]
    k_rows = [(LABELS[k], know[k]) for k in ORDER if k in know]
    k_rows.append(("tuned with retrieval (data.rag) + RAG (top 3)", rag_run["tuned"]))
    body = (f"`.venv/bin/python benchmarks/retrieve_or_tune.py` on {machine()} (fp32 2048x2048 matmul {gflops:.0f} "
            "GFLOP/s before it), SmolLM2-135M, LoRA r16, greedy replies; nearest shots and the index use the bundled "
            "MiniLM; RAG puts the top 3 chunks in a system message (`--rag-layout system`). Seconds per answer: "
            "wall time of retrieval and batched generation (64 prompts a batch) over the rows, on this machine, "
            "all rows in one process run one after another (nearest shots: with embedding the training prompts once, "
            "which a server would do ahead). Training seconds: each run's own (summary.json), also where --keep reused it.\n\n"
            f"### dates (make demo's task; 200 held-out rows; the index holds the {sum(1 for _ in open(docs))} "
            f"training rows as documents; training {t_dates:.0f} s)\n\n{table(d_rows, ['exact_match'])}\n\n"
            "### knowledge (examples/make_knowledge.py; 60 held-out questions about towns training never saw; "
            f"the index holds the 160 town documents; training {t_plain:.0f} s plain, {t_rag:.0f} s with data.rag)"
            f"\n\n{table(k_rows, ['contains', 'exact_match'])}")
    sections.append(body)
    print(body)
    print(f"wrote {update_section('Fine-tune or retrieve', body)}")


if __name__ == "__main__":
    main()
