"""task: reward — a Bradley-Terry reward model saved for plain transformers; `sftkit score`; best-of-n."""

import json

import pytest
import torch

from sftkit.cli import main
from sftkit.config import load_config
from sftkit.trainer import train

from ..conftest import write_jsonl

pytestmark = pytest.mark.slow  # end to end on a real tiny model: `pytest -m 'not slow'` leaves it out

NAMES = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus", "Hal"]
PAIRS = [{"prompt": f"Greet {n}.", "chosen": "Hello there!", "rejected": "Go away."} for n in NAMES] + \
        [{"prompt": f"Thank {n}.", "chosen": "Thank you so much!", "rejected": "Whatever."} for n in NAMES]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("reward")
    data = write_jsonl(tmp / "p.jsonl", [dict(p, margin=1.0) for p in PAIRS])
    r = train(load_config(None, {"task": "reward", "model.name": str(tiny_model_dir), "data.train": str(data),
                                 "data.eval": str(data), "peft.method": "full", "train.lr": 1e-2, "train.batch_size": 16,
                                 "train.max_steps": 30, "train.eval_every": 10, "eval.reference": None,
                                 "output_dir": str(tmp / "run")}))
    return r


def test_reward_model_learns_and_loads_in_plain_transformers(reward_run, tokenizer):
    from transformers import AutoModelForSequenceClassification

    summary = json.loads((reward_run.run_dir / "summary.json").read_text())
    assert summary["scores"]["tuned"] >= 0.9 and summary["scores"]["tuned"] > summary["scores"]["base"]
    assert {"eval_loss", "eval_accuracy", "eval_reward_mean", "eval_reward_std"} <= set(summary["metrics"])
    model = AutoModelForSequenceClassification.from_pretrained(reward_run.run_dir / "final" / "model").eval()
    assert model.config.num_labels == 1
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reward_run.run_dir / "final" / "model")
    texts = [tok.apply_chat_template([{"role": "user", "content": "Greet Ann."}, {"role": "assistant", "content": r}],
                                     tokenize=False) for r in ("Hello there!", "Go away.")]
    with torch.no_grad():
        good, bad = (model(**tok(t, return_tensors="pt")).logits[0, 0] for t in texts)
    assert good > bad  # the saved model ranks as the trained one does
    records = [json.loads(x) for x in open(reward_run.run_dir / "metrics.jsonl")]
    assert "accuracy" in records[0] and "rewards/margin" in records[0]


def test_score_adds_a_score_per_row(reward_run, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "Greet Bob.", "completion": "Hello there!"},
                                                  {"prompt": "Greet Bob.", "completion": "Go away."}])
    assert main(["score", str(reward_run.run_dir), "--input", str(rows), "--output", str(tmp_path / "s.jsonl")]) == 0
    scored = [json.loads(x) for x in open(tmp_path / "s.jsonl")]
    assert scored[0]["score"] > scored[1]["score"] and scored[0]["completion"] == "Hello there!"


def test_best_of_n_keeps_the_argmax_and_writes_pairs(reward_run, tiny_model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"Greet {n}."} for n in NAMES[:3]])
    out, pairs = tmp_path / "best.jsonl", tmp_path / "pairs.jsonl"
    assert main(["generate", str(tiny_model_dir), "--input", str(prompts), "--output", str(out), "--best-of", "4",
                 "--reward", str(reward_run.run_dir), "--temperature", "1.0", "--max-new-tokens", "6",
                 "--pairs-out", str(pairs)]) == 0
    for row in map(json.loads, open(out)):
        assert len(row["candidates"]) == 4
        best = max(row["candidates"], key=lambda c: c["score"])
        assert row["generated"] == best["reply"] and row["score"] == best["score"]
    for p in map(json.loads, open(pairs)):
        assert p["margin"] > 0 and p["chosen"] != p["rejected"]


