"""Candidates for people to judge: `sftkit generate --n N --runs ...` on tiny models, then a review
of them turned into preference pairs."""

from __future__ import annotations

import json

import pytest

from sftkit.cli import main
from sftkit.generate import generate_ids, load_for_inference
from sftkit.reviews import review_pairs

from ..conftest import make_tiny_llama, write_jsonl

pytestmark = pytest.mark.slow


def test_generate_n_mixes_shuffled_candidates_of_several_models_each_made_again_from_its_seed(
        tmp_path, tiny_model_dir, tokenizer):
    other = tmp_path / "other"
    make_tiny_llama(tokenizer, seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Say hello."}, {"prompt": "Name a colour."},
                                                 {"prompt": "Count to three."}])
    out = tmp_path / "candidates.jsonl"
    assert main(["generate", str(tiny_model_dir), "--runs", str(other), "--input", str(prompts), "--output", str(out),
                 "--n", "3", "--temperature", "0.8", "--max-new-tokens", "6", "--seed", "4"]) == 0
    rows = [json.loads(x) for x in open(out)]
    assert [r["id"] for r in rows] == ["a", "2", "3"]
    for r in rows:
        cands = r["candidates"]
        assert [c["id"] for c in cands] == [f"{r['id']}-c{k}" for k in range(6)]
        assert sorted(c["model"] for c in cands) == sorted([str(tiny_model_dir)] * 3 + [str(other)] * 3)
        assert all(c["temperature"] == 0.8 and c["top_p"] == 1.0 for c in cands)
    orders = [[c["model"] == str(tiny_model_dir) for c in r["candidates"]] for r in rows]
    assert any(o != [True] * 3 + [False] * 3 for o in orders)  # shuffled: the place does not give the source away
    model, tok, data_cfg = load_for_inference(str(other))
    from sftkit.data import renderer_for

    c = next(c for c in rows[1]["candidates"] if c["model"] == str(other))
    again = generate_ids(model, renderer_for(data_cfg, tok), [[{"role": "user", "content": "Name a colour."}]], 6, 1,
                         temperature=0.8, row_seeds=[c["seed"]])[0]
    assert tok.decode(again, skip_special_tokens=True) == c["reply"]  # made again alone from its seed

    first = rows[0]["candidates"]
    reviews = write_jsonl(tmp_path / "reviews.jsonl", [{
        "reviewer": "ana", "time": "t", "candidates": "candidates.jsonl", "prompt_id": "a",
        "ranking": [[first[0]["id"]], [first[1]["id"]]], "grades": {first[0]["id"]: {"overall": 4},
                                                                    first[1]["id"]: {"overall": 2}}}])
    (pair,), _ = review_pairs(reviews)
    assert (pair["prompt"], pair["chosen"], pair["rejected"], pair["margin"]) == (
        "Say hello.", first[0]["reply"], first[1]["reply"], 2.0)


def test_generate_n_refuses_what_it_cannot_do(tmp_path, tiny_model_dir, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    args = ["generate", str(tiny_model_dir), "--input", str(prompts), "--output", str(tmp_path / "c.jsonl"), "--n", "2"]
    assert main(args) == 2 and "give --temperature > 0" in capsys.readouterr().err
    assert main([*args, "--temperature", "0.8", "--runs", str(tiny_model_dir)]) == 2
    assert "a model is given twice" in capsys.readouterr().err
