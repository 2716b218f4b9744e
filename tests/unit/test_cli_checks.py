"""What a command is given is checked before any model loads: metric names, files, model paths,
and the rows of a prompts file. Each case would load and generate first on the old code."""

import re

import pytest

from sftkit import generate
from sftkit.cli import main

from ..conftest import write_jsonl


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(generate, "load_for_inference", refuse)
    monkeypatch.setattr("sftkit.models.load_model", refuse)


@pytest.fixture
def held(tmp_path):
    return write_jsonl(tmp_path / "held.jsonl", [{"prompt": "q", "completion": "a"}])


@pytest.mark.parametrize("argv,message", [
    (["eval", "smollm2-135m", "--data", "{held}", "--metrics", "exact_match,exact_mtch"], "did you mean 'exact_match'"),
    (["eval", "smollm2-135m", "--data", "{held}", "--metrics", "nomodule_xyz:fn"], "cannot import fn from nomodule_xyz"),
    (["eval", "smollm2-135m", "--data", "{tmp}/held.jsnl"], r"--data .*held.jsnl: no such file .*did you mean"),
    (["eval", "{tmp}/runz/demo", "--data", "{held}"], r"model .*runz/demo: no such directory .*did you mean .*runs"),
    (["eval", "smollm2-135m", "--data", "{held}", "--shots-from", "{tmp}/shots.jsonl"], "--shots-from .*no such file"),
    (["compare", "smollm2-135m", "{tmp}/runs/dmo", "--data", "{held}"], r"run .*no such directory .*did you mean .*runs/demo"),
    (["compare", "smollm2-135m", "{tmp}/runs/demo", "--data", "{held}", "--metrics", "rouge"], "is not one of"),
    (["generate", "smollm2-135m", "--input", "{tmp}/prompts.jsonl", "--output", "{tmp}/o.jsonl"], "--input .*no such file"),
    (["generate", "smollm2-135m", "--input", "{bad}", "--output", "{tmp}/o.jsonl"], r"bad\.jsonl:2"),
    (["score", "{tmp}/reward-rn", "--input", "{held}", "--output", "{tmp}/o.jsonl"], "no such directory"),
    (["chat", "{tmp}/runs/demo/final/modle"], "did you mean"),
])
def test_inputs_are_checked_before_a_model_loads(argv, message, tmp_path, held, no_model_load, capsys):
    (tmp_path / "runs" / "demo" / "final" / "model").mkdir(parents=True)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"nothing": 1}])
    argv = [a.format(tmp=tmp_path, held=held, bad=bad) for a in argv]
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
