"""The offline teacher (`sftkit distill cache`, train.distill.teacher: DIR): training from the cache
gives the losses training beside the teacher gives, padded and packed; a cache made from other data
or asked for more than it holds is refused with the reason."""

import json

import pytest

from sftkit.cli import main
from sftkit.config import ConfigError
from sftkit.distill import build
from sftkit.trainer import train

from ..conftest import make_tiny_llama
from .test_train import losses, make_cfg

pytestmark = pytest.mark.slow  # end to end on a real tiny model: `pytest -m 'not slow'` leaves it out


@pytest.fixture(scope="module")
def teacher_dir(tokenizer, tmp_path_factory):
    import torch

    d = tmp_path_factory.mktemp("teacher")
    teacher = make_tiny_llama(tokenizer, seed=1)
    with torch.no_grad():  # sharp distributions (a random tiny model's are near uniform): a token's
        teacher.model.norm.weight.mul_(40)  # teacher term then differs clearly from another token's
    teacher.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


COMMON = {"train.max_steps": 3, "train.batch_size": 4, "peft.method": "full", "train.lr": 1e-3,
          "train.distill.weight": 0.7, "train.distill.temperature": 2.0}


@pytest.mark.parametrize("pack,top_k", [(False, 0), (True, 32)])
def test_training_from_the_cache_gives_the_losses_of_training_beside_the_teacher(
        tmp_path, tiny_model_dir, tokenizer, chat_rows, teacher_dir, pack, top_k):
    """top_k 0 online = the whole distribution, cached with k = the vocabulary size; 32 = top 32 both ways."""
    common = {**COMMON, "data.pack": pack, "train.distill.teacher": str(teacher_dir)}
    online = train(make_cfg(tmp_path, tiny_model_dir, chat_rows, "online", **{**common, "train.distill.top_k": top_k}))
    cache_dir = tmp_path / "cache"
    k = top_k or len(tokenizer)
    meta = build(make_cfg(tmp_path, tiny_model_dir, chat_rows, "unused", **{**common, "train.distill.top_k": k}), cache_dir)
    assert meta["k"] == k and meta["examples"] == len(chat_rows)
    cached = train(make_cfg(tmp_path, tiny_model_dir, chat_rows, "cached",
                            **{**common, "train.distill.teacher": str(cache_dir), "train.distill.top_k": top_k}))
    a, b = losses(online.run_dir), losses(cached.run_dir)
    assert len(a) == 3 and b == pytest.approx(a, rel=1e-5), (a, b)
    for run in (online, cached):  # both terms logged apart, per trained token; the loss is their blend
        rows = [r for r in map(json.loads, (run.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        assert all(r["loss"] == pytest.approx(0.3 * r["nll"] + 0.7 * r["distill"], rel=1e-5) for r in rows), rows
    plain = train(make_cfg(tmp_path, tiny_model_dir, chat_rows, "plain", **{**common, "train.distill.teacher": None}))
    assert losses(plain.run_dir)[0] != pytest.approx(a[0], rel=1e-3)  # the teacher's term is there


def test_a_cache_of_other_data_or_too_few_log_probs_is_refused(tmp_path, tiny_model_dir, chat_rows, teacher_dir):
    common = {**COMMON, "train.max_steps": 1, "train.distill.teacher": str(teacher_dir), "train.distill.top_k": 8}
    cache_dir = tmp_path / "cache"
    build(make_cfg(tmp_path, tiny_model_dir, chat_rows, "unused", **common), cache_dir)
    use = {**common, "train.distill.teacher": str(cache_dir)}
    with pytest.raises(ConfigError, match=r"the cache was made from other data: 12 of 12 training examples are not in "
                                          r"it, the first .*train.jsonl:\d+ .*data.system: None -> 'Be brief.'"):
        train(make_cfg(tmp_path, tiny_model_dir, chat_rows, "system", **{**use, "data.system": "Be brief."}))
    changed = [dict(r) for r in chat_rows]
    changed[5] = {"messages": [{"role": "user", "content": "new"}, {"role": "assistant", "content": "row"}]}
    with pytest.raises(ConfigError, match=r"1 of 12 training examples are not in it, the first .*train.jsonl:6 "):
        train(make_cfg(tmp_path, tiny_model_dir, changed, "row", **use))
    with pytest.raises(ConfigError, match=r"train.distill.top_k=16: the cache .* holds the teacher's top 8 only"):
        train(make_cfg(tmp_path, tiny_model_dir, chat_rows, "k", **{**use, "train.distill.top_k": 16}))
    with pytest.raises(ConfigError, match=r"train.distill.loss=jsd: a cache of the teacher's top-k log-probs gives "
                                          r"forward_kl only"):
        train(make_cfg(tmp_path, tiny_model_dir, chat_rows, "jsd", **{**use, "train.distill.top_k": 0,
                                                                       "train.distill.loss": "jsd"}))
    # A new seed reorders the rows, not their content: the cache still serves.
    train(make_cfg(tmp_path, tiny_model_dir, chat_rows, "seed", **{**use, "train.seed": 8}))


def test_the_cache_command(tmp_path, tiny_model_dir, chat_rows, teacher_dir, capsys):
    import yaml

    cfg = make_cfg(tmp_path, tiny_model_dir, chat_rows, "unused", **{"train.distill.teacher": str(teacher_dir)})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": cfg.model.name}, "data": {"train": cfg.data.train, "max_length": 128},
                                    "train": {"distill": {"teacher": str(teacher_dir)}}}))
    out = tmp_path / "cache"
    assert main(["distill", "cache", str(path), "--out", str(out)]) == 2
    assert "set train.distill.top_k" in capsys.readouterr().err
    assert main(["distill", "cache", str(path), "--out", str(out), "train.distill.top_k=4"]) == 0
    said = capsys.readouterr().out
    assert "cached the teacher's top 4 log-probs for" in said and "train.distill.teacher=" in said
    meta = json.loads((out / "distill_cache.json").read_text())
    assert meta["k"] == 4 and meta["examples"] == 12 and meta["teacher"] == str(teacher_dir)
    assert main(["distill", "cache", str(path), "--out", str(out), "train.distill.top_k=4"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["distill", "cache", str(path), "--out", str(out), "train.distill.top_k=4", "--overwrite"]) == 0
