"""Review files: pairs from hand-made rankings and grades (margins, ties, flags, several reviewers),
inter-rater agreement, and bad lines named by file, line and field."""

from __future__ import annotations

import json

import pytest

from sftkit.cli import main
from sftkit.data.pairs import normalise_pair
from sftkit.data.sources import DataError
from sftkit.reviews import agreement, read_reviews, review_pairs

from ..conftest import write_jsonl


def candidates(tmp_path, n_prompts: int = 2, n: int = 4):
    rows = [{"id": f"p{i}", "prompt": f"question {i}",
             "candidates": [{"id": f"p{i}-c{k}", "reply": f"reply {i}.{k}", "model": "m", "seed": k} for k in range(n)]}
            for i in range(n_prompts)]
    return write_jsonl(tmp_path / "candidates.jsonl", rows)


def judged(reviewer, pid, grades=None, ranking=None, flags=None):
    return {"reviewer": reviewer, "time": "2026-12-03T13:00:00+00:00", "candidates": "candidates.jsonl",
            "prompt_id": pid, "grades": {c: {"overall": g} for c, g in (grades or {}).items()},
            "ranking": ranking or [], "flags": flags or {}}


def test_a_ranking_gives_every_ordered_pair_with_grade_margins_ties_and_flags_counted(tmp_path):
    candidates(tmp_path)
    reviews = write_jsonl(tmp_path / "reviews.jsonl", [
        judged("ana", "p0", grades={"p0-c0": 5, "p0-c1": 3, "p0-c2": 3, "p0-c3": 1},
               ranking=[["p0-c0"], ["p0-c1", "p0-c2"], ["p0-c3"]]),
        judged("ana", "p1", grades={"p1-c0": 2, "p1-c1": 4}, ranking=[["p1-c0"], ["p1-c1"], ["p1-c2"]],
               flags={"p1-c2": ["unsafe"], "p1-c3": ["wrong"]})])
    rows, stats = review_pairs(reviews)
    got = {(r["chosen_id"], r["rejected_id"]): r["margin"] for r in rows}
    assert got == {("p0-c0", "p0-c1"): 2.0, ("p0-c0", "p0-c2"): 2.0, ("p0-c0", "p0-c3"): 4.0,
                   ("p0-c1", "p0-c3"): 2.0, ("p0-c2", "p0-c3"): 2.0,
                   ("p1-c0", "p1-c1"): 0.0,  # ranked above a better grade: the pair stays, margin 0
                   ("p1-c0", "p1-c2"): 0.0, ("p1-c0", "p1-c3"): 0.0, ("p1-c1", "p1-c2"): 0.0, ("p1-c1", "p1-c3"): 0.0}
    assert stats.counts["tied pairs"] == 1  # p0-c1 = p0-c2
    assert stats.counts["pairs of two flagged replies"] == 1  # p1-c2 and p1-c3: neither is chosen
    assert stats.counts["pairs whose grades contradict the ranking (margin 0)"] == 1
    assert not any(r["chosen_id"] in ("p1-c2", "p1-c3") for r in rows)
    first = next(r for r in rows if r["chosen_id"] == "p0-c0" and r["rejected_id"] == "p0-c1")
    assert (first["prompt"], first["chosen"], first["rejected"]) == ("question 0", "reply 0.0", "reply 0.1")
    pair = normalise_pair(first, "pairs.jsonl", 1, {}, None)  # what task: preference and task: reward read
    assert pair.chosen[-1]["content"] == "reply 0.0" and pair.margin == 2.0


