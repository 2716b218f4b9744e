"""People's judgements of replies: the review file, preference pairs from it, inter-rater agreement.

A candidates file (JSONL) holds one prompt per line with the replies to judge:

    {"id": "p3", "prompt": "..." (or "messages": [...]),
     "candidates": [{"id": "p3-c0", "reply": "...", "model": "...", "run": "...", "seed": 0, ...}, ...]}

A review file (`reviews.jsonl`, beside it) holds one judgement per line, appended as it is made:

    {"reviewer": "ana", "time": "2026-12-03T13:50:00+00:00", "candidates": "candidates.jsonl",
     "prompt_id": "p3",
     "grades": {"p3-c0": {"overall": 4, "relevance": 5, "coherence": 4, "appropriateness": 5}, ...},
     "ranking": [["p3-c1"], ["p3-c0", "p3-c2"]],      # best first; a tier of several is a tie
     "flags": {"p3-c2": ["wrong"]}, "comment": "..."}

A reviewer may judge a prompt again: their latest line for it is the one that counts. Grades are
whole numbers 1-5; every criterion but `overall` is optional.

Pairs (`sftkit data pairs`): each judgement orders its replies by the ranking (else by the overall
grade, equal grades tied); flagged replies go below every unflagged one and are never chosen. Every
ordered pair across tiers is a pair; `margin` is the overall-grade difference where both are graded
and it agrees with the order, else 0. Ties, pairs of two flagged replies, and pairs whose grades
contradict the ranking are counted. Where several reviewers give the same pair it is written once
(margin: their mean); where they give opposite orders, neither is written (counted as conflicts).

Agreement (`sftkit data agreement`): Krippendorff's alpha, ordinal, on the grades of replies graded
by two reviewers or more (one alpha per criterion), which copes with reviewers who graded
different subsets; and the prompts whose replies' overall grades differ most between reviewers.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .data.sources import DataError, read_source

CRITERIA = ("overall", "relevance", "coherence", "appropriateness")
FLAGS = ("unsafe", "wrong", "other")


@dataclass
class Judgement:
    reviewer: str
    prompt_id: str
    candidates_file: str
    grades: dict[str, dict[str, int]]
    ranking: list[list[str]]
    flags: dict[str, list[str]]
    comment: str
    line: int


def read_candidates(path: Path) -> dict[str, dict]:
    """prompt id -> the candidates file's row; a bad row names file:line: field."""
    out: dict[str, dict] = {}
    for line, obj in read_source(str(path)):
        if isinstance(obj, DataError):
            raise obj
        at = f"{path}:{line}"
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
            raise DataError(f"{at}: id: each row needs a string `id`")
        if "prompt" not in obj and "messages" not in obj:
            raise DataError(f"{at}: prompt: each row needs `prompt` or `messages`")
        cands = obj.get("candidates")
        if not isinstance(cands, list) or not all(isinstance(c, dict) and isinstance(c.get("id"), str)
                                                  and isinstance(c.get("reply"), str) for c in cands):
            raise DataError(f"{at}: candidates: expected a list of {{id, reply, ...}}")
        if obj["id"] in out:
            raise DataError(f"{at}: id: {obj['id']!r} is given twice")
        out[obj["id"]] = obj
    return out


