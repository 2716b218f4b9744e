"""Shipping a model: GGUF written and checked by reloading, the trained template kept, the card, the hub folder."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from sftkit.cli import main
from sftkit.config import load_config
from sftkit.data.render import TEMPLATES, Renderer
from sftkit.data.sources import Normaliser
from sftkit.export import hub_folder, load_gguf, max_logit_difference, model_card
from sftkit.trainer import train

from ..conftest import write_jsonl

pytestmark = pytest.mark.slow  # end to end on a real tiny model: `pytest -m 'not slow'` leaves it out

ROWS = [{"prompt": f"Write {i} in words.", "completion": f"number {i}"} for i in range(12)]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("export")
    data = write_jsonl(tmp / "train.jsonl", ROWS)
    held = write_jsonl(tmp / "eval.jsonl", ROWS[:3])
    cfg = load_config(None, {"model.name": str(tiny_model_dir), "data.train": str(data), "data.eval": str(held),
                             "peft.r": 4, "train.max_steps": 3, "train.lr": 1e-2, "data.system": "You write numbers.",
                             "eval.reference": None, "output_dir": str(tmp / "run")})
    train(cfg)
    return tmp / "run"


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_gguf_round_trip_within_the_types_tolerance(run, tmp_path, kind, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", str(run), "--gguf", str(out), "--gguf-type", kind]) == 0
    err = capsys.readouterr().err
    assert f"GGUF {out} ({kind}): max |logit difference|" in err
    reloaded, _ = load_gguf(out)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "final" / "model").eval()
    ids = [[1, 520, 3000, 45, 9, 2]]
    diff = max_logit_difference(model, reloaded, ids)
    assert diff <= {"f32": 1e-4, "f16": 0.25, "q8_0": 5.0}[kind]
    if kind == "f32":
        assert diff <= 1e-5  # the same model, bit for bit up to summation order


def test_gguf_tokenizer_and_template_round_trip(run, tmp_path):
    out = tmp_path / "m.gguf"
    assert main(["export", str(run), "--gguf", str(out)]) == 0
    _, tok = load_gguf(out)
    ref = AutoTokenizer.from_pretrained(run / "final" / "model")
    for text in ["Hello world!", "  spaces\tand\nnewlines  ", "naïve café ünïcödé 日本語 🙂", "<|im_start|>user\nhi<|im_end|>",
                 "def f(x):\n    return x ** 2  # 1234567890"]:
        assert tok(text)["input_ids"] == ref(text)["input_ids"], text
        assert tok.decode(tok(text)["input_ids"]) == ref.decode(ref(text)["input_ids"])
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (ref.bos_token, ref.eos_token, ref.pad_token)
    msgs = [{"role": "user", "content": "Write 3 in words."}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    modelfile = (tmp_path / "Modelfile").read_text()
    assert "FROM ./m.gguf" in modelfile and "<|im_start|>{{ .Role }}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'SYSTEM """You write numbers."""' in modelfile


def test_gguf_refuses_other_architectures(tmp_path, tokenizer, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    data = write_jsonl(tmp_path / "t.jsonl", ROWS[:4])
    train(load_config(None, {"model.name": str(d), "data.train": str(data), "peft.method": "full", "train.max_steps": 1,
                             "eval.reference": None, "output_dir": str(tmp_path / "run")}))
    assert main(["export", str(tmp_path / "run"), "--gguf", str(tmp_path / "x.gguf")]) == 2
    assert "model type 'gpt2' is not supported; GGUF export supports llama" in capsys.readouterr().err


def test_merge_export_is_checked_against_base_plus_adapter(run, tmp_path, capsys):
    assert main(["export", str(run), "--merge", "--out", str(tmp_path / "merged")]) == 0
    err = capsys.readouterr().err
    assert "merged model" in err and "max |logit difference|" in err
    assert (tmp_path / "merged" / "README.md").read_text().startswith("---")


@pytest.mark.parametrize("template", ["auto", "chatml", "llama-3", "alpaca", "plain"])
@pytest.mark.parametrize("system", [None, "Answer in French."])
def test_the_exported_tokenizer_renders_as_training_did(tokenizer, template, system):
    r = Renderer(tokenizer, template=template)
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = r.trained_template(system)
    for raw in ({"prompt": "What is 2 + 2?", "completion": "4"},
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                              {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]}):
        row = Normaliser("x", system=system)(dict(raw), 1)
        plain_msgs = [m for m in Normaliser("x")(dict(raw), 1).messages]
        assert tok.apply_chat_template(plain_msgs, tokenize=False) == r._text(row.messages), (template, system)
        prompt = plain_msgs[:-1]
        assert tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == \
            r._text(row.messages[:-1], generation_prompt=True) or template == "plain"
    assert template in ("auto", "plain") or TEMPLATES[template] in tok.chat_template


def test_the_run_saves_the_template_it_trained_with(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "t.jsonl", ROWS[:4])
    r = train(load_config(None, {"model.name": str(tiny_model_dir), "data.train": str(data), "data.template": "alpaca",
                                 "data.system": "Be brief.", "train.max_steps": 1, "eval.reference": None,
                                 "output_dir": str(tmp_path / "run")}))
    for d in ("model", "adapter"):
        tok = AutoTokenizer.from_pretrained(r.run_dir / "final" / d)
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        assert text == "Be brief.\n\n### Instruction:\nhi\n\n### Response:\n", text


def test_model_card_is_written_from_the_runs_files(run):
    card = (run / "final" / "model" / "README.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert card == model_card(run) and (run / "final" / "adapter" / "README.md").read_text() == card
    assert "## Training" in card and "## Data" in card and "## Evaluation" in card and "## How to load" in card
    assert f"| steps | {summary['steps']} |" in card and "r=4, alpha=32.0" in card
    assert "(12 rows); 12 of 12 rows kept" in card and "data quality (12 training rows)" in card
    assert f"| eval loss (held out) | {summary['eval_loss']:.4f} |" in card
    assert "| system message | You write numbers. |" in card
    assert "PeftModel.from_pretrained" in card and "--gguf" in card


def test_hub_folder_holds_model_card_and_gguf(run, tmp_path):
    out = tmp_path / "m.gguf"
    assert main(["export", str(run), "--gguf", str(out)]) == 0
    folder = hub_folder(run, None, out)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "m.gguf", "Modelfile"} <= names
    assert (folder / "README.md").read_text() == model_card(run)
    assert torch.equal(torch.tensor(list((folder / "m.gguf").read_bytes()[:4])), torch.tensor(list(b"GGUF")))


def test_push_to_hub_without_network_is_one_line(run, tmp_path, capsys):
    assert main(["export", str(run), "--push-to-hub", "someone/some-model"]) == 2
    err = capsys.readouterr().err
    assert "--push-to-hub someone/some-model: upload failed" in err and "the folder it would upload is" in err


def test_the_check_fails_an_export_that_is_not_the_runs_model(run, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from sftkit.export import ExportMismatch, check_export, probe_rows

    tuned = AutoModelForCausalLM.from_pretrained(run / "final" / "model").eval()
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()  # e.g. the adapter lost on the way
    with pytest.raises(ExportMismatch, match="differs from the run's model by .* more than the 0.0001 allowed for f32"):
        check_export(tuned, other, probe_rows(run), "f32", "GGUF x.gguf")


def test_overwrite_replaces_what_an_export_owns_and_nothing_else(run, tmp_path):
    out = tmp_path / "merged"
    assert main(["export", str(run), "--out", str(out)]) == 0  # the adapter alone
    assert (out / "adapter_config.json").is_file()
    assert main(["export", str(run), "--merge", "--out", str(out)]) == 2  # not empty, no --overwrite
    assert main(["export", str(run), "--merge", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "adapter_config.json").exists()  # the old adapter does not linger beside the merged model
    assert (out / "config.json").is_file() and (out / "README.md").is_file()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match=r"holds notes.txt, which an exported model folder does not; nothing was deleted"):
        from sftkit.export import export_run

        export_run(run, out, True, None, "f32", None, True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").is_file()


def test_a_failed_check_leaves_nothing_in_place(run, tmp_path, monkeypatch):
    from sftkit import export

    monkeypatch.setitem(export.EXPORT_TOLERANCE, "merge", -1.0)
    monkeypatch.setitem(export.EXPORT_TOLERANCE, "f32", -1.0)
    assert main(["export", str(run), "--merge", "--out", str(tmp_path / "m")]) == 1
    assert not (tmp_path / "m").exists()
    assert main(["export", str(run), "--gguf", str(tmp_path / "g" / "x.gguf")]) == 1
    assert not (tmp_path / "g" / "x.gguf").exists() and not (tmp_path / "g" / "Modelfile").exists()


def test_the_modelfile_keeps_the_trained_system_message_and_is_not_replaced_unasked(run, tmp_path, tokenizer, capsys):
    from sftkit.export import modelfile

    smol = modelfile("m.gguf", tokenizer, None)  # SmolLM2's template writes its own when there is none
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in smol
    quoted = modelfile("m.gguf", tokenizer, 'Reply with """code""" only.')
    assert "SYSTEM" not in quoted.replace("# the system", "") and "/set system" in quoted
    assert 'contains """, which a Modelfile cannot quote' in capsys.readouterr().err
    (tmp_path / "Modelfile").write_text("FROM ./mine.gguf\n")
    assert main(["export", str(run), "--gguf", str(tmp_path / "m.gguf")]) == 2
    assert "Modelfile exists" in capsys.readouterr().err
    assert (tmp_path / "Modelfile").read_text() == "FROM ./mine.gguf\n" and not (tmp_path / "m.gguf").exists()


