"""What `sftkit data inspect` prints: counts, lengths, trained fraction, duplicates, rendered samples."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

from .render import IGNORE, Example
from .sources import Row

GREEN, RESET = "\x1b[42;30m", "\x1b[0m"


def percentile(values: list[int], q: float) -> int:
    if not values:
        return 0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def row_key(row: Row) -> str:
    content = row.text if row.text is not None else json.dumps(row.messages, sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(content.encode("utf-8")).hexdigest()


def exact_duplicates(rows: list[Row]) -> list[list[Row]]:
    """Groups of rows with identical content (two or more rows each), in file order."""
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        groups[row_key(r)].append(r)
    return [g for g in groups.values() if len(g) > 1]


def length_stats(examples: list[Example]) -> dict[str, float]:
    lengths = [len(e.input_ids) for e in examples]
    tokens = sum(lengths)
    trained = sum(e.n_trained for e in examples)
    return {"examples": len(examples), "p50": percentile(lengths, 50), "p90": percentile(lengths, 90),
            "max": max(lengths, default=0), "tokens": tokens, "trained_tokens": trained,
            "trained_fraction": trained / max(tokens, 1)}


def highlight(example: Example, tokenizer, color: bool) -> str:
    """The example's text with trained spans marked: coloured on a terminal, [[...]] otherwise."""
    out, span, trained = [], [], None
    for tok_id, label in zip(example.input_ids, example.labels):
        is_trained = label != IGNORE
        if trained is not None and is_trained != trained:
            out.append(_span(tokenizer.decode(span), trained, color))
            span = []
        span.append(tok_id)
        trained = is_trained
    if span:
        out.append(_span(tokenizer.decode(span), bool(trained), color))
    return "".join(out)


def _span(text: str, trained: bool, color: bool) -> str:
    if not trained:
        return text
    return f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"


def export_examples(examples: list[Example], path: str | Path) -> None:
    """One line per kept training example, exactly as the trainer sees it (before batching)."""
    with open(path, "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"input_ids": e.input_ids, "labels": e.labels}) + "\n")


def report(prepared, tokenizer, n_samples: int = 3, color: bool = False) -> str:
    """The text `sftkit data inspect` prints."""
    lines = list(prepared.summary())
    for name, exs in (("train", prepared.train), ("eval", prepared.eval)):
        if not exs:
            continue
        s = length_stats(exs)
        lines.append(f"{name} tokens per example: p50 {s['p50']}, p90 {s['p90']}, max {s['max']}; "
                     f"trained-token fraction {s['trained_fraction']:.1%}")
    dups = exact_duplicates(prepared.train_rows)
    extra = sum(len(g) - 1 for g in dups)
    lines.append(f"exact duplicates in train: {extra} rows repeat another ({len(dups)} groups)")
    for g in dups[:5]:
        lines.append("  same content: " + ", ".join(f"{r.source}:{r.line}" for r in g[:6]) + (" ..." if len(g) > 6 else ""))
    for e in prepared.train[:n_samples]:
        marker = "trained tokens highlighted" if color else "trained tokens in [[...]]"
        lines.append(f"\n--- {e.source}:{e.line} ({len(e.input_ids)} tokens, {e.n_trained} trained; {marker}) ---")
        lines.append(highlight(e, tokenizer, color))
    return "\n".join(lines)