def _grade(v, at: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 5:
        raise DataError(f"{at}: expected a whole number 1-5, got {v!r}")
    return v


def judgement_of(obj, at: str, line: int = 0) -> Judgement:
    """One review line -> Judgement, or a DataError naming `at` (file:line) and the field."""
    if not isinstance(obj, dict):
        raise DataError(f"{at}: expected an object per line")
    for key in ("reviewer", "prompt_id", "candidates"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise DataError(f"{at}: {key}: expected a non-empty string")
    grades = obj.get("grades") or {}
    if not isinstance(grades, dict):
        raise DataError(f"{at}: grades: expected {{candidate id: {{criterion: 1-5}}}}")
    clean: dict[str, dict[str, int]] = {}
    for cid, g in grades.items():
        if not isinstance(g, dict) or set(g) - set(CRITERIA):
            raise DataError(f"{at}: grades.{cid}: expected criteria among {', '.join(CRITERIA)}")
        clean[cid] = {k: _grade(v, f"{at}: grades.{cid}.{k}") for k, v in g.items()}
    ranking = obj.get("ranking") or []
    if not isinstance(ranking, list) or not all(isinstance(t, list) and t and all(isinstance(c, str) for c in t)
                                                for t in ranking):
        raise DataError(f"{at}: ranking: expected tiers, best first: [[id], [id, id], ...]")
    ranked = [c for t in ranking for c in t]
    if len(ranked) != len(set(ranked)):
        raise DataError(f"{at}: ranking: a candidate is ranked twice")
    flags = obj.get("flags") or {}
    if not isinstance(flags, dict) or not all(isinstance(v, list) and set(v) <= set(FLAGS) for v in flags.values()):
        raise DataError(f"{at}: flags: expected {{candidate id: [{', '.join(FLAGS)}]}}")
    comment = obj.get("comment", "")
    if not isinstance(comment, str):
        raise DataError(f"{at}: comment: expected a string")
    return Judgement(obj["reviewer"], obj["prompt_id"], obj["candidates"], clean, ranking,
                     {k: v for k, v in flags.items() if v}, comment, line)


def read_reviews(path: str | Path) -> list[Judgement]:
    """Each reviewer's latest judgement of each prompt, in file order; bad lines name file:line: field."""
    path = Path(path)
    latest: dict[tuple[str, str], Judgement] = {}
    for line, obj in read_source(str(path)):
        if isinstance(obj, DataError):
            raise obj
        j = judgement_of(obj, f"{path}:{line}", line)
        latest.pop((j.reviewer, j.prompt_id), None)  # re-judged: the latest counts, at its place
        latest[(j.reviewer, j.prompt_id)] = j
    return list(latest.values())


def check_ids(j: Judgement, row: dict, at: str) -> None:
    """Every candidate a judgement names is one of its prompt's."""
    known = {c["id"] for c in row["candidates"]}
    named = [c for t in j.ranking for c in t] + list(j.grades) + list(j.flags)
    unknown = [c for c in named if c not in known]
    if unknown:
        raise DataError(f"{at}: ranking: {unknown[0]!r} is not a candidate of prompt {j.prompt_id!r}")


def append_judgement(reviews: Path, line: dict) -> None:
    """One judgement onto the review file, whole or not at all: one O_APPEND write of the full line
    (concurrent writers never interleave within a line), fsynced before this returns."""
    import os

    data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(reviews, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"{reviews}: wrote {written} of {len(data)} bytes of a judgement")
        os.fsync(fd)
    finally:
        os.close(fd)


def tiers(j: Judgement) -> list[list[str]]:
    """The judgement's order, best first: its ranking, else its overall grades (equal grades tied);
    flagged replies last, in one tier."""
    if j.ranking:
        order = [list(t) for t in j.ranking]
    else:
        by: dict[int, list[str]] = defaultdict(list)
        for cid, g in j.grades.items():
            if "overall" in g:
                by[g["overall"]].append(cid)
        order = [sorted(by[k]) for k in sorted(by, reverse=True)]
    flagged = [c for t in order for c in t if c in j.flags]
    flagged += sorted(c for c in j.flags if c not in flagged)
    order = [[c for c in t if c not in j.flags] for t in order]
    return [t for t in order if t] + ([flagged] if flagged else [])


@dataclass
class PairStats:
    judgements: int = 0
    pairs: int = 0
    counts: Counter = field(default_factory=Counter)  # ties, both flagged, grade contradicts ranking, conflicts, merged

    def line(self) -> str:
        said = ", ".join(f"{n} {what}" for what, n in self.counts.most_common())
        return f"{self.pairs} pairs from {self.judgements} judgements" + (f" (left out or merged: {said})" if said else "")


def judged_rows(reviews: str | Path) -> tuple[list[tuple[Judgement, dict]], dict[str, dict[str, dict]]]:
    """Each counted judgement with its prompt's candidates row (checked: the prompt and every
    candidate it names exist), and the candidates files read (name -> prompt id -> row)."""
    reviews = Path(reviews)
    files: dict[str, dict[str, dict]] = {}
    out = []
    for j in read_reviews(reviews):
        if j.candidates_file not in files:
            files[j.candidates_file] = read_candidates(reviews.parent / j.candidates_file)
        row = files[j.candidates_file].get(j.prompt_id)
        if row is None:
            raise DataError(f"{reviews}:{j.line}: prompt_id: {j.prompt_id!r} is not in {j.candidates_file}")
        check_ids(j, row, f"{reviews}:{j.line}")
        out.append((j, row))
    return out, files


def review_pairs(reviews: str | Path) -> tuple[list[dict], PairStats]:
    """Preference rows (prompt, chosen, rejected, margin, ids, reviewers) from a review file."""
    judged, candidates = judged_rows(reviews)
    stats = PairStats(judgements=len(judged))
    votes: dict[tuple[str, str, str], list[tuple[str, float]]] = defaultdict(list)
    for j, _ in judged:
        order = tiers(j)
        stats.counts["tied pairs"] += sum(len(t) * (len(t) - 1) // 2 for t in order if not set(t) <= set(j.flags))
        for i, upper in enumerate(order):
            for lower in order[i + 1:]:
                for a in upper:
                    for b in lower:  # flagged replies are in the last tier only: never `a`
                        ga, gb = j.grades.get(a, {}).get("overall"), j.grades.get(b, {}).get("overall")
                        margin = float(ga - gb) if ga is not None and gb is not None else 0.0
                        if margin < 0:
                            stats.counts["pairs whose grades contradict the ranking (margin 0)"] += 1
                            margin = 0.0
                        votes[(j.candidates_file, j.prompt_id, a, b)].append((j.reviewer, margin))
        if len(order) and len(order[-1]) > 1 and set(order[-1]) <= set(j.flags):
            stats.counts["pairs of two flagged replies"] += len(order[-1]) * (len(order[-1]) - 1) // 2
    rows = []
    for (file, pid, a, b), given in votes.items():
        against = votes.get((file, pid, b, a))
        if against:
            stats.counts["conflicting pairs (reviewers disagree on the order)"] += 1
            continue
        if len(given) > 1:
            stats.counts["pairs given by several reviewers, written once"] += len(given) - 1
        row = candidates[file][pid]
        reply = {c["id"]: c["reply"] for c in row["candidates"]}
        rows.append({"prompt": row.get("messages", row.get("prompt")), "chosen": reply[a], "rejected": reply[b],
                     "margin": sum(m for _, m in given) / len(given), "prompt_id": pid, "chosen_id": a,
                     "rejected_id": b, "reviewers": sorted({r for r, _ in given})})
    conflicts = stats.counts.get("conflicting pairs (reviewers disagree on the order)", 0)
    if conflicts:  # each conflict was met from both sides
        stats.counts["conflicting pairs (reviewers disagree on the order)"] = conflicts // 2
    stats.pairs = len(rows)
    return rows, stats


def write_pairs(reviews: str | Path, out: str | Path) -> PairStats:
    rows, stats = review_pairs(reviews)
    tmp = Path(str(out) + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    tmp.replace(out)
    return stats


@dataclass
class Agreement:
    reviewers: list[str]
    alpha: dict[str, float | None]  # criterion -> Krippendorff's alpha (ordinal); None where too few grades
    units: dict[str, int]  # criterion -> replies graded by 2+ reviewers
    disagreements: list[tuple[str, float]]  # (prompt id, mean spread of overall grades), largest first

    def lines(self, top: int = 5) -> list[str]:
        out = [f"{len(self.reviewers)} reviewers ({', '.join(self.reviewers)}); Krippendorff's alpha, ordinal, on "
               "replies graded by two or more:"]
        for c, a in self.alpha.items():
            out.append(f"  {c:<16} " + (f"{a:.3f} over {self.units[c]} replies" if a is not None
                                       else f"- ({self.units[c]} replies graded twice: too few)"))
        if self.disagreements:
            out.append("prompts they disagree on most (mean spread of the overall grade across reviewers):")
            out += [f"  {pid}  {spread:.2f}" for pid, spread in self.disagreements[:top] if spread > 0]
        return out


def agreement(reviews: str | Path) -> Agreement:
    import numpy as np
    from krippendorff import alpha as k_alpha

    judgements = read_reviews(reviews)
    reviewers = sorted({j.reviewer for j in judgements})
    by_unit: dict[str, dict[tuple[str, str], dict[str, int]]] = {c: defaultdict(dict) for c in CRITERIA}
    for j in judgements:
        for cid, g in j.grades.items():
            for c, v in g.items():
                by_unit[c][(j.prompt_id, cid)][j.reviewer] = v
    alphas, units = {}, {}
    for c in CRITERIA:
        shared = {u: g for u, g in by_unit[c].items() if len(g) >= 2}
        units[c] = len(shared)
        values = {v for g in shared.values() for v in g.values()}
        if len(shared) < 2 or len(values) < 2:
            alphas[c] = None
            continue
        data = np.array([[shared[u].get(r, np.nan) for u in shared] for r in reviewers], dtype=float)
        alphas[c] = float(k_alpha(reliability_data=data, level_of_measurement="ordinal", value_domain=[1, 2, 3, 4, 5]))
    spread: dict[str, list[int]] = defaultdict(list)
    for (pid, _), g in by_unit["overall"].items():
        if len(g) >= 2:
            spread[pid].append(max(g.values()) - min(g.values()))
    worst = sorted(((pid, sum(s) / len(s)) for pid, s in spread.items()), key=lambda x: (-x[1], x[0]))
    return Agreement(reviewers, alphas, units, worst)


def is_review_file(spec) -> bool:
    """`data.train` names a review file: a .jsonl whose first line is a judgement (reviewer, prompt_id)."""
    if not isinstance(spec, str) or not spec.endswith(".jsonl") or not Path(spec).is_file():
        return False
    with open(spec, encoding="utf-8", errors="replace") as f:
        first = f.readline()
    try:
        obj = json.loads(first)
    except ValueError:
        return False
    return isinstance(obj, dict) and "reviewer" in obj and "prompt_id" in obj


def graded_replies(reviews: str | Path) -> list[dict]:
    """Every reply with an overall grade: prompt, reply, grade (the mean over its reviewers), ids."""
    grades: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    judged, files = judged_rows(reviews)
    for j, _ in judged:
        for cid, g in j.grades.items():
            if "overall" in g:
                grades[(j.candidates_file, j.prompt_id, cid)].append(g["overall"])
    out = []
    for (file, pid, cid), gs in grades.items():
        row = files[file][pid]
        reply = next(c["reply"] for c in row["candidates"] if c["id"] == cid)
        out.append({"prompt": row.get("messages", row.get("prompt")), "reply": reply, "grade": sum(gs) / len(gs),
                    "prompt_id": pid, "candidate_id": cid})
    return out


def held_out_prompts(ids: list[str], fraction: float, seed: int) -> set[str]:
    """The prompts held out: `fraction` of them, drawn by seed (a prompt's replies stay together)."""
    import random

    unique = sorted(set(ids))
    if fraction <= 0 or len(unique) < 2:
        return set()
    n = max(1, round(fraction * len(unique)))
    return set(random.Random(seed).sample(unique, min(n, len(unique) - 1)))
