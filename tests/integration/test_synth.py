"""`sftkit synth` end to end on a tiny random model: rows with provenance, every rejected candidate with
its reason, and a re-run that continues to --n without repeating a candidate or a task."""

import json
from pathlib import Path

import pytest

from sftkit.cli import main
from sftkit.data.sources import load_rows

pytestmark = pytest.mark.slow  # end to end on a real tiny model: `pytest -m 'not slow'` leaves it out

SEEDS = Path(__file__).resolve().parents[2] / "examples" / "synth" / "seed_tasks.jsonl"


def read(path):
    return [json.loads(line) for line in open(path)]


def test_synth_keeps_n_rows_with_provenance_and_continues_without_duplicates(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "synth" / "synth.jsonl"
    common = ["synth", "--seeds", str(SEEDS), "--model", str(tiny_model_dir), "--out", str(out), "--batch-size", "4",
              "--max-new-tokens", "24", "--answer-tokens", "12", "--seed", "3",
              "--answer-temperature", "1.0"]  # a random model's greedy answer is its end token at once
    assert main(common + ["--n", "3"]) == 0
    said = capsys.readouterr().out
    assert f"3 rows in {out}" in said
    first = read(out)
    assert len(first) == 3
    for row in first:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        p = row["provenance"]
        assert p["model"] == str(tiny_model_dir) and p["answer_model"] == str(tiny_model_dir)
        assert p["sampling"] == {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 24}
        assert len(p["seed_ids"]) == 3 and p["seeds_file"] == str(SEEDS) and isinstance(p["candidate"], int)
    seed_ids = {json.loads(line)["id"] for line in open(SEEDS)}
    assert set(first[0]["provenance"]["seed_ids"]) <= seed_ids  # the first prompt shows seeds only
    rejected = read(tmp_path / "synth" / "rejected.jsonl")
    assert all(r["reason"] and "candidate" in r["provenance"] for r in rejected)

    assert main(common + ["--n", "6"]) == 0  # the same command, a larger --n: continues
    rows = read(out)
    assert rows[:3] == first and len(rows) == 6
    rejected = read(tmp_path / "synth" / "rejected.jsonl")
    numbers = [r["provenance"]["candidate"] for r in rows + rejected]
    assert len(numbers) == len(set(numbers))  # no candidate twice
    instructions = [r["messages"][0]["content"] for r in rows]
    assert len(set(instructions)) == 6
    # Once tasks are kept, each prompt shows one of them beside two seeds (as the paper mixes in machine tasks).
    assert all(sum(i.startswith("synth:") for i in r["provenance"]["seed_ids"]) == 1 for r in rows[3:])
    assert len(load_rows(str(out))) == 6  # sftkit trains on it as is

    assert main(common + ["--n", "6"]) == 0  # nothing left to do
    assert read(out) == rows


def test_a_torn_last_line_is_redone_and_bad_settings_are_refused(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "synth.jsonl"
    common = ["synth", "--seeds", str(SEEDS), "--model", str(tiny_model_dir), "--out", str(out), "--batch-size", "4",
              "--max-new-tokens", "24", "--answer-tokens", "12", "--answer-temperature", "1.0"]
    assert main(common + ["--n", "2"]) == 0
    with open(out, "a") as f:
        f.write('{"messages": [{"role": "user", "con')  # killed mid-write
    assert main(common + ["--n", "3"]) == 0
    assert len(read(out)) == 3
    capsys.readouterr()
    assert main(common + ["--n", "4", "--best-of", "2"]) == 2
    assert "--best-of N needs --reward" in capsys.readouterr().err
    assert main(common + ["--n", "4", "--max-candidates", "1"]) == 2
    assert "short of --n 4" in capsys.readouterr().err
