"""Bad inputs a user really produces, each answered by one line that names the file, line and field
(or the config key) and what to do, or by a counted skip; never a traceback, never a silent drop.

Each case runs the real command line (`sftkit.cli.main`) on the tiny model and checks the message,
the exit status, and that nothing was lost: every input file is byte for byte what it was, and a
run directory that existed is untouched. `SFTKIT_WRITE_ROBUSTNESS_DOC=1 pytest tests/robustness`
writes docs/robustness.md, the table of cases and the message each gives.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from sftkit.cli import main

from ..conftest import write_jsonl

GOOD = [{"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i}"} for i in range(8)]
CHAT = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]


@dataclass
class Case:
    id: str
    what: str  # the input, as a user would describe it
    expect: str  # regex the one-line message must match (after the tmp dir is written <tmp>)
    train: list | None = None  # rows (dicts, or raw strings written as lines); None: GOOD
    over: dict = field(default_factory=dict)  # config values (dotted keys)
    argv: list[str] | None = None  # another command; {cfg}, {tmp}, {train} are filled in
    prepare: str | None = None  # name of a function below that sets up more (a run, a checkpoint)
    rc: int = 2


def row_msgs(*msgs):
    return {"messages": [dict(zip(("role", "content"), m)) for m in msgs]}


PAIR_ROWS = [{"prompt": f"Is {i} even?", "chosen": "yes", "rejected": "no"} for i in range(4)]

CASES = [
    # -- data files ---------------------------------------------------------------------------------
    Case("file-missing", "data.train names a file that does not exist", r"<tmp>/nope\.jsonl: file not found",
         over={"data.train": "{tmp}/nope.jsonl"}),
    Case("file-empty", "an empty training file", r"<tmp>/train\.jsonl: empty file \(no rows\)", train=[]),
    Case("file-type", "a .txt file", r"<tmp>/train\.txt: unknown file type '\.txt'", over={"data.train": "{tmp}/train.txt"},
         prepare="txt_file"),
    Case("json-malformed", "a line cut in the middle", r"<tmp>/train\.jsonl:2: malformed JSON: .* at column \d+",
         train=[GOOD[0], '{"prompt": "x", "compl', GOOD[1]]),
    Case("utf8", "a line that is not UTF-8 (Latin-1 bytes)", r"<tmp>/train\.jsonl:1: not valid UTF-8 \(byte \d+",
         prepare="latin1_file"),
    Case("row-not-object", "a row that is a list, not an object", r"train\.jsonl:2: expected an object per row, got list",
         train=[GOOD[0], '["a", "b"]']),
    Case("format-unknown", "rows with fields no format has", r"train\.jsonl:1: cannot tell the format from the fields "
         r"\(answer, question\).*set data.format and data.columns", train=[{"question": "q", "answer": "a"}]),
    Case("messages-not-list", "messages is a string", r"train\.jsonl:1: messages: expected a non-empty list",
         train=[{"messages": "hello"}]),
    Case("messages-empty", "messages is an empty list", r"train\.jsonl:1: messages: expected a non-empty list",
         train=[{"messages": []}]),
    Case("role-unknown", "a message with role bot", r"train\.jsonl:1: messages\[1\]\.role: unknown role 'bot'",
         train=[row_msgs(("user", "hi"), ("bot", "hello"))]),
    Case("content-not-string", "a message whose content is a number",
         r"train\.jsonl:1: messages\[1\]\.content: expected a string, got int", train=[row_msgs(("user", "hi"), ("assistant", 5))]),
    Case("system-not-first", "a system message in the middle",
         r"train\.jsonl:1: messages\[2\]\.role: system message must come first",
         train=[row_msgs(("user", "hi"), ("assistant", "yo"), ("system", "be nice"))]),
    Case("two-user-turns", "two user turns in a row", r"train\.jsonl:1: messages\[1\]\.role: two user turns in a row",
         train=[row_msgs(("user", "hi"), ("user", "again"), ("assistant", "yo"))]),
    Case("starts-with-assistant", "a chat that starts with the assistant",
         r"train\.jsonl:1: messages\[0\]\.role: the conversation must start with a user turn",
         train=[row_msgs(("assistant", "hello"), ("user", "hi"))]),
    Case("no-reply", "a chat with no assistant turn", r"train\.jsonl:1: messages\[0\]: no assistant turn to train on",
         train=[row_msgs(("user", "hi"))]),
    Case("empty-reply", "a completion of spaces", r"train\.jsonl:3: completion: empty reply",
         train=GOOD[:2] + [{"prompt": "q", "completion": "  "}]),
    Case("missing-field", "a prompt without completion", r"train\.jsonl:2: completion: missing field; the row has prompt",
         train=[GOOD[0], {"prompt": "q"}]),
    Case("prompt-wrong-type", "a prompt that is a number",
         r"train\.jsonl:1: prompt: expected a string or a list of messages, got int", train=[{"prompt": 3, "completion": "x"}]),
    Case("alpaca-missing-output", "an Alpaca row without output (format given)",
         r"train\.jsonl:1: output: missing field; the row has input, instruction",
         train=[{"instruction": "do", "input": ""}], over={"data.format": "alpaca"}),
    Case("sharegpt-role", "ShareGPT with from: robot",
         r"train\.jsonl:1: conversations\[1\]\.from: unknown role 'robot' \(expected human, gpt or system\)",
         train=[{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}]),
    Case("text-empty", "a text row that is blank", r"train\.jsonl:2: text: empty text",
         train=[{"text": "some words"}, {"text": "   "}]),
    Case("columns-missing", "data.columns names a column the data lacks",
         r"train\.jsonl:1: data.columns names columns the data does not have: output: response",
         train=[{"instruction": "do", "output": "done"}], over={"data.columns": {"output": "response"}}),
    Case("csv-missing-column", "a CSV without the completion column",
         r"<tmp>/train\.csv:2: completion: missing field; the row has extra, prompt", over={"data.train": "{tmp}/train.csv",
                                                                                       "data.format": "prompt_completion"},
         prepare="csv_file"),
    Case("mixed-formats", "two mixed sources, the second in another format than data.format says",
         r"<tmp>/b\.jsonl:1: messages: missing field; the row has completion, prompt",
         over={"data.train": ["{tmp}/train.jsonl", "{tmp}/b.jsonl"], "data.format": "messages"}, train=CHAT,
         prepare="second_source"),
    Case("prompt-too-long", "every prompt longer than data.max_length",
         r"train\.jsonl: no example has a trained token left.*raise data.max_length",
         train=[{"prompt": "word " * 80, "completion": "x"}] * 3, over={"data.max_length": 32}),
    Case("too-long-error", "a row longer than max_length with data.truncation=error",
         r"train\.jsonl:1: \d+ tokens, longer than data.max_length=32 \(data.truncation=error\)",
         train=[{"prompt": "word " * 80, "completion": "x"}], over={"data.max_length": 32, "data.truncation": "error"}),
    Case("eval-ends-with-user", "held-out chats that end with a user turn, scored by generation",
         r"eval\.jsonl:1: messages\[2\]: the row ends with a user turn; a held-out row must end with the reply",
         over={"data.eval": "{tmp}/eval.jsonl", "eval.generate": True}, prepare="eval_ends_with_user"),
    # -- config ------------------------------------------------------------------------------------
    Case("key-unknown", "train.learning_rate (another tool's name)", r"unknown config key 'train.learning_rate'; did you "
         r"mean 'train.lr'", over={"train.learning_rate": 1e-4}),
    Case("key-misspelt-section", "trian.lr", r"unknown config key 'trian'; did you mean 'train.lr'", over={"trian.lr": 1}),
    Case("number-bad", "train.lr: abc", r"train.lr: expected a number, got 'abc'", over={"train.lr": "abc"}),
    Case("int-bad", "train.batch_size: 1.5", r"train.batch_size: expected an integer, got 1.5", over={"train.batch_size": 1.5}),
    Case("bool-bad", "data.pack: maybe", r"data.pack: expected true or false, got 'maybe'", over={"data.pack": "maybe"}),
    Case("list-bad", "peft.trainable: lm_head (not a list)", r"peft.trainable: expected a list, got 'lm_head'",
         over={"peft.trainable": "lm_head"}),
    Case("mapping-bad", "data.columns: output", r"data.columns: expected a mapping, got 'output'",
         over={"data.columns": "output"}),
    Case("section-as-value", "train: 5", r"train is a section; set one of its keys, e.g. train.lr", over={"train": 5}),
    Case("method-bad", "peft.method: lorra", r"peft.method: 'lorra' is not one of lora, qlora, full, freeze",
         over={"peft.method": "lorra"}),
    Case("schedule-bad", "train.schedule: cosin", r"train.schedule: 'cosin' is not one of cosine, linear, constant",
         over={"train.schedule": "cosin"}),
    Case("mask-bad", "data.mask: replies", r"data.mask: 'replies' is not one of auto, completion", over={"data.mask": "replies"}),
    Case("truncation-bad", "data.truncation: cut", r"data.truncation: 'cut' is not one of truncate, drop, error",
         over={"data.truncation": "cut"}),
    Case("dtype-bad", "model.dtype: float64", r"model.dtype: 'float64' is not one of auto, float32, bfloat16, float16",
         over={"model.dtype": "float64"}),
    Case("dtype-fp16", "model.dtype: float16 (no loss scaling)", r"model.dtype=float16: training float16 weights without "
         r"loss scaling.*use model.dtype=bfloat16", over={"model.dtype": "float16"}),
    Case("batch-zero", "train.batch_size: 0", r"train.batch_size and train.grad_accum must be at least 1",
         over={"train.batch_size": 0}),
    Case("eval-fraction-bad", "data.eval_fraction: 1.5", r"data.eval_fraction: must be between 0 and 1, got 1.5",
         over={"data.eval_fraction": 1.5}),
    Case("weight-negative", "a mixing weight of -1", r"data.train\[0\].weight: must be >= 0, got -1",
         over={"data.train": [{"path": "{tmp}/train.jsonl", "weight": -1}]}),
    Case("replay-bad", "data.replay without source", r"data.replay: expected \{source: FILE or builtin, ratio: 0.1\}",
         over={"data.replay": {"ratio": 0.1}}),
    Case("train-unset", "no data.train", r"data.train is not set: give a training file", over={"data.train": None}),
    Case("generate-without-eval", "eval.generate with no held-out rows", r"eval.generate=true needs held-out rows: set "
         r"data.eval or data.eval_fraction", over={"eval.generate": True}),
    Case("config-missing", "a config path that does not exist", r"config file not found: <tmp>/nope\.yaml",
         argv=["train", "{tmp}/nope.yaml"]),
    Case("config-not-yaml", "a config file that is not YAML", r"<tmp>/bad\.yaml: not valid YAML", argv=["train", "{tmp}/bad.yaml"],
         prepare="bad_yaml"),
    Case("config-list", "a config whose top level is a list", r"<tmp>/list\.yaml: the top level must be a mapping of sections",
         argv=["train", "{tmp}/list.yaml"], prepare="list_yaml"),
    Case("override-form", "an override without =", r"override 'train.lr' is not of the form section.key=value",
         argv=["train", "{cfg}", "train.lr", "--overwrite"]),
    # -- models ------------------------------------------------------------------------------------
    Case("model-unknown", "a model name that is neither alias, folder nor reachable hub id",
         r"could not load model 'no-such-org/no-such-model': it is not an alias", over={"model.name": "no-such-org/no-such-model"}),
    Case("model-folder-empty", "a model folder without config.json", r"model.name '<tmp>/empty' is a path but holds no "
         r"config.json", over={"model.name": "{tmp}/empty"}, prepare="empty_dir"),
    Case("no-chat-template", "a tokenizer without a chat template and data.template=auto",
         r"data.template=auto needs a tokenizer with a chat template.*use data.template=plain",
         over={"model.name": "{tmp}/no-template"}, prepare="model_without_template"),
    Case("template-missing", "data.template names a Jinja file that does not exist",
         r"data.template: cannot read the Jinja file '<tmp>/chat\.jinja'", over={"data.template": "{tmp}/chat.jinja"}),
    Case("freeze-selects-nothing", "peft.trainable glob that matches no parameter",
         r"peft.trainable: '\*.attn_typo.\*' selects no parameter", over={"peft.method": "freeze",
                                                                          "peft.trainable": ["*.attn_typo.*"]}),
    Case("pack-bloom", "data.pack on a model whose attention crosses packed examples (Bloom)",
         r"data.pack=true: packing is not exact for model type 'bloom'.*set data.pack=false",
         over={"model.name": "{tmp}/bloom", "data.pack": True}, prepare="bloom_model"),
    # -- run directories and checkpoints -------------------------------------------------------------
    Case("output-is-file", "output_dir is an existing file", r"output_dir <tmp>/afile is not writable: it is a file",
         over={"output_dir": "{tmp}/afile"}, prepare="a_file"),
    Case("output-not-run", "--overwrite onto a folder that is not a run",
         r"--overwrite: output_dir <tmp>/notes holds todo.txt, which is not an sftkit run.*nothing was deleted",
         over={"output_dir": "{tmp}/notes"}, argv=["train", "{cfg}", "--overwrite"], prepare="notes_dir"),
    Case("output-holds-run", "a second run into the same output_dir", r"output_dir <tmp>/run already holds a run; pass "
         r"--resume to continue it, --overwrite to replace it", prepare="finished_run"),
    Case("overwrite-and-resume", "--overwrite with --resume", r"--overwrite and --resume contradict each other",
         argv=["train", "{cfg}", "--overwrite", "--resume"]),
    Case("resume-nothing", "--resume with no checkpoint", r"--resume: <tmp>/run holds no complete checkpoint",
         argv=["train", "{cfg}", "--resume"], prepare="finished_run"),
    Case("resume-all-damaged", "--resume when every checkpoint is damaged",
         r"--resume: no checkpoint in <tmp>/run reads back whole.*start again", argv=["train", "{cfg}", "--resume"],
         prepare="damaged_checkpoints"),
    Case("resume-config-changed", "--resume after changing train.batch_size",
         r"--resume: the config changed in a way that would change the run: train.batch_size differ",
         argv=["train", "{cfg}", "--resume", "train.batch_size=3"], prepare="checkpointed_run"),
    # -- other commands ------------------------------------------------------------------------------
    Case("clean-drop-unknown", "data clean --drop with an unknown kind", r"--drop: unknown kinds \['dupes'\]",
         argv=["data", "clean", "{cfg}", "--out", "{tmp}/c.jsonl", "--drop", "dupes"]),
    Case("export-not-run", "export of a folder that is not a run",
         r"export: <tmp>/empty is not a run directory \(no config.yaml\)", argv=["export", "{tmp}/empty", "--out", "{tmp}/x"],
         prepare="empty_dir"),
    Case("export-unfinished", "export of a run that has not finished", r"export: <tmp> has no final model \(did the run "
         r"finish\?\)", argv=["export", "{tmp}", "--out", "{tmp}/x"]),
    Case("eval-set-non-data", "eval --set with a train key", r"--set takes data.\* keys only here, got 'train.lr=1'",
         argv=["eval", "{tmp}", "--data", "{train}", "--set", "train.lr=1"]),
    Case("generate-bad-row", "generate input without prompt or messages",
         r"<tmp>/in\.jsonl:1: expected `messages` ending with a user turn, or `prompt`",
         argv=["generate", "{tmp}/run", "--input", "{tmp}/in.jsonl", "--output", "{tmp}/out.jsonl"], prepare="generate_input"),
    Case("classify-one-label", "classification data with a single label", r"classification needs at least two labels",
         over={"task": "classification"}, train=[{"text": f"t{i}", "label": "a"} for i in range(4)]),
    Case("classify-unused-key", "classification with data.pack: true", r"task: classification does not use "
         r"data.pack", over={"task": "classification", "data.pack": True},
         train=[{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(4)]),
    Case("preference-mask", "task: preference with data.mask: assistant",
         r"data.mask=assistant: task: preference scores the reply after its prompt",
         over={"task": "preference", "data.mask": "assistant"}, train=PAIR_ROWS),
    Case("reward-replay", "task: reward with data.replay", r"task: reward does not use data.replay",
         over={"task": "reward", "data.replay": {"source": "builtin", "ratio": 0.1}}, train=PAIR_ROWS),
    Case("preference-all-held-out", "one preference pair, data.eval_fraction: 0.5",
         r"no pair left to train on: all 1 pairs read are held out", over={"task": "preference",
                                                                          "data.eval_fraction": 0.5}, train=PAIR_ROWS[:1]),
    Case("distill-cache-overwrite-foreign", "distill cache --overwrite into a folder that is not a cache",
         r"distill cache --overwrite: <tmp>/precious holds notes.txt, which is not a teacher cache",
         over={"train.distill.teacher": "{tmp}/teacher", "train.distill.top_k": 4},
         argv=["distill", "cache", "{cfg}", "--out", "{tmp}/precious", "--overwrite"], prepare="precious_dir"),
    Case("train-run-dir", "train given a run directory instead of its config",
         r"<tmp>/run is a run directory, not a config file; to continue that run: sftkit train <tmp>/run/config.yaml "
         r"--resume", argv=["train", "{tmp}/run"], prepare="finished_run"),
    Case("train-folder", "train given a folder that is not a run", r"<tmp>/empty is a folder, not a config file",
         argv=["train", "{tmp}/empty"], prepare="empty_dir"),
    Case("train-folder-bad-row", "data.train is a folder of JSONL files, one with a bad row",
         r"<tmp>/data/b\.jsonl:2: prompt: expected a string or a list of messages, got int",
         over={"data.train": "{tmp}/data"}, prepare="data_folder"),
    Case("train-folder-no-data", "data.train is a folder with no data files", r"<tmp>/empty: a folder without data "
         r"files .* \(it is empty\)", over={"data.train": "{tmp}/empty"}, prepare="empty_dir"),
    Case("model-path-typo", "model.name is a mistyped local path", r"model '<tmp>/tiny-modle': no such directory "
         r"\(<tmp> has no 'tiny-modle'; did you mean '<tmp>/tiny-model'\?\)", over={"model.name": "{tmp}/tiny-modle"},
         prepare="tiny_model_copy"),
    Case("model-alias-typo", "model.name: smollm2-135 (a near-miss alias)", r"model 'smollm2-135' is not an alias nor a "
         r"local directory; did you mean 'smollm2-135m'\?", over={"model.name": "smollm2-135"}),
    Case("key-peer-name", "learning_rate (another tool's name, no section)", r"unknown config key 'learning_rate'; did "
         r"you mean 'train.lr'\? \(", over={"learning_rate": 1e-4}),
    Case("eval-metric-typo", "eval --metrics with a misspelt name (before any model loads)",
         r"metric 'exact_mtch' is not one of .*; did you mean 'exact_match'\?",
         argv=["eval", "{tmp}/tiny-model", "--data", "{train}", "--metrics", "exact_mtch"], prepare="tiny_model_copy"),
    Case("eval-data-typo", "eval --data naming a file that does not exist", r"--data <tmp>/train\.jsnl: no such file "
         r"\(<tmp> has no 'train\.jsnl'; did you mean '<tmp>/train\.jsonl'\?\)",
         argv=["eval", "{tmp}/tiny-model", "--data", "{tmp}/train.jsnl"], prepare="tiny_model_copy"),
    Case("classify-pooling-bad", "classify.pooling: cls", r"classify.pooling: 'cls' is not one of auto, model, mean",
         over={"task": "classification", "classify.pooling": "cls"},
         train=[{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(4)]),
    Case("task-unknown", "task: regression", r"task: 'regression' is not sft or classification", over={"task": "regression"}),
]

RESULTS: dict[str, str] = {}
TINY: list[Path] = []  # the tiny model's folder, for set-ups that derive another model from it


# -- set-ups ------------------------------------------------------------------------------------------
def precious_dir(tmp, cfg):
    (tmp / "precious").mkdir()
    (tmp / "precious" / "notes.txt").write_text("keep me")


def data_folder(tmp, cfg):
    (tmp / "data").mkdir()
    write_jsonl(tmp / "data" / "a.jsonl", GOOD[:2])
    write_jsonl(tmp / "data" / "b.jsonl", [GOOD[2], {"prompt": 5, "completion": "x"}])


def tiny_model_copy(tmp, cfg):
    import shutil

    shutil.copytree(TINY[0], tmp / "tiny-model")


def txt_file(tmp, cfg):
    (tmp / "train.txt").write_text("hello\n")


def latin1_file(tmp, cfg):
    (tmp / "train.jsonl").write_bytes('{"prompt": "caf\u00e9", "completion": "x"}\n'.encode("latin-1"))


def csv_file(tmp, cfg):
    (tmp / "train.csv").write_text("prompt,extra\nq,1\n")


def second_source(tmp, cfg):
    write_jsonl(tmp / "b.jsonl", GOOD[:2])


def eval_ends_with_user(tmp, cfg):
    write_jsonl(tmp / "eval.jsonl", [row_msgs(("user", "hi"), ("assistant", "yo"), ("user", "and?"))])


def bad_yaml(tmp, cfg):
    (tmp / "bad.yaml").write_text("model: [unclosed\n")


def list_yaml(tmp, cfg):
    (tmp / "list.yaml").write_text("- a\n- b\n")


def empty_dir(tmp, cfg):
    (tmp / "empty").mkdir()


def model_without_template(tmp, cfg):
    import shutil

    from transformers import AutoTokenizer

    src = TINY[0]
    shutil.copytree(src, tmp / "no-template")
    tok = AutoTokenizer.from_pretrained(tmp / "no-template")
    tok.chat_template = None
    for f in ("chat_template.jinja", "chat_template.json"):
        (tmp / "no-template" / f).unlink(missing_ok=True)
    tok.save_pretrained(tmp / "no-template")
    tc = json.loads((tmp / "no-template" / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (tmp / "no-template" / "tokenizer_config.json").write_text(json.dumps(tc))


def bloom_model(tmp, cfg):
    import torch
    from transformers import AutoTokenizer, BloomConfig, BloomForCausalLM

    tok = AutoTokenizer.from_pretrained(TINY[0])
    torch.manual_seed(0)
    BloomForCausalLM(BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=4)).save_pretrained(tmp / "bloom")
    tok.save_pretrained(tmp / "bloom")


def a_file(tmp, cfg):
    (tmp / "afile").write_text("not a directory")


def notes_dir(tmp, cfg):
    (tmp / "notes").mkdir()
    (tmp / "notes" / "todo.txt").write_text("keep me")


def finished_run(tmp, cfg):
    assert main(["train", str(tmp / "config.yaml"), "train.max_steps=1"]) == 0


def checkpointed_run(tmp, cfg):
    assert main(["train", str(tmp / "config.yaml"), "train.max_steps=3", "train.save_every=1"]) == 0


def damaged_checkpoints(tmp, cfg):
    checkpointed_run(tmp, cfg)
    for p in (tmp / "run" / "checkpoints").iterdir():
        (p / "trainable.safetensors").write_bytes(b"\0" * 10)


def generate_input(tmp, cfg):
    finished_run(tmp, cfg)
    write_jsonl(tmp / "in.jsonl", [{"question": "no prompt here"}])


# -- the suite --------------------------------------------------------------------------------------
def _fill(v, tmp: Path):
    if isinstance(v, str):
        return v.replace("{tmp}", str(tmp))
    if isinstance(v, list):
        return [_fill(x, tmp) for x in v]
    if isinstance(v, dict):
        return {k: _fill(x, tmp) for k, x in v.items()}
    return v


def _nest(flat: dict) -> dict:
    out: dict = {}
    for k, v in flat.items():
        parts = k.split(".")
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {}) if isinstance(d.get(p, {}), dict) else d
        d[parts[-1]] = v
    return out


def _snapshot(tmp: Path) -> dict[str, str]:
    return {str(p.relative_to(tmp)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(tmp.rglob("*")) if p.is_file() and not str(p.relative_to(tmp)).startswith("runs-out")}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_and_loses_nothing(case: Case, tmp_path, tiny_model_dir, capsys):
    tmp = tmp_path
    TINY[:] = [Path(tiny_model_dir)]
    rows = GOOD if case.train is None else case.train
    train = tmp / "train.jsonl"
    if rows:
        write_jsonl(train, rows)
    else:
        train.write_text("")
    flat = {"model.name": str(tiny_model_dir), "data.train": str(train), "data.max_length": 128,
            "output_dir": str(tmp / "run"), "train.max_steps": 2, "eval.reference": None}
    flat.update(_fill(case.over, tmp))
    cfg = _nest(flat)
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    if case.prepare:
        globals()[case.prepare](tmp, cfg)
    capsys.readouterr()
    before = _snapshot(tmp)
    argv = _fill(case.argv, tmp) if case.argv else ["train", "{cfg}"]
    argv = [a.replace("{cfg}", str(tmp / "config.yaml")).replace("{train}", str(train)) for a in argv]
    rc = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("sftkit: ")]
    assert "Traceback" not in err
    assert rc == case.rc and len(errors) == 1, err[-2000:]
    message = errors[0].replace(str(tmp), "<tmp>")
    assert re.search(case.expect, message), message
    after = _snapshot(tmp)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing changed or deleted
    RESULTS[case.id] = message


def test_on_error_skip_counts_every_bad_row_and_keeps_the_rest(tmp_path, tiny_model_dir, capsys):
    lines = [GOOD[0], '{"prompt": "torn', {"prompt": "q", "completion": ""}, ["a list"], GOOD[1], {"prompt": "q"}, GOOD[2]]
    train = write_jsonl(tmp_path / "train.jsonl", lines)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_nest({"model.name": str(tiny_model_dir), "data.train": str(train), "data.on_error": "skip",
                                         "output_dir": str(tmp_path / "run"), "train.max_steps": 1, "eval.reference": None})))
    assert main(["train", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert ("skipped while reading (data.on_error=skip): 1 malformed JSON, 1 empty reply, 1 wrong type, "
            "1 missing field") in err
    assert "train: 3 rows read, 3 kept" in err  # 7 rows = 3 trained + 4 skipped and counted
    RESULTS["on-error-skip"] = next(line for line in err.splitlines() if "skipped while reading" in line)


def test_the_table_in_docs_lists_every_case():
    doc = Path(__file__).resolve().parents[2] / "docs" / "robustness.md"
    text = doc.read_text() if doc.is_file() else ""
    missing = [c.id for c in CASES if f"| `{c.id}` |" not in text]
    assert len(CASES) >= 40 and not missing, f"docs/robustness.md lacks {missing}: SFTKIT_WRITE_ROBUSTNESS_DOC=1 pytest tests/robustness"


def write_doc(path: Path) -> None:
    lines = ["# What sftkit says to bad input", "",
             "Generated by `SFTKIT_WRITE_ROBUSTNESS_DOC=1 pytest tests/robustness` from "
             "`tests/robustness/test_bad_inputs.py`: each input was given to the real command line on a tiny model; "
             "the message is what it printed (its one line on stderr; `<tmp>` stands for the case's folder). "
             "Every case also checks that no input file changed and nothing was deleted.", "",
             "| case | input | message |", "|---|---|---|"]
    whats = {c.id: c.what for c in CASES}
    whats["on-error-skip"] = "seven rows, four of them bad, with data.on_error=skip (trains on the three)"
    for cid, msg in RESULTS.items():
        lines.append(f"| `{cid}` | {whats[cid]} | `{msg.replace('|', '/')}` |")
    path.write_text("\n".join(lines) + "\n")


def test_ctrl_c_while_the_model_loads_is_one_line(tmp_path, tiny_model_dir):
    """A signal at an awkward moment: before the loop has its handler, while the data is read."""
    import os
    import signal
    import subprocess
    import sys
    import time

    rows = [{"prompt": f"question {i} " * 20, "completion": f"answer {i}"} for i in range(20000)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_nest({"model.name": str(tiny_model_dir), "data.train": str(train),
                                         "output_dir": str(tmp_path / "run"), "eval.reference": None})))
    root = Path(__file__).resolve().parents[2]
    p = subprocess.Popen([sys.executable, "-m", "sftkit", "train", str(cfg)], stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(root), "PYTHONFAULTHANDLER": "1"})
    t0 = time.time()
    while not (tmp_path / "run" / "config.yaml").exists():  # the run has started; the data is being read
        assert p.poll() is None and time.time() - t0 < 60
        time.sleep(0.01)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # say where it hung: faulthandler prints every thread's stack on SIGABRT
        p.send_signal(signal.SIGABRT)
        _, err = p.communicate(timeout=30)
        raise AssertionError(f"no exit 60 s after SIGINT; the process's threads:\n{err[-6000:]}") from None
    assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "sftkit: interrupted (Ctrl-C)" in err
    assert train.read_text().count("\n") == 20000  # the input is intact


def test_an_abbreviated_flag_is_not_taken_for_the_whole_one(capsys):
    """`--over` must not quietly mean `--overwrite` (argparse's default would take it)."""
    with pytest.raises(SystemExit) as e:
        main(["train", "c.yaml", "--over"])
    assert e.value.code == 2 and "unrecognized arguments: --over" in capsys.readouterr().err
