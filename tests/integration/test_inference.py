"""eval, compare, generate, chat and export on a tiny trained run."""

import io
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sftkit.cli import main
from sftkit.config import load_config
from sftkit.generate import chat, load_for_inference
from sftkit.trainer import train

from ..conftest import write_jsonl

pytestmark = pytest.mark.slow  # end to end on a real tiny model: `pytest -m 'not slow'` leaves it out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("run")
    rows = [{"prompt": f"label {i}", "completion": "spam" if i % 2 else "ham"} for i in range(16)]
    train_file = write_jsonl(tmp / "train.jsonl", rows)
    eval_file = write_jsonl(tmp / "eval.jsonl", rows[:6])
    cfg = load_config(None, {"model.name": str(tiny_model_dir), "data.train": str(train_file), "peft.r": 4,
                             "train.max_steps": 8, "train.lr": 3e-2, "train.batch_size": 4, "output_dir": str(tmp / "run")})
    train(cfg)
    return tmp / "run", eval_file, train_file


def test_eval_writes_metrics_predictions_and_classification(tiny_run, tmp_path, monkeypatch, capsys):
    run, eval_file, _ = tiny_run
    (tmp_path / "m.py").write_text("def is_ham(p, r):\n    return float(p.strip() == 'ham')\n")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(run), "--data", str(eval_file), "--metrics", "exact_match,m:is_ham",
                 "--max-new-tokens", "4", "--out", str(tmp_path / "ev")]) == 0
    body = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert {"eval_loss", "perplexity", "token_accuracy", "exact_match", "m:is_ham", "macro_f1"} <= set(body["metrics"])
    assert body["classification"]["labels"][:2] == ["ham", "spam"]
    preds = [json.loads(line) for line in open(tmp_path / "ev" / "predictions.jsonl")]
    assert len(preds) == 6 and set(preds[0]) == {"source", "prompt", "reference", "prediction", "scores"}
    assert body["metrics"]["exact_match"] == pytest.approx(sum(p["scores"]["exact_match"] for p in preds) / 6)
    assert "confusion (rows = reference" in capsys.readouterr().out