def test_best_of_n_needs_a_reward_and_sampling(tiny_model_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    assert main(["generate", str(tiny_model_dir), "--input", str(prompts), "--output", str(tmp_path / "o.jsonl"),
                 "--best-of", "3"]) == 2
    assert "--best-of N needs N >= 2 and --reward REWARD_RUN" in capsys.readouterr().err


def test_synth_best_of_n_keeps_the_answer_the_reward_model_scores_highest(reward_run, tiny_model_dir, tmp_path):
    from pathlib import Path

    from sftkit.tasks.reward import Scorer

    seeds = Path(__file__).resolve().parents[2] / "examples" / "synth" / "seed_tasks.jsonl"
    out = tmp_path / "synth.jsonl"
    assert main(["synth", "--seeds", str(seeds), "--model", str(tiny_model_dir), "--out", str(out), "--n", "3",
                 "--batch-size", "4", "--max-new-tokens", "20", "--answer-tokens", "8", "--reward", str(reward_run.run_dir),
                 "--best-of", "3", "--answer-temperature", "1.0"]) == 0
    rows = [json.loads(x) for x in open(out)]
    scorer = Scorer(str(reward_run.run_dir))
    for row in rows:
        p = row["provenance"]
        assert p["reward"] == str(reward_run.run_dir) and p["answer_sampling"]["best_of"] == 3 and len(p["scores"]) == 3
        kept = scorer.score([(row["messages"][:1], row["messages"][1:])])[0]
        assert kept == pytest.approx(max(p["scores"]), abs=1e-4)  # the kept answer is the argmax
        assert len(set(p["scores"])) > 1  # three different samples, really scored


def test_a_reply_after_a_prompt_longer_than_max_length_is_still_what_is_scored(reward_run, capsys):
    """The prompt is cut from its start, the reply kept whole: two replies to one long prompt get the
    scores they get after the prompt's end (not one score for the prompt alone), and the log says so."""
    from sftkit.tasks.reward import Scorer

    scorer = Scorer(str(reward_run.run_dir))
    long_prompt = [{"role": "user", "content": "Please, " * 60 + "greet Ann."}]
    replies = [[{"role": "assistant", "content": r}] for r in ("Hello there!", "Go away.")]
    full = scorer.score([(long_prompt, r) for r in replies])
    scorer.renderer.max_length = 40  # the prompt alone is longer than this
    cut = scorer.score([(long_prompt, r) for r in replies])
    assert cut[0] != cut[1]  # each reply is read
    assert cut[0] > cut[1]  # and ranked as the model ranks them
    assert full != cut  # the prompt was cut
    err = capsys.readouterr().err
    assert "2 of 2 prompt + reply pairs are longer than data.max_length=40" in err
    assert "the reply whole and the prompt cut from its start" in err


def graded_review(tmp, n_prompts: int = 40):
    """Candidates whose replies carry 0-4 times the word "good" among fixed-length filler, graded by
    one reviewer by that rule (1 + the count), and ranked by it."""
    import random

    rng = random.Random(0)
    filler = ["tree", "blue", "stone", "river", "lamp", "cloud", "paper", "glass"]
    rows, reviews = [], []
    for i in range(n_prompts):
        cands = []
        for k, count in enumerate(rng.sample(range(5), 4)):
            words = ["good"] * count + rng.sample(filler, 8 - count)
            rng.shuffle(words)
            cands.append({"id": f"p{i}-c{k}", "reply": " ".join(words), "count": count})
        rows.append({"id": f"p{i}", "prompt": f"Describe thing {i}.", "candidates": cands})
        order = sorted(cands, key=lambda c: -c["count"])
        reviews.append({"reviewer": "ana", "time": "t", "candidates": "candidates.jsonl", "prompt_id": f"p{i}",
                        "grades": {c["id"]: {"overall": 1 + c["count"]} for c in cands},
                        "ranking": [[c["id"]] for c in order]})
    write_jsonl(tmp / "candidates.jsonl", rows)
    return write_jsonl(tmp / "reviews.jsonl", reviews)


@pytest.mark.parametrize("objective", ["grades", "pairs"])
def test_a_reward_model_from_peoples_grades_ranks_held_out_replies_by_their_rule(tmp_path, tiny_model_dir, objective):
    reviews = graded_review(tmp_path)
    r = train(load_config(None, {"task": "reward", "model.name": str(tiny_model_dir), "data.train": str(reviews),
                                 "data.eval_fraction": 0.25, "reward.objective": objective, "peft.method": "full",
                                 "train.lr": 3e-3, "train.batch_size": 16, "train.max_steps": 60,
                                 "train.eval_every": 30, "eval.reference": None, "output_dir": str(tmp_path / "run")}))
    summary = json.loads((r.run_dir / "summary.json").read_text())
    m = summary["metrics"]
    assert m["eval_spearman"] > 0.8, m  # held-out prompts' replies ranked by the rule that graded them
    assert m["eval_accuracy"] > 0.85 and {"eval_reward_mean", "eval_reward_std"} <= set(m)
    assert summary["scores"]["base"] < 0.75 < summary["scores"]["tuned"]  # held-out pairwise accuracy, before and after
    assert [json.loads(x)["step"] for x in open(r.run_dir / "metrics.jsonl") if '"eval_spearman"' in x] == [30, 60]


def test_grades_need_a_review_file(tmp_path, tiny_model_dir):
    from sftkit.config import ConfigError

    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    with pytest.raises(ConfigError, match="reward.objective: grades learns from people's grades"):
        train(load_config(None, {"task": "reward", "data.train": str(data), "reward.objective": "grades",
                                 "output_dir": str(tmp_path / "r")}))
    with pytest.raises(ConfigError, match="reward.objective: expected one of pairs, grades"):
        train(load_config(None, {"task": "reward", "data.train": str(data), "reward.objective": "ordinal",
                                 "output_dir": str(tmp_path / "r")}))
