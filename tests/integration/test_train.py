"""End-to-end runs on a tiny random-weight Llama with the real SmolLM2 tokenizer."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sftkit.cli import main
from sftkit.config import ConfigError, load_config
from sftkit.trainer import train

from ..conftest import write_jsonl

pytestmark = pytest.mark.slow  # end to end on a real tiny model: `pytest -m 'not slow'` leaves it out


def losses(run_dir):
    return [json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl")]


def make_cfg(tmp_path, model_dir, rows, name, **over):
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    base = {"model.name": str(model_dir), "data.train": str(data), "data.max_length": 128,
            "output_dir": str(tmp_path / name), "train.lr": 1e-3, "train.seed": 7}
    base.update(over)
    return load_config(None, base)


def test_grad_accum_gives_the_same_losses_as_one_big_batch(tmp_path, tiny_model_dir, chat_rows):
    big = train(make_cfg(tmp_path, tiny_model_dir, chat_rows, "big", **{
        "train.batch_size": 8, "train.grad_accum": 1, "train.max_steps": 3}))
    acc = train(make_cfg(tmp_path, tiny_model_dir, chat_rows, "acc", **{
        "train.batch_size": 2, "train.grad_accum": 4, "train.max_steps": 3}))
    a, b = losses(big.run_dir), losses(acc.run_dir)
    assert len(a) == len(b) == 3
    # Steps 2 and 3 follow updates, so equal losses there mean equal gradients too.
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-5, (a, b)
    steps = [json.loads(line) for line in open(acc.run_dir / "metrics.jsonl")]
    assert {"step", "loss", "lr", "trained_tokens"} <= set(steps[0])


def test_full_training_lowers_loss_and_final_model_reloads_with_same_logits(tmp_path, tiny_model_dir, chat_rows):
    rows = chat_rows[:4]
    write_jsonl(tmp_path / "eval.jsonl", rows)
    cfg = make_cfg(tmp_path, tiny_model_dir, rows, "full", **{
        "peft.method": "full", "train.lr": 5e-3, "train.batch_size": 4, "train.max_steps": 40,
        "data.eval": str(tmp_path / "eval.jsonl"), "train.eval_every": 20})
    result = train(cfg)
    ls = losses(result.run_dir)
    assert ls[-1] < 0.5 * ls[0], ls
    records = [json.loads(line) for line in open(result.run_dir / "metrics.jsonl")]
    assert [r["step"] for r in records if "eval_loss" in r] == [20, 40]

    reloaded = AutoModelForCausalLM.from_pretrained(result.run_dir / "final" / "model")
    ids = torch.tensor([[1, 2, 3, 400, 500, 600]])
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits, rtol=0, atol=1e-6)
    assert (result.run_dir / "config.yaml").is_file()
    assert (result.run_dir / "final" / "model" / "chat_template.jinja").is_file()


def test_lora_run_saves_adapter_and_merged_model_that_agree(tmp_path, tiny_model_dir, chat_rows):
    cfg = make_cfg(tmp_path, tiny_model_dir, chat_rows, "lora", **{
        "peft.method": "lora", "peft.r": 4, "train.lr": 1e-2, "train.batch_size": 4, "train.max_steps": 5})
    result = train(cfg)
    final = result.run_dir / "final"
    assert (final / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(final / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with_adapter = PeftModel.from_pretrained(base, final / "adapter").eval()
    ids = torch.tensor([[1, 2, 3, 400, 500, 600]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base.get_base_model()(ids).logits if hasattr(base, "get_base_model") else
                                  AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits,
                                  merged(ids).logits)


def test_existing_run_is_not_overwritten(tmp_path, tiny_model_dir, chat_rows):
    cfg = make_cfg(tmp_path, tiny_model_dir, chat_rows, "run", **{"train.max_steps": 1})
    train(cfg)
    with pytest.raises(ConfigError, match="--overwrite"):
        train(cfg)
    train(cfg, overwrite=True)


def test_unknown_config_key_fails_before_work_naming_the_closest(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  learning_rate: 0.1\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.learning_rate'" in err and "'train.lr'" in err
    cfg.write_text("train:\n  lr: 0.1\n")
    assert main(["train", str(cfg), "peft.rnak=8"]) == 2
    assert "'peft.r'" in capsys.readouterr().err


def test_packed_training_run(tmp_path, tiny_model_dir, chat_rows):
    cfg = make_cfg(tmp_path, tiny_model_dir, chat_rows, "packed", **{
        "data.pack": True, "data.max_length": 160, "train.batch_size": 2, "train.max_steps": 6,
        "peft.method": "full", "train.lr": 5e-3})
    result = train(cfg)
    records = [json.loads(line) for line in open(result.run_dir / "metrics.jsonl")]
    assert records[-1]["loss"] < records[0]["loss"]
    # Every trained token of the data is seen once per epoch, packed or not.
    assert all(r["trained_tokens"] > 0 for r in records)


def test_splitting_micro_batches_into_smaller_passes_changes_nothing(tmp_path, tiny_model_dir, chat_rows):
    common = {"train.batch_size": 6, "train.grad_accum": 2, "train.max_steps": 3}
    whole = train(make_cfg(tmp_path, tiny_model_dir, chat_rows, "whole", **common, **{"train.max_forward_tokens": 0}))
    split = train(make_cfg(tmp_path, tiny_model_dir, chat_rows, "split", **common, **{"train.max_forward_tokens": 100}))
    a, b = losses(whole.run_dir), losses(split.run_dir)
    assert all(abs(x - y) < 1e-5 for x, y in zip(a, b)), (a, b)


def test_a_lora_run_prints_no_library_warnings(tmp_path, tiny_model_dir):
    """peft's FutureWarning about transformers' renamed `is_gradient_checkpointing` is nothing a user can act on."""
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}])
    (tmp_path / "c.yaml").write_text("{}\n")
    done = subprocess.run([sys.executable, "-m", "sftkit", "train", str(tmp_path / "c.yaml"), f"model.name={tiny_model_dir}",
                           f"data.train={data}", "train.max_steps=1", f"output_dir={tmp_path / 'r'}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Warning" not in done.stderr, done.stderr


def test_distillation_trains_from_a_teacher_and_checks_its_tokenizer(tmp_path, tiny_model_dir, tokenizer, chat_rows):
    import copy

    from ..conftest import make_tiny_llama

    teacher = tmp_path / "teacher"
    make_tiny_llama(tokenizer, seed=1).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    common = {"train.max_steps": 3, "train.batch_size": 4, "data.eval_fraction": 0.25}
    plain = train(make_cfg(tmp_path, tiny_model_dir, chat_rows, "plain", **common))
    taught = train(make_cfg(tmp_path, tiny_model_dir, chat_rows, "taught", **common,
                            **{"train.distill.teacher": str(teacher), "train.distill.weight": 0.5,
                               "train.distill.temperature": 2.0}))
    a, b = losses(plain.run_dir), losses(taught.run_dir)
    assert a[0] != pytest.approx(b[0], abs=1e-3)  # the teacher's term is in the training loss
    last = [json.loads(line) for line in open(taught.run_dir / "metrics.jsonl")][-1]
    assert "eval_loss" in last and last["eval_loss"] > 0
    saved = load_config(taught.run_dir / "config.yaml")
    assert saved.train.distill.teacher == str(teacher) and saved.train.distill.temperature == 2.0

    other = tmp_path / "other"
    make_tiny_llama(tokenizer, seed=1).save_pretrained(other)
    changed = copy.deepcopy(tokenizer)
    changed.add_tokens(["<extra-token>"])
    changed.save_pretrained(other)
    with pytest.raises(ConfigError, match=r"train.distill.teacher .*other: its tokenizer is not the student's .*"
                                          r"vocabulary sizes differ"):
        train(make_cfg(tmp_path, tiny_model_dir, chat_rows, "refused", **common, **{"train.distill.teacher": str(other)}))


def test_distillation_with_weight_zero_is_plain_training(tmp_path, tiny_model_dir, tokenizer, chat_rows):
    common = {"train.max_steps": 3, "train.batch_size": 4, "peft.method": "full", "train.lr": 1e-3}
    plain = train(make_cfg(tmp_path, tiny_model_dir, chat_rows, "plain", **common))
    zero = train(make_cfg(tmp_path, tiny_model_dir, chat_rows, "zero", **common,
                          **{"train.distill.teacher": str(tiny_model_dir), "train.distill.weight": 0.0}))
    assert losses(zero.run_dir) == pytest.approx(losses(plain.run_dir), rel=1e-5)
