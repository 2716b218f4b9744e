"""Make the RL example: two-digit additions with a verifiable answer (`answer` column), which the
embedded SmolLM2-135M gets partly right before training, so a group of sampled replies holds both
right and wrong ones (a signal the RL loop can learn from).

    python examples/make_arith.py   # writes examples/arith/{train,eval,sft}.jsonl

  train.jsonl  prompt rows: prompt + answer (what `task: rl` reads; number_match checks the reply)
  eval.jsonl   held-out prompt rows, other sums
  sft.jsonl    prompt/completion rows with the right answer (the SFT stage of the comparison)
Deterministic: the same seed always writes the same files.
"""

import json
import random
from pathlib import Path

PROMPTS = ["What is {} + {}? Answer with the number only.", "Compute {} + {}. Reply with just the number.",
           "Add {} and {}. Give only the result."]


def rows(rng: random.Random, n: int, seen: set) -> list[dict]:
    out = []
    while len(out) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        out.append({"prompt": rng.choice(PROMPTS).format(a, b), "answer": str(a + b)})
    return out


def main() -> None:
    rng, seen = random.Random(0), set()
    out = Path(__file__).resolve().parent / "arith"
    out.mkdir(exist_ok=True)
    train, held = rows(rng, 400, seen), rows(rng, 100, seen)
    for name, data in (("train", train), ("eval", held),
                       ("sft", [{"prompt": r["prompt"], "completion": r["answer"]} for r in train])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    print(f"wrote {len(train)} training and {len(held)} held-out prompts to {out}")


if __name__ == "__main__":
    main()
