"""For prompt/completion rows, sftkit's labels equal TRL SFTTrainer's (completion-only loss), token for token."""

import pytest

from sftkit.config import load_config
from sftkit.data import prepare
from sftkit.data.render import IGNORE, Renderer

from ..conftest import make_tiny_llama, write_jsonl

pytestmark = pytest.mark.slow  # end to end on a real tiny model: `pytest -m 'not slow'` leaves it out

trl = pytest.importorskip("trl")

ROWS = [
    {"prompt": "Translate to French: cat", "completion": " chat"},
    {"prompt": "2 + 2 =", "completion": " 4"},
    {"prompt": "Name a colour.\n", "completion": "Blue is a colour."},
    {"prompt": "Q: capital of Italy?\nA:", "completion": " Rome, since 1871."},
]


def trl_labels(tokenizer, rows, tmp_path):
    import datasets

    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), completion_only_loss=True, bf16=False,
                         max_length=None, report_to=[], use_cpu=True)
    trainer = trl.SFTTrainer(model=make_tiny_llama(tokenizer), args=args, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_list(rows))
    return [(r["input_ids"], r["labels"]) for r in trainer.train_dataset]


def ours(tokenizer, rows, tmp_path, template):
    cfg = load_config(None, {"data.train": str(write_jsonl(tmp_path / "d.jsonl", rows)), "data.template": template})
    prepared = prepare(cfg.data, 0, Renderer(tokenizer, template=template))
    return [(e.input_ids, e.labels) for e in prepared.train]


def test_string_prompt_completion_labels_equal_trl(tokenizer, tmp_path):
    theirs = trl_labels(tokenizer, ROWS, tmp_path)
    assert ours(tokenizer, ROWS, tmp_path, "plain") == theirs
    assert all(IGNORE in labels and any(x != IGNORE for x in labels) for _, labels in theirs)


def test_conversational_prompt_completion_labels_equal_trl_up_to_the_end_of_turn(tokenizer, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["completion"].strip()}]} for r in ROWS]
    theirs = trl_labels(tokenizer, rows, tmp_path)
    mine = ours(tokenizer, rows, tmp_path, "auto")
    for (ids, labels), (t_ids, t_labels) in zip(mine, theirs):
        assert ids == t_ids
        # Same labels through the reply's end-of-turn token. TRL also trains what the template writes
        # after it (here a newline, which is not part of the reply); sftkit leaves that untrained.
        end = max(i for i, x in enumerate(labels) if x != IGNORE) + 1
        assert labels[:end] == t_labels[:end]
        assert ids[end - 1] == tokenizer.eos_token_id
        assert all(x == IGNORE for x in labels[end:]) and tokenizer.decode(t_labels[end:]) == "\n"


def test_tool_calling_labels_equal_trl_assistant_only_loss(tokenizer, tmp_path):
    """Rows with tools, tool calls and tool results, rendered by the shipped qwen3 template: the
    assistant turns (calls as rendered, final answers) are trained, tool results never, as TRL's
    assistant-only loss does with the template's generation blocks."""
    import copy
    import json

    from sftkit.data.render import TEMPLATES

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]

    def chat(city, temp, answer):
        return {"messages": [
            {"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}]},
            {"role": "tool", "content": json.dumps({"temp": temp})},
            {"role": "assistant", "content": answer}], "tools": json.dumps(tools)}

    rows = [chat("Paris", 12, "12 degrees."), chat("Oslo", -3, "Cold: -3 degrees.")]
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TEMPLATES["qwen3"]
    import datasets

    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), assistant_only_loss=True, bf16=False, max_length=None,
                         report_to=[], use_cpu=True)
    trainer = trl.SFTTrainer(model=make_tiny_llama(tokenizer), args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_list(rows))
    theirs = [(r["input_ids"], r["labels"]) for r in trainer.train_dataset]
    mine = ours(tokenizer, rows, tmp_path, "qwen3")
    assert mine == theirs
    trained = tokenizer.decode([t for t in mine[0][1] if t != IGNORE])
    assert trained == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
                       "12 degrees.<|im_end|>")
