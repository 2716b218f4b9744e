"""Make the knowledge example: facts about made-up towns that only the documents hold, asked as
questions. Fine-tuning cannot learn the held-out towns' facts (training never sees them); retrieval
can find them in the documents. The fine-tune-or-retrieve comparison (`sftkit compare ... --rag`)
measures both on the same held-out questions.

    python examples/make_knowledge.py   # writes examples/knowledge/{docs,train,eval}.jsonl

  docs.jsonl   one document per town (title, text): founding year, river, what it makes, its festival month
  train.jsonl  questions about the first 100 towns with short answers (three per town)
  eval.jsonl   one question about each of 60 other towns, never in train.jsonl
Deterministic: the same seed always writes the same files.
"""

import json
import random
from pathlib import Path

SYLLABLES = ["bra", "vel", "tor", "mis", "quen", "dal", "rov", "sen", "kar", "lum", "pet", "gor", "wyn", "ost",
             "fel", "nar", "bel", "hul", "zan", "cor", "mar", "tib", "oss", "ren"]
RIVERS = ["Ostra", "Velna", "Marr", "Sillow", "Tarn", "Drisk", "Amber", "Olun", "Keld", "Brisa", "Umber", "Flane"]
GOODS = ["cheese", "rope", "glass", "paper", "bells", "barrels", "lace", "soap", "candles", "nails", "cloth", "pottery"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
N_TRAIN, N_EVAL = 100, 60


def towns(rng: random.Random, n: int) -> list[dict]:
    names: set[str] = set()
    out = []
    while len(out) < n:
        name = "".join(rng.sample(SYLLABLES, 2)).capitalize() + rng.choice(["ford", "holm", "wick", "by", "mere"])
        if name in names:
            continue
        names.add(name)
        out.append({"name": name, "year": rng.randrange(1420, 1900), "river": rng.choice(RIVERS),
                    "goods": rng.choice(GOODS), "month": rng.choice(MONTHS)})
    return out


def document(t: dict) -> dict:
    return {"title": t["name"], "text": (
        f"{t['name']} is a small town on the banks of the {t['river']} river. It was founded in {t['year']}. "
        f"The workshops of {t['name']} are known for their {t['goods']}, sold at markets across the region. "
        f"Every year in {t['month']} the town holds its harvest festival.")}


def questions(t: dict) -> list[tuple[str, str]]:
    return [(f"In what year was {t['name']} founded?", str(t["year"])),
            (f"Which river does {t['name']} stand on?", t["river"]),
            (f"What are the workshops of {t['name']} known for?", t["goods"]),
            (f"In which month does {t['name']} hold its harvest festival?", t["month"])]


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def main() -> None:
    rng = random.Random(7)
    all_towns = towns(rng, N_TRAIN + N_EVAL)
    docs = [document(t) for t in all_towns]
    rng.shuffle(docs)  # the documents' order says nothing about which towns are held out
    train = [chat(q, a) for t in all_towns[:N_TRAIN] for q, a in rng.sample(questions(t), 3)]
    rng.shuffle(train)
    held = [chat(*rng.choice(questions(t))) for t in all_towns[N_TRAIN:]]
    out = Path(__file__).resolve().parent / "knowledge"
    out.mkdir(exist_ok=True)
    for name, rows in (("docs", docs), ("train", train), ("eval", held)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"wrote {len(docs)} documents, {len(train)} training and {len(held)} held-out questions to {out}")


if __name__ == "__main__":
    main()
