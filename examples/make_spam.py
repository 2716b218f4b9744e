"""Make the classification example: short messages labelled spam or ham (about one in four is spam).

    python examples/make_spam.py   # writes examples/spam/{train,eval}.csv

In the spirit of moving a spam filter from e-mail to social-media messages: texts are built from
templates with shared vocabulary on both sides (ham that says "free" or "win", spam written
casually) and 3% of labels flipped, so a bag of keywords is not enough and no model scores 1.0. Deterministic: the same seed writes the same files.
"""

import csv
import random
from pathlib import Path

NAMES = ["Sam", "Alex", "Priya", "Tom", "Mia", "Jon", "Lea", "Omar", "Kim", "Ravi", "Zoe", "Ben"]
PLACES = ["the gym", "work", "the station", "mum's", "the park", "class", "the cafe", "the office", "home"]
TIMES = ["at 6", "tonight", "tomorrow", "after lunch", "on Friday", "in 10 min", "this weekend", "at noon"]
THINGS = ["the keys", "my charger", "the tickets", "your jacket", "the report", "some milk", "the cake", "a book"]
PRIZES = ["an iPhone", "a $500 gift card", "a free cruise", "cash prizes", "a brand new car", "1000 free minutes"]
ACTIONS = ["click here", "reply YES", "call 0800 555 0199", "visit bit.ly/w1n", "text CLAIM to 80085", "tap the link"]

HAM = [
    "hey {n}, are we still on for {p} {t}?",
    "can you grab {th} on your way {t}",
    "running late, be at {p} {t}",
    "did you see the game last night? unreal",
    "{n} said the free tickets for {p} are gone already",
    "thanks for {th}, owe you one!",
    "we won the quiz at {p} lol, drinks {t}?",
    "mum wants to know if you're coming {t}",
    "just got to {p}, where are you",
    "don't forget {th} {t}",
    "is the offer from {n} still on? they said free pizza {t}",
    "call me when you're free, nothing urgent",
    "lol that meme {n} sent, I can't",
    "I left {th} at {p}, can you check?",
    "congrats on the new job!! celebrate {t}?",
    "click the link I sent for the photos from {p}",
    "you won't believe it, {n} won {pr} in the office raffle",
    "call me at 0800 when you're at {p}, urgent-ish",
    "reply yes or no: dinner {t}?",
    "the delivery guy left {th} at {p}, free to pick it up?",
]
SPAM = [
    "congratulations! you have been selected to win {pr}. {a} now",
    "URGENT: your account is on hold. {a} to verify your details",
    "you won {pr}!! {a} before midnight",
    "hey it's {n} from the promo team, you've got {pr} waiting, just {a}",
    "final notice: claim your {pr} today. {a}",
    "lowest rates on loans, approved in minutes. {a}",
    "hi! I saw your profile, I think you'd love this deal on {pr}, {a}",
    "your parcel could not be delivered. {a} to reschedule",
    "free entry to win {pr} every week, {a}",
    "limited offer for {p} members: {pr} for free, {a}",
    "hey, long time! {n} here, got something for you {t}, {a}",
    "your friend {n} shared {pr} with you, {a} to accept",
    "we tried to reach you about {th}, {a}",
]


def fill(t: str, rng: random.Random) -> str:
    s = t.format(n=rng.choice(NAMES), p=rng.choice(PLACES), t=rng.choice(TIMES), th=rng.choice(THINGS),
                 pr=rng.choice(PRIZES), a=rng.choice(ACTIONS))
    if rng.random() < 0.3:
        s = s.capitalize()
    if rng.random() < 0.2:
        s += rng.choice([" :)", " x", "!!", " thx", " pls"])
    return s


def rows(n: int, rng: random.Random) -> list[dict]:
    out = []
    for _ in range(n):
        spam = rng.random() < 0.25
        text = fill(rng.choice(SPAM if spam else HAM), rng)
        if rng.random() < 0.03:  # label noise, as in any real hand-labelled set
            spam = not spam
        out.append({"text": text, "label": "spam" if spam else "ham"})
    return out


def main() -> None:
    rng = random.Random(7)
    out = Path(__file__).parent / "spam"
    out.mkdir(exist_ok=True)
    for name, n in (("train", 1200), ("eval", 300)):
        with open(out / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["text", "label"])
            w.writeheader()
            w.writerows(rows(n, rng))
        print(f"wrote {n} rows to {out / name}.csv")


if __name__ == "__main__":
    main()
