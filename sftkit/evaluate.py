"""Metrics as plain functions, and generation-based scoring of a model on held-out rows."""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCT = str.maketrans("", "", string.punctuation)


def normalise_text(s: str) -> str:
    """Lower-case, no surrounding whitespace, inner whitespace collapsed."""
    return re.sub(r"\s+", " ", s.strip().lower())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise_text(prediction) == normalise_text(reference))


def token_f1(prediction: str, reference: str) -> float:
    p = normalise_text(prediction).translate(_PUNCT).split()
    r = normalise_text(reference).translate(_PUNCT).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


METRICS = {"exact_match": exact_match, "token_f1": token_f1}


def score(predictions: list[str], references: list[str], metric: str) -> float:
    if metric not in METRICS:
        raise ValueError(f"eval.metric: {metric!r} is not one of {', '.join(METRICS)}")
    fn = METRICS[metric]
    return sum(fn(p, r) for p, r in zip(predictions, references)) / max(len(references), 1)
