"""Every format and source normalises to the same rows; every kind of bad input is named or counted."""

import json

import pytest

from sftkit.config import load_config
from sftkit.data import read
from sftkit.data.sources import DataError, ReadStats, load_rows, mix, split_eval

from ..conftest import write_jsonl

PAIR = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize("obj,kind", [
    ({"messages": PAIR}, "messages"),
    ({"prompt": "q", "completion": "a"}, "prompt_completion"),
    ({"prompt": PAIR[:1], "completion": PAIR[1:]}, "prompt_completion"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
    ({"instruction": "q", "output": "a"}, "alpaca"),
])
def test_formats_normalise_to_the_same_messages(tmp_path, obj, kind):
    (r,) = load_rows(str(write_jsonl(tmp_path / "d.jsonl", [obj])))
    assert r.messages == PAIR and r.kind == kind


def test_alpaca_input_is_appended_and_columns_map_dolly(tmp_path):
    p = write_jsonl(tmp_path / "dolly.jsonl", [{"instruction": "Summarise.", "context": "Long text.", "response": "Short."}])
    (r,) = load_rows(str(p), "alpaca", {"input": "context", "output": "response"})
    assert r.messages == [{"role": "user", "content": "Summarise.\n\nLong text."}, {"role": "assistant", "content": "Short."}]


def test_text_format(tmp_path):
    (r,) = load_rows(str(write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}])))
    assert r.kind == "text" and r.text == "hello world"


def test_csv_json_parquet_and_saved_dataset(tmp_path):
    import datasets

    rows = [{"prompt": "q1", "completion": "a1"}, {"prompt": "q2", "completion": "a2"}]
    (tmp_path / "d.csv").write_text("prompt,completion\nq1,a1\nq2,a2\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for src in ("d.csv", "d.json", "d.parquet", "saved"):
        got = load_rows(str(tmp_path / src))
        assert [r.messages[1]["content"] for r in got] == ["a1", "a2"], src
    assert [r.line for r in load_rows(str(tmp_path / "d.csv"))] == [2, 3]  # real file lines


def test_hub_dataset_offline_gives_clear_error(monkeypatch):
    import datasets
    import huggingface_hub

    # The libraries read these at import; set them where they are looked up (no network waits).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="loading it as a Hugging Face hub dataset failed"):
        load_rows("some-org/some-dataset")


BAD = [
    # (line content, expected message, reason counted under on_error=skip)
    ('{"prompt": "q", "completion": "a"', r"d.jsonl:2: malformed JSON", "malformed JSON"),
    ('{"prompt": 3, "completion": "a"}', r"d.jsonl:2: prompt: expected a string or a list of messages, got int", "wrong type"),
    ('{"prompt": "q"}', r"d.jsonl:2: completion: missing field", "missing field"),
    ('{"prompt": "q", "completion": "  "}', r"d.jsonl:2: completion: empty reply", "empty reply"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}',
     r"d.jsonl:2: messages\[1\].content: empty reply", "empty reply"),
    ('{"messages": [{"role": "robot", "content": "q"}]}', r"d.jsonl:2: messages\[0\].role: unknown role 'robot'", "unknown role"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     r"d.jsonl:2: messages\[1\].role: two user turns in a row", "two user turns in a row"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}',
     r"d.jsonl:2: messages\[1\].role: system message must come first", "system not first"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}',
     r"d.jsonl:2: messages\[0\].content: expected a string, got int", "wrong type"),
    ('{"conversations": [{"from": "alien", "value": "q"}]}', r"d.jsonl:2: conversations\[0\].from: unknown role 'alien'", "unknown role"),
    ('{"foo": 1}', r"d.jsonl:2: cannot tell the format", "unknown format"),
]


@pytest.mark.parametrize("bad,message,reason", BAD)
def test_bad_row_stops_with_file_line_field_or_is_skipped_and_counted(tmp_path, bad, message, reason):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "q", "completion": "a"}\n' + bad + '\n{"prompt": "q2", "completion": "a2"}\n')
    with pytest.raises(DataError, match=message):
        load_rows(str(p))
    stats = ReadStats()
    rows = load_rows(str(p), on_error="skip", stats=stats)
    assert len(rows) == 2 and stats.rows == 3 and stats.skipped == {reason: 1}


def test_non_utf8_bytes(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"prompt": "q", "completion": "a"}\n{"prompt": "\xff", "completion": "a"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid UTF-8"):
        load_rows(str(p))
    stats = ReadStats()
    assert len(load_rows(str(p), on_error="skip", stats=stats)) == 1 and stats.skipped == {"not valid UTF-8": 1}


def test_empty_file_and_missing_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match=r"e.jsonl: empty file"):
        load_rows(str(tmp_path / "e.jsonl"), on_error="skip")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"blank.jsonl: empty file"):
        load_rows(str(tmp_path / "blank.jsonl"))
    with pytest.raises(DataError, match=r"nope.jsonl: file not found"):
        load_rows(str(tmp_path / "nope.jsonl"))


def test_column_mapping_naming_a_missing_column(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "response": "a"}])
    with pytest.raises(DataError, match=r"d.jsonl:1: data.columns names columns the data does not have: output: answer"):
        load_rows(str(p), "alpaca", {"output": "answer"}, on_error="skip")


