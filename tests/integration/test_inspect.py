"""`sftkit data inspect`: counts, duplicates, marked samples, and an export equal to what training sees."""

import json

import pytest

from sftkit.cli import main
from sftkit.config import load_config
from sftkit.data import prepare, renderer_for

from ..conftest import write_jsonl

pytestmark = pytest.mark.slow  # end to end on a real tiny model: `pytest -m 'not slow'` leaves it out


def test_inspect_reports_and_exports_exactly_the_training_examples(tmp_path, tiny_model_dir, capsys):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
    rows += [rows[0], "{not json", {"prompt": "q", "completion": ""}, {"prompt": "long " * 300, "completion": "x"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: {data}\n  max_length: 64\n"
                        "  truncation: drop\n  on_error: skip\n")
    out = tmp_path / "export.jsonl"
    assert main(["data", "inspect", str(cfg_path), "--n", "1", "--export", str(out)]) == 0
    text = capsys.readouterr().out
    assert "skipped while reading (data.on_error=skip): 1 malformed JSON, 1 empty reply" in text
    assert "train: 7 rows read, 6 kept, dropped: 1 longer than max_length=64" in text
    assert "exact duplicates in train: 1 rows repeat another (1 groups)" in text
    assert f"same content: {data}:1, {data}:6" in text
    assert "[[a0<|im_end|>]]" in text

    cfg = load_config(cfg_path)
    from sftkit.models import load_tokenizer

    expected = prepare(cfg.data, cfg.train.seed, renderer_for(cfg.data, load_tokenizer(str(tiny_model_dir)))).train
    exported = [json.loads(line) for line in open(out)]
    assert exported == [{"input_ids": e.input_ids, "labels": e.labels} for e in expected]
    assert len(exported) == 6


def test_bad_row_stops_inspect_with_file_and_line(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}, {"prompt": "q"}])
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"model:\n  name: {tiny_model_dir}\n")
    assert main(["data", "inspect", str(cfg_path), f"data.train={data}"]) == 2
    assert f"{data}:2: completion: missing field" in capsys.readouterr().err
