"""Make the tool-calling example: questions that one of four tools answers, with the call (tool name
and arguments taken from the question) as the reply to learn; half the training rows go on with the
tool's result and a final answer (so results are in the data, and never trained).

    python examples/make_tools.py   # writes examples/tools/{train,eval}.jsonl and tools.json

  train.jsonl  messages (user, assistant with tool_calls[, tool, assistant]) + tools
  eval.jsonl   held-out questions (other cities, amounts, ...), ending with the call to score
  tools.json   the four function definitions (for `sftkit generate --tools` / `sftkit chat --tools`)
Deterministic: the same seed always writes the same files.
"""

import json
import random
from pathlib import Path


def fn(name: str, description: str, **params: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {k: {"type": "string" if v != "number" else "number", "description": v}
                                         for k, v in params.items()}, "required": list(params)}}}


TOOLS = [fn("get_weather", "Current weather in a city", city="the city"),
         fn("convert_currency", "Convert an amount of money", amount="number", source="currency code, e.g. EUR",
            target="currency code, e.g. USD"),
         fn("get_time", "The local time in a city", city="the city"),
         fn("translate", "Translate a short text", text="the text", language="the language to translate into")]
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Austin", "Hanoi", "Quito", "Perth", "Dakar", "Bern", "Seoul",
          "Lagos", "Porto", "Minsk", "Delhi", "Kyoto", "Turin", "Leeds", "Cork", "Nice", "Riga", "Baku", "Doha"]
CURRENCIES = ["EUR", "USD", "GBP", "JPY", "CHF", "CAD", "INR", "BRL"]
WORDS = ["good morning", "thank you", "where is the station", "one coffee please", "see you soon", "happy birthday",
         "how much is it", "I am lost", "the bill please", "good night"]
LANGUAGES = ["French", "Spanish", "German", "Italian", "Japanese", "Dutch", "Polish", "Turkish"]


def question(rng: random.Random, cities: list[str]) -> tuple[str, str, dict, str, str]:
    """(question, tool, arguments, the tool's result, the final answer)."""
    kind = rng.randrange(4)
    if kind == 0:
        city = rng.choice(cities)
        temp = rng.randint(-5, 35)
        q = rng.choice(["What's the weather like in {}?", "Is it warm in {} right now?", "Weather in {} please."])
        return (q.format(city), "get_weather", {"city": city}, json.dumps({"temperature_c": temp}),
                f"It is {temp} degrees C in {city}.")
    if kind == 1:
        amount, (src, dst) = rng.choice([20, 50, 75, 100, 250, 1000]), rng.sample(CURRENCIES, 2)
        rate = round(rng.uniform(0.5, 2.0), 2)
        q = rng.choice(["How much is {} {} in {}?", "Convert {} {} to {}.", "What do {} {} come to in {}?"])
        return (q.format(amount, src, dst), "convert_currency", {"amount": amount, "source": src, "target": dst},
                json.dumps({"result": round(amount * rate, 2)}), f"{amount} {src} is {round(amount * rate, 2)} {dst}.")
    if kind == 2:
        city = rng.choice(cities)
        hour = f"{rng.randint(0, 23):02d}:{rng.choice(['00', '15', '30', '45'])}"
        q = rng.choice(["What time is it in {}?", "Tell me the local time in {}.", "Current time in {}?"])
        return q.format(city), "get_time", {"city": city}, json.dumps({"time": hour}), f"It is {hour} in {city}."
    text, lang = rng.choice(WORDS), rng.choice(LANGUAGES)
    q = rng.choice(['How do you say "{}" in {}?', 'Translate "{}" into {}.', 'What is "{}" in {}?'])
    return (q.format(text, lang), "translate", {"text": text, "language": lang}, json.dumps({"translation": "..."}),
            f'In {lang}: "...".')


def row(rng: random.Random, cities: list[str], full: bool) -> dict:
    q, tool, args, result, answer = question(rng, cities)
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                                "function": {"name": tool, "arguments": args}}]}
    msgs = [{"role": "user", "content": q}, call]
    if full:
        msgs += [{"role": "tool", "content": result}, {"role": "assistant", "content": answer}]
    return {"messages": msgs, "tools": TOOLS}


def main() -> None:
    rng = random.Random(0)
    out = Path(__file__).resolve().parent / "tools"
    out.mkdir(exist_ok=True)
    seen, held_cities = CITIES[:18], CITIES[18:]  # held-out questions name cities training never did
    train = [row(rng, seen, full=i % 2 == 0) for i in range(320)]
    held = [row(rng, held_cities, full=False) for _ in range(80)]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    (out / "tools.json").write_text(json.dumps(TOOLS, indent=1) + "\n")
    print(f"wrote {len(train)} training and {len(held)} held-out rows to {out}")


if __name__ == "__main__":
    main()