PAIRS = [{"prompt": f"Is {i} even?", "chosen": "yes" if i % 2 == 0 else "no", "rejected": "no" if i % 2 == 0 else "yes"}
         for i in range(8)]


def test_preference_and_reward_runs_export_and_have_their_cards(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    common = {"model.name": str(tiny_model_dir), "data.train": str(data), "train.max_steps": 2, "train.batch_size": 4}
    pref = train(load_config(None, {**common, "task": "preference", "output_dir": str(tmp_path / "pref")})).run_dir
    reward = train(load_config(None, {**common, "task": "reward", "peft.method": "full",
                                      "output_dir": str(tmp_path / "reward")})).run_dir
    for r in (pref, reward):
        assert (r / "final" / "model" / "README.md").read_text().startswith("---")
    assert "AutoModelForSequenceClassification" in (reward / "final" / "model" / "README.md").read_text()
    assert main(["export", str(pref), "--merge", "--out", str(tmp_path / "pref-merged")]) == 0
    assert main(["export", str(pref), "--gguf", str(tmp_path / "pg" / "p.gguf")]) == 0
    assert main(["export", str(reward), "--gguf", str(tmp_path / "rg" / "r.gguf")]) == 2
    assert not (tmp_path / "rg").exists()
    assert main(["export", str(reward), "--out", str(tmp_path / "reward-out")]) == 0
