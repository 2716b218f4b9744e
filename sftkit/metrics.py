"""Metrics as plain functions of (prediction, reference) strings: no torch, so the CLI checks metric
names before it loads a model, and the RL loop's built-in rewards share the same normalisation."""

from __future__ import annotations

import difflib
import importlib
import json
import re
import string
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError

_PUNCT = str.maketrans("", "", string.punctuation)


# -- per-row metrics ------------------------------------------------------------------------------
def normalise_text(s: str, punctuation: bool = False) -> str:
    """Lower-case, no surrounding whitespace, inner whitespace collapsed; optionally no punctuation."""
    s = s.lower().translate(_PUNCT) if punctuation else s.lower()
    return re.sub(r"\s+", " ", s.strip())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise_text(prediction) == normalise_text(reference))


def exact_match_strict(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def exact_match_loose(prediction: str, reference: str) -> float:
    """Also ignores punctuation."""
    return float(normalise_text(prediction, True) == normalise_text(reference, True))


def _words(s: str) -> list[str]:
    return normalise_text(s, punctuation=True).split()


def contains(prediction: str, reference: str) -> float:
    """The reference's words appear, in order and together, among the reply's (case and punctuation
    ignored): a short answer given inside a sentence counts ("It was founded in 1768." for "1768")."""
    ref, pred = _words(reference), _words(prediction)
    if not ref:
        return float(not pred)
    return float(any(pred[i : i + len(ref)] == ref for i in range(len(pred) - len(ref) + 1)))


def token_f1(prediction: str, reference: str) -> float:
    p, r = _words(prediction), _words(reference)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on words: longest common subsequence against both lengths."""
    p, r = _words(prediction), _words(reference)
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[list[dict], list[str]]:
    """The tool calls in a reply, as the Hermes / Qwen layout writes them (`<tool_call>{"name": ...,
    "arguments": {...}}</tool_call>`, one block per call): ([{name, arguments}], the blocks that are
    not a call, as text)."""
    calls, bad = [], []
    for block in TOOL_CALL.findall(text):
        try:
            obj = json.loads(block)
        except json.JSONDecodeError:
            bad.append(block)
            continue
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            args = obj.get("arguments", {})
            if isinstance(args, str):  # some models write the arguments as a JSON string
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    pass
            calls.append({"name": obj["name"], "arguments": args})
        else:
            bad.append(block)
    return calls, bad


def calls_text(tool_calls: list[dict]) -> str:
    """Tool calls (messages' `tool_calls`) in the layout parse_tool_calls reads: a reference reply's calls as text."""
    return "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                                  ensure_ascii=False) + "\n</tool_call>" for c in tool_calls)


def tool_call(prediction: str, reference: str) -> float:
    """1 when the reply calls the reference's tools with its arguments (each call's name and arguments
    equal, in order; every block a valid call), else 0. A reference without calls: 1 when the reply
    makes none."""
    want, _ = parse_tool_calls(reference)
    got, bad = parse_tool_calls(prediction)
    return float(not bad and got == want)


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match, "exact_match_strict": exact_match_strict, "exact_match_loose": exact_match_loose,
    "token_f1": token_f1, "rouge_l": rouge_l, "tool_call": tool_call, "contains": contains,
}


def import_function(spec: str, what: str) -> Callable:
    """`module:function` from the working directory or the path, or a ConfigError that says `what` wanted it."""
    module, _, name = spec.partition(":")
    try:
        sys.path.insert(0, str(Path.cwd()))
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{what}: cannot import {name} from {module}: {e}") from None
    finally:
        sys.path.pop(0)
    if not callable(fn):
        raise ConfigError(f"{what}: {spec} is not a function")
    return fn


def metric_fn(name: str) -> Callable[[str, str], float]:
    """A built-in metric, or `module:function` taking (prediction, reference) and returning a number."""
    if name in METRICS:
        return METRICS[name]
    if ":" in name:
        return import_function(name, f"metric {name!r}")
    close = difflib.get_close_matches(name, list(METRICS), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"metric {name!r} is not one of {', '.join(METRICS)} nor module:function{hint}")


def score(predictions: list[str], references: list[str], metric: str) -> float:
    fn = metric_fn(metric)
    return sum(float(fn(p, r)) for p, r in zip(predictions, references)) / max(len(references), 1)


# -- classification-style -------------------------------------------------------------------------
def is_label_set(references: list[str], max_labels: int = 20) -> bool:
    """References drawn from a small set of short labels (sentiment, yes/no, a category)."""
    labels = {normalise_text(r) for r in references}
    return 1 < len(labels) <= max_labels and len(labels) < len(references) and all(len(x.split()) <= 3 for x in labels)


def classification_report(predictions: list[str], references: list[str]) -> dict:
    """Accuracy, per-class precision/recall/F1, macro-F1 and the confusion matrix (rows: reference)."""
    refs = [normalise_text(r) for r in references]
    preds = [normalise_text(p) for p in predictions]
    labels = sorted(set(refs))
    other = "(other)"
    cols = labels + ([other] if any(p not in labels for p in preds) else [])
    matrix = {r: dict.fromkeys(cols, 0) for r in labels}
    for p, r in zip(preds, refs):
        matrix[r][p if p in labels else other] += 1
    per_class = {}
    for c in labels:
        tp = matrix[c][c]
        predicted = sum(matrix[r][c] for r in labels)
        actual = sum(matrix[c].values())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[c] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    return {
        "accuracy": sum(p == r for p, r in zip(preds, refs)) / max(len(refs), 1),
        "macro_f1": sum(v["f1"] for v in per_class.values()) / max(len(per_class), 1),
        "per_class": per_class,
        "labels": cols,
        "confusion": [[matrix[r][c] for c in cols] for r in labels],
    }
