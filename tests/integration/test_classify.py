"""Classification: each method on tiny decoder and encoder models, caching, reload, predict, errors."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel

from sftkit.cli import main
from sftkit.config import ConfigError, load_config
from sftkit.data.sources import DataError
from sftkit.models import resolve
from sftkit.tasks.classification import LabelledText, class_weights, stratified_split
from sftkit.trainer import train

from ..conftest import write_jsonl

pytestmark = pytest.mark.slow  # end to end on a real tiny model: `pytest -m 'not slow'` leaves it out

ROWS = [{"text": f"{w} item number {i}", "label": lab}
        for i in range(12) for w, lab in (("great", "pos"), ("awful", "neg"), ("meh", "mid"))]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(resolve("minilm-l6"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def cfg(tmp_path, model_dir, name, **over):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    d = {"task": "classification", "model.name": str(model_dir), "data.train": str(train), "data.eval_fraction": 0.25,
         "data.max_length": 32, "train.lr": 5e-3, "train.batch_size": 8, "train.max_steps": 12, "train.eval_every": 4,
         "output_dir": str(tmp_path / name)}
    d.update(over)
    return load_config(None, d)


@pytest.mark.parametrize("model", ["llama", "bert"])
def test_head_only_leaves_backbone_identical_and_cache_changes_nothing(tmp_path, tiny_model_dir, tiny_bert_dir, model):
    model_dir = tiny_model_dir if model == "llama" else tiny_bert_dir
    cached = train(cfg(tmp_path, model_dir, "cached", **{"peft.method": "head"}))
    uncached = train(cfg(tmp_path, model_dir, "uncached", **{"peft.method": "head"}), options={"cache": False})
    before = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3).base_model.state_dict()
    after = cached.model.base_model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # bit-identical backbone
    a = dict(cached.model.named_parameters())
    for n, p in uncached.model.named_parameters():
        torch.testing.assert_close(p, a[n], rtol=1e-5, atol=1e-6, msg=n)
    lines = [json.loads(x) for x in open(cached.run_dir / "metrics.jsonl")]
    lines_u = [json.loads(x) for x in open(uncached.run_dir / "metrics.jsonl")]
    assert [round(x["loss"], 5) for x in lines] == [round(x["loss"], 5) for x in lines_u]


@pytest.mark.parametrize("method,extra", [("freeze", {"peft.trainable": ["last:1"]}), ("lora", {"peft.r": 4}),
                                          ("full", {})])
def test_methods_train_and_reload_in_plain_transformers_with_same_predictions(tmp_path, tiny_model_dir, method, extra):
    r = train(cfg(tmp_path, tiny_model_dir, method, **{"peft.method": method, **extra}))
    assert {"accuracy", "macro_f1", "eval_loss", "majority_baseline_macro_f1"} <= set(r.metrics)
    assert (r.run_dir / "confusion.png").is_file()
    reloaded = AutoModelForSequenceClassification.from_pretrained(r.run_dir / "final" / "model").eval()
    assert set(reloaded.config.id2label.values()) == {"mid", "neg", "pos"}
    tok = AutoTokenizer.from_pretrained(r.run_dir / "final" / "model")
    enc = tok(["great item number 99", "awful thing"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**enc).logits, r.model.eval()(**enc).logits, rtol=1e-5, atol=1e-5)


def test_encoder_learns_beyond_majority_and_predict_writes_probabilities(tmp_path, tiny_bert_dir, capsys):
    c = cfg(tmp_path, tiny_bert_dir, "bert-full", **{"peft.method": "full", "train.max_steps": 40, "train.lr": 3e-3})
    r = train(c)
    assert r.metrics["macro_f1"] > r.metrics["majority_baseline_macro_f1"]
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "great item number 5", "id": 1}, {"text": "awful item", "id": 2}])
    assert main(["predict", str(r.run_dir), "--input", str(inp), "--output", str(tmp_path / "out.jsonl")]) == 0
    out = [json.loads(x) for x in open(tmp_path / "out.jsonl")]
    assert [o["id"] for o in out] == [1, 2]
    assert all(abs(sum(o["probabilities"].values()) - 1) < 1e-4 and o["predicted"] in o["probabilities"] for o in out)


def test_bad_rows_and_class_weights_and_stratified_split(tmp_path, tiny_model_dir):
    p = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    c = load_config(None, {"task": "classification", "model.name": str(tiny_model_dir), "data.train": str(p),
                           "output_dir": str(tmp_path / "bad")})
    with pytest.raises(DataError, match=r"train.jsonl:2: label: missing field"):
        train(c)
    rows = [LabelledText("t", lab, "x", i) for i, lab in enumerate(["a"] * 6 + ["b"] * 2)]
    w = class_weights("auto", rows, ["a", "b"])
    assert w.tolist() == pytest.approx([8 / (2 * 6), 8 / (2 * 2)])
    kept, held = stratified_split(rows, 0.5, 0)
    assert sorted(r.label for r in held) == ["a", "a", "a", "b"]


def test_data_inspect_reports_labels_and_imbalance(tmp_path, tiny_model_dir, capsys):
    rows = [{"text": f"fine message {i}", "label": "ham"} for i in range(9)] + [{"text": "win cash now", "label": "spam"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"task: classification\nmodel:\n  name: {tiny_model_dir}\ndata:\n  train: {data}\n")
    assert main(["data", "inspect", str(cfg_path), "--no-embeddings"]) == 0
    out = capsys.readouterr().out
    assert "labels: ham 9 (90%), spam 1 (10%)" in out
    assert "imbalance 9.0:1, consider classify.class_weights=auto" in out


def test_texts_longer_than_the_encoder_limit_follow_data_truncation(tmp_path, tiny_bert_dir, capsys):
    """The tiny BERT takes 128 positions; data.max_length defaults to 1024."""
    long = [{"text": "great " * 300, "label": "pos"}, {"text": "awful " * 300, "label": "neg"}]
    rows = ROWS + long
    write_jsonl(tmp_path / "train.jsonl", rows)
    c = cfg(tmp_path, tiny_bert_dir, "long", **{"peft.method": "full", "train.max_steps": 2})
    c.data.train = str(write_jsonl(tmp_path / "long.jsonl", rows))
    c.data.max_length = 1024
    r = train(c)
    assert r.steps == 2
    assert "data.max_length=1024 is more than" in capsys.readouterr().err
    c2 = cfg(tmp_path, tiny_bert_dir, "long-err", **{"data.truncation": "error", "data.max_length": 1024})
    c2.data.train = str(tmp_path / "long.jsonl")
    with pytest.raises(DataError, match=r"long.jsonl:37: text: \d+ tokens, longer than data.max_length=128"):
        train(c2)


@pytest.mark.parametrize("key,value", [("data.pack", True), ("train.kl_to_base", 0.1), ("eval.generate", True),
                                       ("train.checkpointing", True)])
def test_keys_classification_does_not_use_stop_the_run(tmp_path, tiny_bert_dir, key, value):
    with pytest.raises(ConfigError, match=f"task: classification does not use {key}"):
        train(cfg(tmp_path, tiny_bert_dir, "k", **{key: value}))
    assert not (tmp_path / "k").exists()  # stopped before any work


def _losses(run_dir):
    return [json.loads(x)["loss"] for x in open(run_dir / "metrics.jsonl")]


@pytest.mark.parametrize("method", ["head", "lora"])
def test_classifier_checkpoints_and_resumes_bitwise(tmp_path, tiny_bert_dir, method):
    """The shared loop gives classification checkpoints, --resume and gradient accumulation."""
    over = {"peft.method": method, "train.grad_accum": 2, "train.batch_size": 4, "train.save_every": 2,
            "train.schedule": "constant", "classify.class_weights": "auto"}
    ref = train(cfg(tmp_path, tiny_bert_dir, "ref", **over, **{"train.max_steps": 8}))
    train(cfg(tmp_path, tiny_bert_dir, "cut", **over, **{"train.max_steps": 5}))  # "killed" after step 5
    resumed = train(cfg(tmp_path, tiny_bert_dir, "cut", **over, **{"train.max_steps": 8}), resume=True)
    assert _losses(resumed.run_dir) == _losses(ref.run_dir)  # step for step, bitwise
    a, b = dict(ref.model.named_parameters()), dict(resumed.model.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed.metrics["macro_f1"] == ref.metrics["macro_f1"]


def test_two_processes_train_the_classifier_of_one(tmp_path, tiny_model_dir):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    c = tmp_path / "c.yaml"
    c.write_text(yaml.safe_dump({"task": "classification", "model": {"name": str(tiny_model_dir)},
                                 "data": {"train": str(train), "eval_fraction": 0.25, "max_length": 32},
                                 "peft": {"method": "full"}, "train": {"lr": 5e-3, "batch_size": 4, "max_steps": 6,
                                                                       "eval_every": 3}}))
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    for args in (["--nproc", "2", f"output_dir={tmp_path / 'two'}"], [f"output_dir={tmp_path / 'one'}", "train.batch_size=8"]):
        r = subprocess.run([sys.executable, "-m", "sftkit", "train", str(c), *args], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    two, one = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert len(two) == len(one) == 6 and all(abs(x - y) < 1e-5 for x, y in zip(two, one)), (two, one)
    assert (tmp_path / "two" / "final" / "model" / "config.json").is_file()


def test_classifier_logs_to_tensorboard_and_guards_non_finite_steps(tmp_path, tiny_bert_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sftkit.trainer import TrainingError

    r = train(cfg(tmp_path, tiny_bert_dir, "tb", **{"log.tensorboard": True, "train.max_steps": 3}))
    acc = EventAccumulator(str(r.run_dir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    with pytest.raises(TrainingError, match="3 consecutive steps with a non-finite loss or gradient"):
        train(cfg(tmp_path, tiny_bert_dir, "nan", **{
            "peft.method": "full", "train.lr": 1e30, "train.max_grad_norm": 0, "train.max_bad_steps": 2,
            "train.max_steps": 30}))
    records = [json.loads(x) for x in open(tmp_path / "nan" / "metrics.jsonl")]
    assert sum(1 for x in records if x.get("skipped")) == 3


def test_unknown_classifier_model_is_one_line(tmp_path, capsys):
    c = tmp_path / "c.yaml"
    write_jsonl(tmp_path / "t.jsonl", ROWS)
    c.write_text(f"task: classification\nmodel:\n  name: no-such-org/no-such-model\ndata:\n  train: {tmp_path / 't.jsonl'}\n"
                 f"output_dir: {tmp_path / 'run'}\n")
    assert main(["train", str(c)]) == 2
    err = capsys.readouterr().err
    assert "could not load model 'no-such-org/no-such-model'" in err and "Traceback" not in err


TOPICS = {"sports": "The {} won the cup after a late goal", "politics": "The senate passed the {} bill on Monday",
          "tech": "The new {} ships with a faster chip"}
WORDS = ["Lions", "Rovers", "tax", "phone", "United", "housing", "laptop", "Tigers", "energy", "watch", "Sharks", "health"]


def test_a_head_on_a_sentence_encoder_converges_with_nothing_set(tmp_path, capsys):
    """The issue's case: peft.method=head on MiniLM with no lr or epochs set. The SFT defaults (lr 2e-4,
    one epoch) leave the head near the majority; the method's own defaults train it to convergence, on
    mean-pooled features as the encoder was trained, and the log says what was chosen."""
    rows = [{"text": t.format(w), "label": lab} for w in WORDS for lab, t in TOPICS.items()]
    rows += [{"text": t.format(w).lower(), "label": lab} for w in WORDS for lab, t in TOPICS.items()]
    base = {"task": "classification", "model.name": "minilm-l6", "data.train": str(write_jsonl(tmp_path / "t.jsonl", rows)),
            "data.eval_fraction": 0.3, "data.max_length": 32, "peft.method": "head"}
    tuned = train(load_config(None, {**base, "output_dir": str(tmp_path / "defaults")}))
    err = capsys.readouterr().err
    assert "peft.method=head: train.lr=0.01, train.epochs=20" in err and "mean pooling" in err
    assert tuned.metrics["accuracy"] == 1.0
    sft_defaults = train(load_config(None, {**base, "train.lr": 2e-4, "train.epochs": 1, "output_dir": str(tmp_path / "old")}))
    assert sft_defaults.metrics["accuracy"] < 0.8  # what a user got before
    saved = json.loads((tuned.run_dir / "final" / "model" / "config.json").read_text())
    assert saved["sftkit_pooling"] == "mean"
    assert load_config(tuned.run_dir / "config.yaml").train.lr == 0.01  # the run's config holds what ran


def test_mean_pooling_reads_real_tokens_only_and_predict_pools_the_same(tmp_path, tiny_bert_dir):
    """classify.pooling=mean: a row's features do not depend on the padding beside it, and the saved
    model's predictions through `sftkit predict` are the held-out predictions training scored."""
    from sftkit.classifier import collate, features, load_classifier

    model, tok, _ = load_classifier(str(tiny_bert_dir), ["neg", "pos"], pooling="mean")
    model.eval()
    short, long = tok("great")["input_ids"], tok("an awful, awful item number nine")["input_ids"]
    with torch.no_grad():
        alone = features(model, collate([short], tok.pad_token_id))
        padded = features(model, collate([short, long], tok.pad_token_id))
        h = model.base_model(input_ids=torch.tensor([short])).last_hidden_state
    torch.testing.assert_close(padded[0], alone[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone[0], h[0].mean(0), rtol=1e-5, atol=1e-6)
    res = train(cfg(tmp_path, tiny_bert_dir, "mean", **{"peft.method": "lora", "classify.pooling": "mean"}))
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(res.run_dir), "--input", str(write_jsonl(tmp_path / "e.jsonl", ROWS[:9])),
                 "--output", str(out)]) == 0
    got = [list(json.loads(x)["probabilities"].values()) for x in out.read_text().splitlines()]
    trained = res.model.get_base_model() if hasattr(res.model, "get_base_model") else res.model
    trained.eval()
    with torch.no_grad():  # written out: the mean of the real tokens' last hidden states, then the head
        for row, g in zip(ROWS[:9], got):
            h = trained.base_model(input_ids=torch.tensor([tok(row["text"])["input_ids"]])).last_hidden_state[0].mean(0)
            assert g == pytest.approx(trained.classifier(h).softmax(-1).tolist(), abs=1e-5)