def test_compare_writes_report_and_plot(tiny_run, tiny_model_dir, capsys):
    run, eval_file, train_file = tiny_run
    assert main(["compare", str(tiny_model_dir), str(run), "--data", str(eval_file), "--few-shot", "2",
                 "--max-new-tokens", "4", "--metrics", "exact_match"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "base", "tuned", "base+2first", "base+2nearest"]
    assert " wins on exact_match " in out  # which row wins, at what cost
    assert (run / "compare.png").stat().st_size > 1000
    report = (run / "report.md").read_text()
    assert "# Base vs tuned" in report and "exact_match" in report
    assert "## Task gain next to forgetting" in report and "Forgetting: perplexity on the reference text" in report
    assert "prompt tokens and" in report and "base+2nearest: 2 nearest shots from" in report
    tuned = json.loads((run / "compare" / "tuned" / "eval.json").read_text())["metrics"]
    shots = json.loads((run / "compare" / "base+2first" / "eval.json").read_text())["metrics"]
    assert shots["prompt_tokens"] > tuned["prompt_tokens"] > 0 and tuned["seconds_per_answer"] > 0
    for name in ("base", "tuned", "base+2first", "base+2nearest"):
        assert (run / "compare" / name / "eval.json").is_file()


def test_compare_takes_the_tuned_loss_from_the_runs_final_eval_only_when_it_is_the_same(tmp_path, tiny_model_dir, capsys):
    rows = [{"prompt": f"label {i}", "completion": "spam" if i % 2 else "ham"} for i in range(16)]
    train_file, eval_file = write_jsonl(tmp_path / "t.jsonl", rows), write_jsonl(tmp_path / "e.jsonl", rows[:6])
    run = train(load_config(None, {"model.name": str(tiny_model_dir), "data.train": str(train_file), "peft.r": 4,
                                   "data.eval": str(eval_file), "train.max_steps": 4, "train.lr": 3e-2,
                                   "output_dir": str(tmp_path / "run")})).run_dir
    args = ["compare", str(tiny_model_dir), str(run), "--data", str(eval_file), "--max-new-tokens", "2", "--metrics", "exact_match"]
    assert main(args) == 0
    reused = json.loads((run / "compare" / "tuned" / "eval.json").read_text())["metrics"]
    assert "the run's final eval on the same rows" in capsys.readouterr().err
    last = [json.loads(line) for line in open(run / "metrics.jsonl")][-1]
    assert reused["eval_loss"] == last["eval_loss"] and reused["token_accuracy"] == last["eval_accuracy"]
    eval_file.write_text(eval_file.read_text())  # touched after the run: measured again
    assert main(args) == 0
    measured = json.loads((run / "compare" / "tuned" / "eval.json").read_text())["metrics"]
    assert "the run's final eval" not in capsys.readouterr().err
    # The merged model measured afresh gives what the run's own eval gave (adapter unmerged).
    assert measured["eval_loss"] == pytest.approx(reused["eval_loss"], abs=1e-4)
    assert measured["token_accuracy"] == reused["token_accuracy"]


def test_generate_matches_eval_predictions_and_keeps_rows(tiny_run, tmp_path):
    run, eval_file, _ = tiny_run
    out = tmp_path / "gen.jsonl"
    assert main(["generate", str(run), "--input", str(eval_file), "--output", str(out), "--max-new-tokens", "4"]) == 0
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 6 and all("generated" in r and "prompt" in r for r in rows)
    assert main(["eval", str(run), "--data", str(eval_file), "--max-new-tokens", "4", "--out", str(tmp_path / "e")]) == 0
    preds = [json.loads(line)["prediction"] for line in open(tmp_path / "e" / "predictions.jsonl")]
    assert [r["generated"] for r in rows] == preds  # same template, same greedy decoding


def test_chat_streams_keeps_history_and_takes_commands(tiny_run):
    run, _, _ = tiny_run
    model, tok, data_cfg = load_for_inference(str(run))
    out = io.StringIO()
    chat(model, tok, data_cfg, max_new_tokens=3, stdin=io.StringIO("hello\n/system Be terse.\nagain\n/reset\n/exit\nnever\n"),
         stdout=out)
    text = out.getvalue()
    assert text.count("model> ") == 2
    assert "(system message set; conversation cleared)" in text and "(conversation cleared)" in text


def test_export_merge_gives_same_logits_as_base_plus_adapter(tiny_run, tiny_model_dir, tmp_path):
    run, _, _ = tiny_run
    out = tmp_path / "merged"
    assert main(["export", str(run), "--merge", "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                             str(run / "final" / "adapter")).eval()
    ids = torch.tensor([[1, 5, 77, 300, 4000, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, rtol=1e-5, atol=1e-5)
    assert (out / "chat_template.jinja").is_file()
    assert main(["export", str(run), "--merge", "--out", str(out)]) == 2  # never overwritten silently


def test_eval_set_layers_over_the_runs_own_data_settings(tmp_path, tiny_model_dir, capsys):
    from sftkit.compare import run_eval

    rows = [{"prompt": f"label {i}", "completion": "ham"} for i in range(4)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    train(load_config(None, {"model.name": str(tiny_model_dir), "data.train": str(data), "peft.r": 4,
                             "train.max_steps": 1, "data.system": "You label messages.", "data.template": "chatml",
                             "data.mask": "assistant", "eval.reference": None, "output_dir": str(tmp_path / "run")}))
    _, used = run_eval(str(tmp_path / "run"), str(data), ["exact_match"], generate=False,
                       data_overrides={"data.max_length": 64})
    assert (used.system, used.template, used.mask, used.max_length) == ("You label messages.", "chatml", "assistant", 64)
    assert main(["eval", str(tmp_path / "run"), "--data", str(data), "--no-generate", "--set", "data.max_lenght=64"]) == 2
    assert "unknown config key 'data.max_lenght'" in capsys.readouterr().err
