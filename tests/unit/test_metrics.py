"""Metrics as plain functions: exact values on hand-checked cases."""

import pytest

from sftkit.metrics import (
    classification_report,
    exact_match,
    exact_match_loose,
    is_label_set,
    metric_fn,
    rouge_l,
    score,
    token_f1,
)


def test_exact_match_normalisation():
    assert exact_match("  2021-03-05\n", "2021-03-05") == 1.0
    assert exact_match("Paris", "paris") == 1.0
    assert exact_match("Paris.", "paris") == 0.0
    assert exact_match_loose("Paris.", "paris") == 1.0


def test_token_f1_and_rouge_l():
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("the cat", "the cat sat down") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert token_f1("dog", "cat") == 0.0
    # LCS of (a b c d) and (a c d e) is (a c d): P = 3/4, R = 3/4.
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert rouge_l("", "") == 1.0


def test_classification_report():
    refs = ["spam", "spam", "ham", "ham", "ham"]
    preds = ["spam", "ham", "ham", "ham", "maybe"]
    assert is_label_set(refs)
    r = classification_report(preds, refs)
    assert r["accuracy"] == pytest.approx(3 / 5)
    assert r["labels"] == ["ham", "spam", "(other)"]
    assert r["confusion"] == [[2, 0, 1], [1, 1, 0]]
    assert r["per_class"]["spam"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert r["per_class"]["ham"]["precision"] == pytest.approx(2 / 3)
    assert r["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert not is_label_set(["a long free text answer here", "another one"])


def test_user_metric_module_function(tmp_path, monkeypatch):
    (tmp_path / "mymetrics.py").write_text("def first_char(p, r):\n    return float(p[:1] == r[:1])\n")
    monkeypatch.chdir(tmp_path)
    assert metric_fn("mymetrics:first_char")("abc", "axe") == 1.0
    assert score(["abc", "b"], ["axe", "c"], "mymetrics:first_char") == 0.5
    with pytest.raises(ValueError, match="cannot import nope"):
        metric_fn("mymetrics:nope")


def test_a_misspelt_metric_gets_a_did_you_mean():
    from sftkit.config import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'exact_match'"):
        metric_fn("exact_mtch")


def test_contains_finds_the_answer_as_whole_words_in_the_reply():
    from sftkit.metrics import contains

    assert contains("Marbramere was founded in 1768.", "1768") == 1.0
    assert contains("It stands on the Ostra river", "the ostra river") == 1.0
    assert contains("founded in 17689", "1768") == 0.0  # whole words only
    assert contains("river Ostra the", "the Ostra river") == 0.0  # in order
    assert contains("", "1768") == 0.0 and metric_fn("contains") is contains