def test_grades_alone_order_the_replies_and_reviewers_merge_or_conflict(tmp_path):
    candidates(tmp_path, n_prompts=1, n=3)
    reviews = write_jsonl(tmp_path / "reviews.jsonl", [
        judged("ana", "p0", grades={"p0-c0": 5, "p0-c1": 2, "p0-c2": 2}),
        judged("bo", "p0", grades={"p0-c0": 4, "p0-c1": 1, "p0-c2": 3}),
        judged("cy", "p0", ranking=[["p0-c1"], ["p0-c0"]]),  # against ana and bo on c0 vs c1
        judged("bo", "p0", grades={"p0-c0": 3, "p0-c1": 1, "p0-c2": 2})])  # bo again: this line counts
    assert [(j.reviewer, j.line) for j in read_reviews(reviews)] == [("ana", 1), ("cy", 3), ("bo", 4)]
    rows, stats = review_pairs(reviews)
    got = {(r["chosen_id"], r["rejected_id"]): (r["margin"], r["reviewers"]) for r in rows}
    assert got == {("p0-c0", "p0-c2"): (2.0, ["ana", "bo"]),  # (3 + 1) / 2
                   ("p0-c2", "p0-c1"): (1.0, ["bo"])}
    assert stats.counts["conflicting pairs (reviewers disagree on the order)"] == 1
    assert stats.counts["pairs given by several reviewers, written once"] == 1
    assert stats.counts["tied pairs"] == 1  # ana: c1 = c2


def test_agreement_is_krippendorffs_alpha_and_names_the_prompts_they_disagree_on(tmp_path, capsys):
    candidates(tmp_path, n_prompts=3, n=3)
    same = {"p0-c0": 5, "p0-c1": 3, "p0-c2": 1}
    reviews = write_jsonl(tmp_path / "reviews.jsonl", [
        judged("ana", "p0", grades=same), judged("bo", "p0", grades=same),
        judged("ana", "p1", grades={"p1-c0": 4, "p1-c1": 2, "p1-c2": 3}),
        judged("bo", "p1", grades={"p1-c0": 4, "p1-c1": 2, "p1-c2": 3}),
        judged("ana", "p2", grades={"p2-c0": 5, "p2-c1": 1}), judged("bo", "p2", grades={"p2-c0": 1, "p2-c1": 5})])
    a = agreement(reviews)
    assert a.reviewers == ["ana", "bo"] and a.units["overall"] == 8 and a.alpha["relevance"] is None
    assert 0 < a.alpha["overall"] < 1
    assert a.disagreements[0] == ("p2", 4.0)
    perfect = write_jsonl(tmp_path / "perfect.jsonl", [judged("ana", "p0", grades=same), judged("bo", "p0", grades=same)])
    assert agreement(perfect).alpha["overall"] == pytest.approx(1.0)
    assert main(["data", "agreement", str(reviews)]) == 0
    out = capsys.readouterr().out
    assert "Krippendorff's alpha, ordinal" in out and "p2  4.00" in out
    assert main(["data", "pairs", str(reviews), "--out", str(tmp_path / "pairs.jsonl")]) == 0
    assert "pairs from 6 judgements" in capsys.readouterr().out
    assert all(set(json.loads(x)) >= {"prompt", "chosen", "rejected", "margin"} for x in open(tmp_path / "pairs.jsonl"))


@pytest.mark.parametrize("line, why", [
    ({"reviewer": "ana", "prompt_id": "p0"}, r"reviews.jsonl:1: candidates: expected a non-empty string"),
    ({**judged("ana", "p0"), "grades": {"p0-c0": {"overall": 6}}}, r"reviews.jsonl:1: grades.p0-c0.overall: expected a whole number 1-5"),
    ({**judged("ana", "p0"), "grades": {"p0-c0": {"fluency": 3}}}, r"reviews.jsonl:1: grades.p0-c0: expected criteria among"),
    ({**judged("ana", "p0"), "ranking": [["p0-c0"], ["p0-c0"]]}, r"reviews.jsonl:1: ranking: a candidate is ranked twice"),
    ({**judged("ana", "p0"), "flags": {"p0-c0": ["rude"]}}, r"reviews.jsonl:1: flags: expected"),
    (judged("ana", "p9", ranking=[["p9-c0"], ["p9-c1"]]), r"reviews.jsonl:1: prompt_id: 'p9' is not in candidates.jsonl"),
    (judged("ana", "p0", ranking=[["p0-c0"], ["p0-c7"]]), r"reviews.jsonl:1: ranking: 'p0-c7' is not a candidate"),
])
def test_bad_review_lines_name_the_file_line_and_field(tmp_path, line, why):
    candidates(tmp_path)
    reviews = write_jsonl(tmp_path / "reviews.jsonl", [line])
    with pytest.raises(DataError, match=why):
        review_pairs(reviews)
