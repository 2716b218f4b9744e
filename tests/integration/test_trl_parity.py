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
