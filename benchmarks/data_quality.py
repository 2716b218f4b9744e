"""Speed of the data-quality analysis (`sftkit data inspect --quality`) on 100,000 rows.

    .venv/bin/python benchmarks/data_quality.py [--rows 100000]

Rows are synthetic prompt/completion pairs (random words, 10-60 per reply) with 1% exact and 1%
near duplicates planted; the eval set shares a 13-gram with 100 training rows. Timed: reading and
normalising the JSONL, then every analysis (exact and MinHash near duplicates, 13-gram
contamination, lint, first words, MiniLM embedding
diversity on a 1,000-row sample (64 tokens each)). Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, update_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench-quality"


def make(n: int) -> tuple[Path, Path]:
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    rows = []
    for i in range(n):
        if i and rng.random() < 0.01:
            rows.append(dict(rows[rng.randrange(len(rows))]))  # exact duplicate
            continue
        reply = " ".join(rng.choice(vocab) for _ in range(rng.randint(10, 60)))
        if i and rng.random() < 0.01:
            src = rows[rng.randrange(len(rows))]
            reply = src["completion"] + " extra"  # near duplicate
            rows.append({"prompt": src["prompt"], "completion": reply})
            continue
        rows.append({"prompt": "explain " + " ".join(rng.choice(vocab) for _ in range(8)), "completion": reply})
    secret = " ".join(f"leak{i}" for i in range(20))
    for i in rng.sample(range(n), 100):
        rows[i] = {"prompt": rows[i]["prompt"], "completion": rows[i]["completion"] + " " + secret}
    WORK.mkdir(parents=True, exist_ok=True)
    train, held = WORK / "train.jsonl", WORK / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held.write_text(json.dumps({"prompt": "q", "completion": secret}) + "\n")
    return train, held


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from sftkit.data.quality import analyse
    from sftkit.data.sources import load_rows
    from sftkit.models import load_tokenizer

    train, held = make(args.rows)
    tok = load_tokenizer("smollm2-135m")
    t0 = time.time()
    rows, tests = load_rows(str(train)), load_rows(str(held))
    t_read = time.time() - t0
    q = analyse(rows, tests, tok, max_length=1024)
    total = time.time() - t0
    found = (f"{sum(len(g) - 1 for g in q.exact)} exact-duplicate rows, {sum(len(g) - 1 for g in q.near)} "
             f"near-duplicate rows, {len(q.contaminated)} contaminated rows, diversity {q.diversity:.3f}")
    print(f"{args.rows} rows: read {t_read:.1f}s, total {total:.1f}s; found {found}")
    body = "\n".join([
        f"Machine: {machine()}.  ",
        f"Command: `.venv/bin/python benchmarks/data_quality.py --rows {args.rows}`", "",
        "| rows | read + normalise (s) | whole analysis incl. reading (s) | found |", "|---|---|---|---|",
        f"| {args.rows:,} | {t_read:.1f} | {total:.1f} | {found} |", "",
        "Planted: 1% exact duplicates, 1% near duplicates (a reply plus one word), 100 rows sharing a 20-word "
        "passage with the eval set. The analysis: exact duplicates after normalisation, MinHash LSH near duplicates "
        "(datasketch, 64 permutations, word 3-grams, threshold 0.8), 13-gram contamination, lint (one batched "
        "tokenizer pass over the replies long enough to pass max_length), first words, MiniLM embedding diversity on a 1,000-row sample (64 tokens each).",
    ])
    print(f"wrote {update_section('Data quality analysis speed', body)}")


if __name__ == "__main__":
    main()
