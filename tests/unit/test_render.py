"""Exact label masks for chat templates, plain rendering and truncation."""

from sftkit.data.packing import pad_collate
from sftkit.data.render import IGNORE, Renderer, build_examples
from sftkit.data.sources import normalise

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def pieces_to_expected(tok, pieces):
    """[(text, trained)] -> (ids, labels); pieces split at special tokens so BPE cannot merge across."""
    ids, labels = [], []
    for text, trained in pieces:
        part = tok(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if trained else [IGNORE] * len(part)
    return ids, labels


def test_multi_turn_chat_trains_every_assistant_reply_and_its_end_token(tokenizer):
    row = normalise({"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo there"},
        {"role": "user", "content": "more please"},
        {"role": "assistant", "content": "ok, here"},
    ]}, "chat.jsonl", 1)
    ex = Renderer(tokenizer).render(row)
    ids, labels = pieces_to_expected(tokenizer, [
        (SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
        ("yo there<|im_end|>", True),
        ("\n<|im_start|>user\nmore please<|im_end|>\n<|im_start|>assistant\n", False),
        ("ok, here<|im_end|>", True),
        ("\n", False),
    ])
    assert ex.input_ids == ids
    assert ex.labels == labels


def test_no_duplicated_bos(tokenizer):
    row = normalise({"prompt": "a", "completion": "b"}, "x.jsonl", 1)
    ex = Renderer(tokenizer).render(row)
    assert ex.input_ids[0] == tokenizer.bos_token_id
    assert ex.input_ids[1] != tokenizer.bos_token_id
    assert tokenizer.decode(ex.input_ids).startswith("<|im_start|>system")


def test_end_of_turn_stays_trained_when_pad_equals_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the case that breaks naive collators
    r = Renderer(tokenizer)
    rows = [normalise({"prompt": "hi", "completion": "a"}, "x", 1),
            normalise({"prompt": "hello there, how are you", "completion": "fine thanks"}, "x", 2)]
    exs, _ = build_examples(rows, r)
    batch = pad_collate(exs, tokenizer.pad_token_id)
    short = batch["labels"][0]
    n = len(exs[0].input_ids)
    trained = short[short != IGNORE].tolist()
    assert trained == tokenizer("a<|im_end|>", add_special_tokens=False)["input_ids"]
    assert (short[n:] == IGNORE).all()  # padding (the same id as eos) is not trained
    assert batch["attention_mask"][0, n:].sum() == 0


def test_system_message_from_config_and_row(tokenizer):
    row = normalise({"prompt": "q", "completion": "a"}, "x", 1, system="Be brief.")
    text = tokenizer.decode(Renderer(tokenizer).render(row).input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_plain_template_is_prompt_completion_eos(tokenizer):
    row = normalise({"prompt": "Q: 2+2? A:", "completion": " 4"}, "x", 1)
    ex = Renderer(tokenizer, template="plain").render(row)
    p = tokenizer("Q: 2+2? A:", add_special_tokens=False)["input_ids"]
    c = tokenizer(" 4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ex.input_ids == p + c
    assert ex.labels == [IGNORE] * len(p) + c


def test_truncation_cuts_prompt_from_left_before_reply(tokenizer):
    row = normalise({"prompt": "word " * 50, "completion": "short answer"}, "x", 1)
    r = Renderer(tokenizer, max_length=20)
    full = r.render(row)
    ex, cut = r.truncate(full)
    assert cut and len(ex.input_ids) == 20
    assert ex.input_ids == full.input_ids[-20:]
    assert ex.n_trained == full.n_trained  # the reply survives whole


def test_sample_left_without_trained_tokens_is_dropped_and_counted(tokenizer):
    # Cut to one token: that token is a reply token, but the first token is never predicted,
    # so nothing is left for the loss.
    rows = [normalise({"prompt": "p", "completion": "fine"}, "x", 1)]
    r = Renderer(tokenizer, max_length=1)
    exs, stats = build_examples(rows, r)
    assert exs == [] and stats.dropped["no trained token left after truncation"] == 1
    assert "1 no trained token left after truncation" in stats.summary("train")
