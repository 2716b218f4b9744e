"""Make the preference example: which of two decimals is larger, where the fraction parts differ in
length (3.45 or 3.5?) — the comparison small language models get wrong by reading "45 > 5".

    python examples/make_compare.py   # writes examples/compare/{sft,train,eval}.jsonl

  sft.jsonl    prompt/completion rows (the right answer): for the SFT stage
  train.jsonl  preference pairs: chosen = the larger number, rejected = the smaller one
  eval.jsonl   held-out pairs (prompt/chosen/rejected); exact match scores `chosen`
Deterministic: the same seed always writes the same files.
"""

import json
import random
from pathlib import Path

PROMPTS = [
    "Which is larger, {} or {}? Answer with the number only.",
    "Which number is bigger: {} or {}? Reply with just the number.",
    "Of {} and {}, which is greater? Give only the number.",
]


def pair(rng: random.Random) -> tuple[str, str]:
    """Two decimals with the same whole part whose fraction parts differ in length (the trap)."""
    whole = rng.randint(0, 99)
    while True:
        short = rng.randint(1, 9)  # one digit: .5
        long = rng.randint(10, 99)  # two digits: .45
        if long % 10 and long // 10 != short:  # no trailing zero, no tie on the first digit
            return f"{whole}.{short}", f"{whole}.{long:02d}"


def rows(n: int, rng: random.Random, taken: set) -> list[dict]:
    out = []
    while len(out) < n:
        a, b = pair(rng)
        if (a, b) in taken:
            continue
        taken.add((a, b))
        larger, smaller = (a, b) if float(a) > float(b) else (b, a)
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        out.append({"prompt": rng.choice(PROMPTS).format(first, second), "chosen": larger, "rejected": smaller})
    return out


def main() -> None:
    rng = random.Random(7)
    taken: set = set()
    held_out = rows(200, rng, taken)
    train = rows(2000, rng, taken)
    out = Path(__file__).parent / "compare"
    out.mkdir(exist_ok=True)
    files = {"train": train, "eval": held_out,
             "sft": [{"prompt": r["prompt"], "completion": r["chosen"]} for r in train]}
    for name, data in files.items():
        with open(out / f"{name}.jsonl", "w") as f:
            for r in data:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {len(data)} rows to {out / name}.jsonl")


if __name__ == "__main__":
    main()
