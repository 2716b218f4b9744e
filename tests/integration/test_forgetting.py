"""Forgetting guard: reference perplexity, KL to the base model, replay."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from sftkit.config import load_config
from sftkit.data import read
from sftkit.data.packing import pad_collate
from sftkit.data.render import Renderer, build_examples
from sftkit.data.sources import Normaliser
from sftkit.loss import token_loss
from sftkit.trainer import train

from ..conftest import write_jsonl

pytestmark = pytest.mark.slow  # end to end on a real tiny model: `pytest -m 'not slow'` leaves it out


def batch_of(tokenizer, chat_rows):
    exs, _ = build_examples([Normaliser("x")(r, i) for i, r in enumerate(chat_rows)], Renderer(tokenizer))
    return pad_collate(exs[:4], tokenizer.pad_token_id)


def test_kl_term_is_zero_when_tuned_equals_base_and_coefficient_zero_is_plain(tokenizer, tiny_model_dir, chat_rows):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear"))
    batch = batch_of(tokenizer, chat_rows)
    plain = token_loss(model, batch).loss
    assert torch.equal(token_loss(model, batch, kl_coef=0.0).loss, plain)
    # A fresh LoRA (B = 0) is the base model: the KL term adds nothing.
    torch.testing.assert_close(token_loss(model, batch, kl_coef=3.0).loss, plain, rtol=1e-6, atol=1e-5)


def test_adapters_disabled_give_the_base_models_logits(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a trained-looking adapter
    ids = torch.tensor([[1, 50, 600, 7000, 2]])
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits)
        with model.disable_adapter():
            torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=1e-6)


def run(tmp_path, tiny_model_dir, chat_rows, name, **over):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows)
    cfg = {"model.name": str(tiny_model_dir), "data.train": str(data), "output_dir": str(tmp_path / name),
           "train.lr": 2e-2, "train.max_steps": 15, "train.batch_size": 4, "train.eval_every": 5, "peft.r": 8}
    cfg.update(over)
    return train(load_config(None, cfg))


@pytest.fixture(scope="module")
def knows_the_reference(tiny_model_dir, tmp_path_factory):
    """A tiny model that has learnt the reference text, so it has something to forget."""
    from sftkit.data import resource

    out = tmp_path_factory.mktemp("pre") / "pre"
    train(load_config(None, {"model.name": str(tiny_model_dir), "data.train": resource("reference.jsonl"),
                             "data.max_length": 256, "peft.method": "full", "train.lr": 1e-2, "train.max_steps": 40,
                             "train.batch_size": 4, "output_dir": str(out), "eval.reference": None}))
    return out / "final" / "model"


def test_forgetting_is_measured_and_the_kl_guard_lowers_it(tmp_path, knows_the_reference, chat_rows):
    tiny_model_dir = knows_the_reference
    plain = run(tmp_path, tiny_model_dir, chat_rows, "plain")
    records = [json.loads(x) for x in open(plain.run_dir / "metrics.jsonl")]
    assert [r["step"] for r in records if "forgetting" in r] == [5, 10, 15]
    summary = json.loads((plain.run_dir / "summary.json").read_text())
    assert summary["base_ref_ppl"] > 0 and summary["forgetting"] == pytest.approx(records[-1]["forgetting"])
    guarded = run(tmp_path, tiny_model_dir, chat_rows, "kl", **{"train.kl_to_base": 5.0})
    assert plain.forgetting > 0
    assert guarded.forgetting < plain.forgetting
    full_guard = run(tmp_path, tiny_model_dir, chat_rows, "kl-full", **{"train.kl_to_base": 5.0, "peft.method": "full",
                                                                        "train.lr": 1e-3})
    assert full_guard.forgetting is not None  # the frozen-copy path runs


def test_replay_mixes_general_text_in(tmp_path, chat_rows):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows)
    cfg = load_config(None, {"data.train": str(data), "data.replay": {"source": "builtin", "ratio": 0.5}})
    train_rows, _, _ = read(cfg.data, seed=0)
    text = [r for r in train_rows if r.text is not None]
    assert len(train_rows) == 12 + 6 and len(text) == 6
    cfg = load_config(None, {"data.train": str(data), "data.replay": {"path": "x"}})
    with pytest.raises(ValueError, match="data.replay: expected"):
        read(cfg.data, seed=0)
