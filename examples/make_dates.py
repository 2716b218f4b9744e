"""Make the demo dataset: rewrite a date written in words into ISO 8601 (YYYY-MM-DD).

    python examples/make_dates.py   # writes examples/dates/{train,eval}.jsonl

A small instruct model gets the format right now and then but often keeps words, drops the zero
padding or mixes up the order; a few hundred LoRA steps teach it. The score is exact match.
Deterministic: the same seed always writes the same files.
"""

import datetime
import json
import random
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def spell(d: datetime.date, style: int) -> str:
    month, short = MONTHS[d.month - 1], MONTHS[d.month - 1][:3]
    return [
        f"{month} {d.day}, {d.year}",
        f"{d.day} {month} {d.year}",
        f"{short} {d.day}, {d.year}",
        f"the {ordinal(d.day)} of {month}, {d.year}",
        f"{month} {ordinal(d.day)} {d.year}",
        f"{WEEKDAYS[d.weekday()]}, {month} {d.day}, {d.year}",
        f"{d.day}-{short}-{d.year}",
    ][style]


PROMPTS = [
    "Convert this date to ISO 8601 format (YYYY-MM-DD): {}",
    "Write the date {} as YYYY-MM-DD.",
    "What is {} in ISO format (YYYY-MM-DD)? Answer with the date only.",
]


def rows(n: int, rng: random.Random, taken: set) -> list[dict]:
    out = []
    start = datetime.date(1950, 1, 1).toordinal()
    end = datetime.date(2049, 12, 31).toordinal()
    while len(out) < n:
        d = datetime.date.fromordinal(rng.randint(start, end))
        text = spell(d, rng.randrange(7))
        if text in taken:  # held-out dates never appear in training
            continue
        taken.add(text)
        prompt = rng.choice(PROMPTS).format(text)
        out.append({"prompt": prompt, "completion": d.isoformat()})
    return out


def main() -> None:
    rng = random.Random(1234)
    taken: set = set()
    held_out = rows(200, rng, taken)
    train = rows(2000, rng, taken)
    out = Path(__file__).parent / "dates"
    out.mkdir(exist_ok=True)
    for name, data in (("train", train), ("eval", held_out)):
        with open(out / f"{name}.jsonl", "w") as f:
            for r in data:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {len(data)} rows to {out / name}.jsonl")


if __name__ == "__main__":
    main()
