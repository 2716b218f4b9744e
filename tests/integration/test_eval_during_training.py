"""eval.generate scores replies at every eval; eval.select picks the best eval and drives early stopping."""

import json

import pytest

from sftkit.cli import main
from sftkit.config import ConfigError, load_config
from sftkit.trainer import train

from ..conftest import write_jsonl

pytestmark = pytest.mark.slow

CALLS: list[int] = []


def scripted(prediction: str, reference: str) -> float:
    """A generation metric that is 1.0 on the first eval's replies, 0.5 on the second's, then 0."""
    CALLS.append(1)
    return {1: 1.0, 2: 0.5}.get((len(CALLS) + 1) // 2, 0.0)  # two held-out rows per eval (eval.limit 2)


def cfg_for(tmp_path, model_dir, rows, **over):
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    held = write_jsonl(tmp_path / "held.jsonl", rows[:4])
    base = {"model.name": str(model_dir), "data.train": str(data), "data.eval": str(held), "data.max_length": 128,
            "train.lr": 1e-3, "train.seed": 7, "train.batch_size": 4, "output_dir": str(tmp_path / "run"),
            "eval.generate": True, "eval.limit": 2, "eval.max_new_tokens": 4, "eval.compare_base": False,
            "eval.reference": None}
    return load_config(None, {**base, **over})


def test_generation_is_scored_at_every_eval_and_eval_select_picks_the_best_and_stops_early(tmp_path, tiny_model_dir,
                                                                                           chat_rows):
    CALLS.clear()
    cfg = cfg_for(tmp_path, tiny_model_dir, chat_rows, **{
        "train.max_steps": 8, "train.eval_every": 2, "train.patience": 1,
        "eval.select": "tests.integration.test_eval_during_training:scripted"})
    result = train(cfg)
    records = [json.loads(x) for x in open(result.run_dir / "metrics.jsonl")]
    evals = [r for r in records if "eval_loss" in r]
    key = "tests.integration.test_eval_during_training:scripted"
    assert [(r["step"], r[key]) for r in evals] == [(2, 1.0), (4, 0.5)]  # stopped after one eval without gain
    assert all("exact_match" in r and r["generate_seconds"] > 0 for r in evals)  # eval.metric scored beside it
    assert [r["step"] for r in records if r.get("best")] == [2]
    assert result.stopped == "early stopping" and result.steps == 4
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert "best (step 2)" in json.dumps(summary)  # the final model is the best eval's weights


def test_eval_select_by_a_generation_metric_needs_eval_generate(tmp_path, tiny_model_dir, chat_rows):
    with pytest.raises(ConfigError, match="eval.select: exact_match is scored on generated replies"):
        train(cfg_for(tmp_path, tiny_model_dir, chat_rows, **{"eval.generate": False, "eval.select": "exact_match"}))
    with pytest.raises(ConfigError, match="eval.select: 'exact_mtch' is not"):
        train(cfg_for(tmp_path, tiny_model_dir, chat_rows, **{"eval.select": "exact_mtch"}))
    assert not (tmp_path / "run").exists()


def test_named_eval_sets_are_scored_each_and_their_mean_or_one_of_them_selects(tmp_path, tiny_model_dir, chat_rows):
    a = write_jsonl(tmp_path / "a.jsonl", chat_rows[:3])
    b = write_jsonl(tmp_path / "b.jsonl", chat_rows[6:9])
    cfg = cfg_for(tmp_path, tiny_model_dir, chat_rows, **{
        "data.eval": {"sums": str(a), "doubles": str(b)}, "train.max_steps": 4, "train.eval_every": 2,
        "eval.select": "doubles"})
    result = train(cfg)
    evals = [json.loads(x) for x in open(result.run_dir / "metrics.jsonl") if '"eval_loss"' in x]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        for key in ("eval_loss", "eval_accuracy", "exact_match"):
            per = [r[f"eval/sums/{key}"], r[f"eval/doubles/{key}"]]
            assert abs(r[key] - sum(per) / 2) < 1e-9  # the plain figure is the sets' mean
        assert r["eval/sums/eval_loss"] != r["eval/doubles/eval_loss"]
    best = min(evals, key=lambda r: r["eval/doubles/eval_loss"])  # eval.select: doubles = that set's eval loss
    assert [r["step"] for r in evals if r.get("best")][-1] == best["step"]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert {"tuned", "tuned/sums", "tuned/doubles"} <= set(summary["scores"])
    assert abs(summary["scores"]["tuned"] - (summary["scores"]["tuned/sums"] + summary["scores"]["tuned/doubles"]) / 2) < 1e-9
    assert summary["best_step"] == best["step"]

    # `sftkit compare` with no --data scores base and tuned on the run's own sets, each and their mean.
    assert main(["compare", str(tiny_model_dir), str(result.run_dir), "--metrics", "exact_match",
                 "--max-new-tokens", "2"]) == 0
    tuned = json.loads((result.run_dir / "compare" / "tuned" / "eval.json").read_text())["metrics"]
    base = json.loads((result.run_dir / "compare" / "base" / "eval.json").read_text())["metrics"]
    assert {"sums/eval_loss", "doubles/eval_loss", "sums/exact_match", "mean/exact_match"} <= set(tuned) & set(base)
    for name in ("sums", "doubles"):  # the final model is the best eval's: its per-set loss, measured again
        assert tuned[f"{name}/eval_loss"] == pytest.approx(best[f"eval/{name}/eval_loss"], abs=1e-4)
    assert tuned["mean/eval_loss"] == pytest.approx((tuned["sums/eval_loss"] + tuned["doubles/eval_loss"]) / 2)
    preds = [json.loads(x) for x in open(result.run_dir / "compare" / "tuned" / "predictions.jsonl")]
    assert [p["eval_set"] for p in preds] == ["sums"] * 3 + ["doubles"] * 3
    report = (result.run_dir / "report.md").read_text()
    assert "# Base vs tuned on 2 held-out sets" in report and "doubles/exact_match" in report


def test_compare_names_the_sets_it_is_given(tmp_path, chat_rows):
    from sftkit.compare import held_out_sets

    a = write_jsonl(tmp_path / "a.jsonl", chat_rows[:3])
    b = write_jsonl(tmp_path / "b.jsonl", chat_rows[3:5])
    cfg = load_config(None, {"data.train": str(a)})
    sets = held_out_sets(cfg, [f"x={a}", str(b)])
    assert {n: len(r) for n, (_, r) in sets.items()} == {"x": 3, "b": 2}
    assert list(held_out_sets(cfg, [str(a)])) == [""]  # one file: one unnamed set, as before
    with pytest.raises(ConfigError, match="the set name 'a' is given twice"):
        held_out_sets(cfg, [str(a), f"a={b}"])
    with pytest.raises(ConfigError, match="the run has no held-out rows"):
        held_out_sets(cfg, [])


def test_named_training_sources_give_named_held_out_sets(tmp_path, tiny_model_dir, chat_rows):
    from sftkit.data import read

    a = write_jsonl(tmp_path / "a.jsonl", chat_rows[:6])
    b = write_jsonl(tmp_path / "b.jsonl", chat_rows[6:])
    cfg = load_config(None, {"data.train": [{"path": str(a), "name": "first"}, str(b)], "data.eval_fraction": 0.5})
    train_rows, held, _ = read(cfg.data, 7)
    assert {r.eval_set for r in held} == {"first", None} and not {r.eval_set for r in train_rows} - {None}
    with pytest.raises(ConfigError, match=r"eval.select: 'secnd' is not .* an eval set \(first, other\)"):
        train(load_config(None, {"data.train": [{"path": str(a), "name": "first"}, str(b)], "data.eval_fraction": 0.5,
                                 "eval.select": "secnd", "output_dir": str(tmp_path / "x")}))
    with pytest.raises(ConfigError, match="named eval sets .* are for task: sft"):
        train(load_config(None, {"task": "preference", "data.train": str(a), "data.eval": {"x": str(b)},
                                 "output_dir": str(tmp_path / "y")}))