def test_weighted_mix_and_eval_fraction_are_deterministic(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(10)])
    cfg = load_config(None, {"data.train": [{"path": str(a), "weight": 2}, {"path": str(b), "weight": 0.5}],
                             "data.eval_fraction": 0.2})
    train, held, _ = read(cfg.data, seed=1)
    train2, held2, _ = read(cfg.data, seed=1)
    # Each source is split (2 of 10 held out), then the training parts are mixed: 8 x 2 + 8 x 0.5.
    assert len(train) == 20 and len(held) == 4
    assert [r.messages[0]["content"] for r in held] == [r.messages[0]["content"] for r in held2]
    assert [r.messages[0]["content"] for r in train] == [r.messages[0]["content"] for r in train2]
    sources = [r.messages[0]["content"][0] for r in train]
    assert sources.count("a") == 16 and sources.count("b") == 4
    assert mix([(train[:3], 1.0)], 0) == train[:3]
    assert split_eval(train, 0.5, 3) == split_eval(train, 0.5, 3)


def test_held_out_rows_never_reach_training_under_weights_replay_and_duplicates(tmp_path):
    from sftkit.data.sources import content_key

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)]
    a = write_jsonl(tmp_path / "a.jsonl", rows + rows[:10])  # ten rows written twice
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"plain text number {i}"} for i in range(30)])
    for seed in range(5):
        cfg = load_config(None, {"data.train": [{"path": str(a), "weight": 2}, {"path": str(b), "weight": 1.5}],
                                 "data.eval_fraction": 0.25, "data.replay": {"source": "builtin", "ratio": 0.5}})
        train, held, _ = read(cfg.data, seed=seed)
        assert held and not {content_key(r) for r in held} & {content_key(r) for r in train}
        assert not any(r.source.endswith("reference.jsonl") for r in held)  # replay text is training only


def test_a_folder_of_data_files_is_read_file_by_file(tmp_path, capsys):
    """data.train: a folder of JSONL/CSV files is every file in path order (sub-folders too, dot-files
    not), each row's messages naming its own file; a README beside them is named as left out."""
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "a.jsonl", [{"prompt": "p1", "completion": "c1"}])
    write_jsonl(d / "sub" / "b.jsonl", [{"prompt": "p2", "completion": "c2"}, {"prompt": "p3", "completion": "c3"}])
    (d / "c.csv").write_text("prompt,completion\np4,c4\n")
    (d / "README.md").write_text("about the data\n")
    (d / ".hidden.jsonl").write_text('{"prompt": "no", "completion": "no"}\n')
    rows = load_rows(str(d))
    assert [r.messages[0]["content"] for r in rows] == ["p1", "p4", "p2", "p3"]
    err = capsys.readouterr().err
    assert "reading 3 data files" in err and "left out: README.md" in err and ".hidden" not in err
    cfg = load_config(None, [f"data.train={d}", "data.eval_fraction=0"])
    train, held, _ = read(cfg.data, 0)
    assert len(train) == 4 and not held
    write_jsonl(d / "sub" / "b.jsonl", [{"prompt": "p2", "completion": "c2"}, {"prompt": 7, "completion": "c"}])
    with pytest.raises(DataError, match=r"sub/b\.jsonl:2: prompt"):
        load_rows(str(d))


def test_a_folder_without_data_files_or_given_where_one_file_is_read(tmp_path):
    from sftkit.data.sources import read_source

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="a folder without data files .*it is empty"):
        load_rows(str(empty))
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"it holds notes\.txt"):
        load_rows(str(empty))
    with pytest.raises(DataError, match="a folder, not a data file .*here give one file"):
        list(read_source(str(empty)))
    (empty / "state.json").write_text("{}")  # looks like a saved dataset, is not one
    with pytest.raises(DataError, match="a dataset folder datasets cannot load"):
        load_rows(str(empty))


def test_preference_pairs_and_labelled_texts_read_a_folder_too(tmp_path):
    from sftkit.data.pairs import read_pairs
    from sftkit.tasks.classification import read_labelled

    d = tmp_path / "pairs"
    d.mkdir()
    for i in range(2):
        write_jsonl(d / f"{i}.jsonl", [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"}])
    cfg = load_config(None, [f"data.train={d}", "data.eval_fraction=0"])
    train, held = read_pairs(cfg, ReadStats())
    assert [p.prompt[-1]["content"] for p in train] == ["q0", "q1"] and not held
    assert train[1].source.endswith("1.jsonl")
    t = tmp_path / "texts"
    t.mkdir()
    write_jsonl(t / "a.jsonl", [{"text": "x", "label": "pos"}])
    write_jsonl(t / "b.jsonl", [{"text": "y", "label": "neg"}, {"text": "z"}])
    with pytest.raises(DataError, match=r"b\.jsonl:2: label: missing field"):
        read_labelled(str(t), {})
    rows, skipped = read_labelled(str(t), {}, on_error="skip")
    assert [r.label for r in rows] == ["pos", "neg"] and skipped["missing field"] == 1


def test_a_classifiers_method_defaults_fill_only_what_the_user_left_unset(capsys):
    from sftkit.tasks.classification import apply_method_defaults

    cfg = load_config(None, {"task": "classification", "peft.method": "head"})
    apply_method_defaults(cfg)
    assert (cfg.train.lr, cfg.train.epochs) == (1e-2, 20.0)
    assert "peft.method=head: train.lr=0.01, train.epochs=20" in capsys.readouterr().err
    cfg = load_config(None, {"task": "classification", "peft.method": "full", "train.lr": 1e-3, "train.max_steps": 5})
    apply_method_defaults(cfg)
    assert (cfg.train.lr, cfg.train.epochs) == (1e-3, 1.0)  # both the user's: lr given, epochs moot under max_steps
    cfg = load_config(None, {"task": "classification", "peft.method": "lora", "train.epochs": 2})
    apply_method_defaults(cfg)
    assert (cfg.train.lr, cfg.train.epochs) == (5e-4, 2.0)
