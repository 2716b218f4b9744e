"""Classification: each method on tiny decoder and encoder models, caching, reload, predict, errors."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel

from sftkit.classify import LabelledText, class_weights, stratified_split, train_classifier
from sftkit.cli import main
from sftkit.config import load_config
from sftkit.data.sources import DataError
from sftkit.models import resolve

from ..conftest import write_jsonl

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
    cached = train_classifier(cfg(tmp_path, model_dir, "cached", **{"peft.method": "head"}))
    uncached = train_classifier(cfg(tmp_path, model_dir, "uncached", **{"peft.method": "head"}), cache=False)
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
    r = train_classifier(cfg(tmp_path, tiny_model_dir, method, **{"peft.method": method, **extra}))
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
    r = train_classifier(c)
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
        train_classifier(c)
    rows = [LabelledText("t", lab, "x", i) for i, lab in enumerate(["a"] * 6 + ["b"] * 2)]
    w = class_weights("auto", rows, ["a", "b"])
    assert w.tolist() == pytest.approx([8 / (2 * 6), 8 / (2 * 2)])
    train, held = stratified_split(rows, 0.5, 0)
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
