"""Defaults a task picks for keys the user left unset, written into the config the run saves."""

from sftkit.config import load_config
from sftkit.tasks import preference


def test_preference_pairs_come_in_random_order_unless_grouping_is_asked_for():
    cfg = load_config(None, {"task": "preference"})
    preference.check(cfg)
    assert cfg.train.group_by_length is False  # saved as such in config.yaml: --resume from it gives the same batches
    assert cfg.train.schedule == "linear"
    cfg = load_config(None, {"task": "preference", "train.group_by_length": True, "train.schedule": "cosine"})
    preference.check(cfg)
    assert cfg.train.group_by_length is True and cfg.train.schedule == "cosine"
