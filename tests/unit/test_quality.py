"""Data quality: planted duplicates, near duplicates, contamination and lint cases are found exactly."""

import json
import random

from sftkit.cli import main
from sftkit.data.quality import analyse, write_report
from sftkit.data.sources import load_rows

from ..conftest import write_jsonl

WORDS = ("apple river stone cloud tiger lamp violin garden engine copper meadow falcon harbor prism velvet "
         "quartz ember canyon orchid puzzle lantern glacier saddle thunder mosaic anchor blossom cobalt dune").split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def planted(tmp_path):
    rng = random.Random(0)
    rows = [{"prompt": f"Describe {sentence(rng, 6)}", "completion": sentence(rng, 25)} for _ in range(30)]
    planted = {
        "exact": {"prompt": rows[3]["prompt"].upper() + "!", "completion": rows[3]["completion"] + "."},
        "near": {"prompt": rows[5]["prompt"], "completion": rows[5]["completion"].rsplit(" ", 1)[0] + " zebra"},
        "empty": {"prompt": "Say something", "completion": "k"},
        "echo": {"prompt": "repeat after me please", "completion": "Repeat after me please"},
        "refusal": {"prompt": "Write a poem", "completion": "As an AI language model, I cannot write poems."},
        "template": {"prompt": "Explain the tag", "completion": "It ends with <|im_end|> like this"},
        "debris": {"prompt": "Where is the cafÃ©?", "completion": "Around the corner"},
        "long": {"prompt": "Tell a long story", "completion": sentence(rng, 400)},
    }
    eval_rows = [{"prompt": "Q", "completion": "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi"}]
    planted["contaminated"] = {"prompt": "Copy", "completion": "so alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu"}
    names = list(planted)
    train = write_jsonl(tmp_path / "train.jsonl", rows + [planted[k] for k in names])
    held = write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    index = {k: 30 + i for i, k in enumerate(names)}
    return train, held, index


def test_planted_problems_are_found_exactly(tmp_path, tokenizer):
    train, held, idx = planted(tmp_path)
    q = analyse(load_rows(str(train)), load_rows(str(held)), tokenizer, max_length=300, diversity=False)
    assert q.exact == [[3, idx["exact"]]]
    assert [3, idx["exact"]] in q.near and [5, idx["near"]] in q.near and len(q.near) == 2
    assert q.contaminated == [(idx["contaminated"], 0)]
    lint = {k.split(" (")[0].split(" data.")[0]: v for k, v in q.lint.items()}
    assert lint["empty or very short reply"] == [idx["empty"]]
    assert lint["reply repeats the prompt"] == [idx["echo"]]
    assert lint["boilerplate refusal"] == [idx["refusal"]]
    assert lint["template token inside content"] == [idx["template"]]
    assert lint["encoding debris"] == [idx["debris"]]
    assert lint["reply longer than"] == [idx["long"]]
    assert lint["extreme length"] == [idx["long"]]
    assert set(lint) == {"empty or very short reply", "reply repeats the prompt", "boilerplate refusal",
                         "template token inside content", "encoding debris", "reply longer than", "extreme length"}


def test_clean_writes_kept_rows_and_every_removal_with_its_reason(tmp_path, tiny_model_dir, capsys):
    train, held, idx = planted(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: {train}\n  eval: {held}\n  max_length: 300\n")
    out = tmp_path / "clean.jsonl"
    assert main(["data", "clean", str(cfg), "--out", str(out), "--drop", "exact-dup,near-dup,contaminated,empty,refusal"]) == 0
    kept = [json.loads(x) for x in open(out)]
    removed = [json.loads(x) for x in open(tmp_path / "removed.jsonl")]
    assert len(kept) + len(removed) == 30 + len(idx)
    lines = {int(r["source"].rsplit(":", 1)[1]) - 1: r["reason"] for r in removed}
    assert set(lines) == {idx["exact"], idx["near"], idx["contaminated"], idx["empty"], idx["refusal"]}
    assert lines[idx["exact"]].startswith("exact duplicate of row 3")
    assert "13-gram" in lines[idx["contaminated"]]
    assert all(r["row"] is not None for r in removed)  # nothing vanishes without a record
    assert main(["data", "clean", str(cfg), "--out", str(out), "--drop", "bogus"]) == 2
    assert "--drop: unknown kinds ['bogus']" in capsys.readouterr().err


def test_report_renders_with_plots(tmp_path, tokenizer):
    from sftkit.data.render import Renderer, build_examples

    train, held, _ = planted(tmp_path)
    rows, tests = load_rows(str(train)), load_rows(str(held))
    q = analyse(rows, tests, tokenizer, max_length=300, diversity=True)
    assert q.diversity is not None and 0 < q.diversity < 1
    exs, _ = build_examples(rows, Renderer(tokenizer, max_length=1024))
    path = write_report(q, rows, exs, tests, tmp_path / "report")
    text = path.read_text()
    assert "near duplicates" in text and "![flags](flags.png)" in text
    for png in ("lengths.png", "flags.png", "diversity.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000


def test_clean_removes_invalid_rows_with_their_message_and_loses_none(tmp_path, tiny_model_dir, capsys):
    good = [{"prompt": f"question {i} about something", "completion": f"answer {i} in words"} for i in range(6)]
    lines = [json.dumps(r) for r in good[:3]] + [
        json.dumps({"prompt": "a question", "completion": "   "}),  # empty reply
        '{"prompt": "torn", "compl',  # malformed JSON
        json.dumps({"prompt": "no reply field"}),
    ] + [json.dumps(r) for r in good[3:]]
    train = tmp_path / "t.jsonl"
    train.write_text("\n".join(lines) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: {train}\n")
    for on_error in ("error", "skip"):
        out = tmp_path / f"clean-{on_error}.jsonl"
        assert main(["data", "clean", str(cfg), f"data.on_error={on_error}", "--out", str(out), "--drop", "empty"]) == 0
        kept = [json.loads(x) for x in open(out)]
        removed = [json.loads(x) for x in open(tmp_path / "removed.jsonl")]
        assert kept == good
        assert {r["source"]: r["reason"] for r in removed} == {
            f"{train}:4": "completion: empty reply",
            f"{train}:5": "malformed JSON: Invalid control character at column 26",
            f"{train}:6": "completion: missing field; the row has prompt",
        }
        assert {r["source"]: r["row"] for r in removed}[f"{train}:5"] == '{"prompt": "torn", "compl'
        assert "read 9 = kept 6 + removed 3" in capsys.readouterr().out
