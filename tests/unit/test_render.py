"""Exact label masks for chat templates, masking modes, plain rendering and truncation."""

import pytest

from sftkit.data.packing import pad_collate
from sftkit.data.render import IGNORE, Renderer, build_examples
from sftkit.data.sources import DataError, Normaliser, Row

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
CHAT = {"messages": [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo there"},
    {"role": "user", "content": "more please"},
    {"role": "assistant", "content": "ok, here"},
]}


def row(obj, line=1, **kw):
    return Normaliser("data.jsonl", **kw)(obj, line)


def pieces_to_expected(tok, pieces):
    """[(text, trained)] -> (ids, labels); pieces split at special tokens so BPE cannot merge across."""
    ids, labels = [], []
    for text, trained in pieces:
        part = tok(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if trained else [IGNORE] * len(part)
    return ids, labels


def chat_pieces(first_trained, second_trained):
    return [
        (SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
        ("yo there<|im_end|>", first_trained),
        ("\n<|im_start|>user\nmore please<|im_end|>\n<|im_start|>assistant\n", False),
        ("ok, here<|im_end|>", second_trained),
        ("\n", False),
    ]


def test_multi_turn_chat_trains_every_assistant_reply_and_its_end_token(tokenizer):
    ex = Renderer(tokenizer).render(row(CHAT))
    ids, labels = pieces_to_expected(tokenizer, chat_pieces(True, True))
    assert ex.input_ids == ids
    assert ex.labels == labels


@pytest.mark.parametrize("mask", ["last_assistant", "completion"])
def test_last_assistant_mask_trains_only_the_final_reply(tokenizer, mask):
    ex = Renderer(tokenizer, mask=mask).render(row(CHAT))
    assert ex.labels == pieces_to_expected(tokenizer, chat_pieces(False, True))[1]


def test_mask_none_trains_every_token(tokenizer):
    ex = Renderer(tokenizer, mask="none").render(row(CHAT))
    assert ex.labels == ex.input_ids


def test_prompt_completion_with_message_lists_trains_the_completion_part(tokenizer):
    r = row({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo there"},
                        {"role": "user", "content": "more please"}],
             "completion": [{"role": "assistant", "content": "ok, here"}]})
    ex = Renderer(tokenizer).render(r)
    assert (ex.input_ids, ex.labels) == pieces_to_expected(tokenizer, chat_pieces(False, True))


def test_no_duplicated_bos(tokenizer):
    ex = Renderer(tokenizer).render(row({"prompt": "a", "completion": "b"}))
    assert ex.input_ids[0] == tokenizer.bos_token_id
    assert ex.input_ids[1] != tokenizer.bos_token_id
    assert tokenizer.decode(ex.input_ids).startswith("<|im_start|>system")


def test_end_of_turn_stays_trained_when_pad_equals_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the case that breaks naive collators
    rows = [row({"prompt": "hi", "completion": "a"}), row({"prompt": "hello there, how are you", "completion": "fine"})]
    exs, _ = build_examples(rows, Renderer(tokenizer))
    batch = pad_collate(exs, tokenizer.pad_token_id)
    short = batch["labels"][0]
    n = len(exs[0].input_ids)
    assert short[short != IGNORE].tolist() == tokenizer("a<|im_end|>", add_special_tokens=False)["input_ids"]
    assert (short[n:] == IGNORE).all()  # padding (the same id as eos) is not trained
    assert batch["attention_mask"][0, n:].sum() == 0


def test_system_message_from_config(tokenizer):
    text = tokenizer.decode(Renderer(tokenizer).render(row({"prompt": "q", "completion": "a"}, system="Be brief.")).input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_plain_template_is_prompt_completion_eos(tokenizer):
    ex = Renderer(tokenizer, template="plain").render(row({"prompt": "Q: 2+2? A:", "completion": " 4"}))
    p = tokenizer("Q: 2+2? A:", add_special_tokens=False)["input_ids"]
    c = tokenizer(" 4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ex.input_ids == p + c
    assert ex.labels == [IGNORE] * len(p) + c


def test_text_rows_train_every_token_and_end_with_eos(tokenizer):
    ex = Renderer(tokenizer).render(row({"text": "Once upon a time."}))
    assert ex.input_ids == tokenizer("Once upon a time.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ex.labels == ex.input_ids


def test_builtin_alpaca_template_trains_response_and_eos(tokenizer):
    r = row({"instruction": "Add 2 and 2.", "input": "", "output": "4"})
    ex = Renderer(tokenizer, template="alpaca").render(r)
    head = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nAdd 2 and 2.\n\n### Response:\n")
    ids, labels = pieces_to_expected(tokenizer, [(head, False), ("4<|im_end|>", True), ("\n\n", False)])
    assert (ex.input_ids, ex.labels) == (ids, labels)


def test_jinja_template_file(tokenizer, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                    "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    ex = Renderer(tokenizer, template=str(path)).render(row({"prompt": "q", "completion": "a"}))
    assert (ex.input_ids, ex.labels) == pieces_to_expected(tokenizer, [("[user]q[assistant]", False), ("a<|im_end|>", True)])


def test_template_that_is_not_prefix_consistent_is_reported_with_row(tokenizer, tmp_path):
    # Renders earlier turns differently once a later turn exists (as some "thinking" templates do).
    path = tmp_path / "bad.jinja"
    path.write_text("{% for m in messages %}{% if loop.last %}<{{ m['content'] }}>{% else %}{{ m['content'] }}{% endif %}"
                    "{% endfor %}{% if add_generation_prompt %}:{% endif %}")
    with pytest.raises(DataError, match=r"data.jsonl:3: messages\[1\]: the chat template .*bad.jinja.* prefix-consistent"):
        Renderer(tokenizer, template=str(path)).render(row({"prompt": "q", "completion": "a"}, line=3))


def test_truncation_cuts_the_reply_tail_and_keeps_the_opening_and_prompt(tokenizer):
    r = Renderer(tokenizer, max_length=40)
    full = r.render(row({"prompt": "What is the capital of France?", "completion": "word " * 80}))
    ex, dropped, cut = r.fit(row({"prompt": "What is the capital of France?", "completion": "word " * 80}))
    assert cut and dropped is None and len(ex.input_ids) == 40
    assert ex.input_ids == full.input_ids[:40]  # BOS, system message, header and the whole question
    prompt_len = full.labels.index(next(x for x in full.labels if x != -100))
    assert ex.labels[:prompt_len] == [-100] * prompt_len and ex.n_trained == 40 - prompt_len


def test_a_prompt_that_cannot_fit_drops_the_row_under_its_own_reason(tokenizer):
    rows = [row({"prompt": "word " * 50, "completion": "short answer"}, line=4), row({"prompt": "q", "completion": "a"})]
    exs, stats = build_examples(rows, Renderer(tokenizer, max_length=40))
    assert len(exs) == 1 and stats.dropped == {"prompt longer than data.max_length": 1}
    assert "1 prompt longer than data.max_length" in stats.summary("train")


def test_truncation_removes_earlier_turns_whole_and_oldest_first(tokenizer):
    long_first = [{"role": "user", "content": "word " * 30}, {"role": "assistant", "content": "first reply"},
                  {"role": "user", "content": "second question"}, {"role": "assistant", "content": "second reply"},
                  {"role": "user", "content": "third question"}, {"role": "assistant", "content": "third reply"}]
    r = Renderer(tokenizer, max_length=60)
    last_two = r.render(row({"messages": long_first[2:]}))
    assert len(r.render(row({"messages": long_first})).input_ids) > 60 >= len(last_two.input_ids)
    ex, dropped, cut = r.fit(row({"messages": long_first}))
    assert cut and dropped is None
    assert (ex.input_ids, ex.labels) == (last_two.input_ids, last_two.labels)  # whole turns, the opening kept
    only_last = r.render(row({"messages": long_first[4:]}))
    r2 = Renderer(tokenizer, max_length=len(only_last.input_ids))
    ex2, _, _ = r2.fit(row({"messages": long_first}))
    assert ex2.input_ids == only_last.input_ids


def test_truncation_drop_and_error(tokenizer):
    long = row({"prompt": "word " * 50, "completion": "x"}, line=7)
    exs, stats = build_examples([long, row({"prompt": "q", "completion": "a"})], Renderer(tokenizer, max_length=40, truncation="drop"))
    assert len(exs) == 1 and stats.dropped["longer than max_length=40"] == 1
    with pytest.raises(DataError, match=r"data.jsonl:7: \d+ tokens, longer than data.max_length=20"):
        build_examples([long], Renderer(tokenizer, max_length=20, truncation="error"))


def test_sample_left_without_trained_tokens_is_dropped_and_counted(tokenizer):
    # Plain text cut to one token: the first token is never predicted, so nothing is left for the loss.
    exs, stats = build_examples([Row([], "t.jsonl", 1, "text", text="some words here")], Renderer(tokenizer, max_length=1))
    assert exs == [] and stats.dropped["no trained token left after truncation"] == 1
    assert "1 no trained token left after truncation" in stats.summary("train")


@pytest.mark.parametrize("overlap", [0, 5])
def test_a_long_document_becomes_blocks_that_train_each_of_its_tokens_once_in_order(tokenizer, overlap):
    text = " ".join(f"word{i}" for i in range(400))
    renderer = Renderer(tokenizer, max_length=64, chunk_overlap=overlap)
    whole = renderer.render(row({"text": text}))
    n = len(whole.input_ids)
    renderer.max_length = max_length = int(n / 3.5)  # the document is 3.5 x max_length
    exs, stats = build_examples([row({"text": text}, line=3), row({"text": "short one"})], renderer)
    blocks = exs[:-1]
    assert len(blocks) == 4 and stats.split == 1 and stats.blocks == 4 and stats.kept == 2 and stats.truncated == 0
    assert "1 long documents split into 4 blocks" in stats.summary("train")
    assert all(len(b.input_ids) <= max_length and b.line == 3 for b in blocks)
    trained = [t for b in blocks for t in b.labels[1:] if t != IGNORE]
    assert trained == whole.input_ids[1:]  # every token once, in order (the first is never predicted), eos last
    assert stats.trained_tokens == len(trained) + exs[-1].n_trained
    for b in blocks:  # a label is the token at its position: each block is the document's text, not a shifted copy
        assert all(y in (IGNORE, x) for x, y in zip(b.input_ids, b.labels))
    for prev, nxt in zip(blocks, blocks[1:]):  # each block opens with the end of the one before, untrained
        context = max(overlap, 1)
        assert nxt.input_ids[:context] == prev.input_ids[-context:]
        assert nxt.labels[:context] == [IGNORE] * context and nxt.labels[context] != IGNORE


def test_long_documents_keep_drop_and_error_and_a_bad_overlap_is_refused(tokenizer):
    text = {"text": "word " * 200}
    exs, stats = build_examples([row(text)], Renderer(tokenizer, max_length=40, truncation="drop"))
    assert exs == [] and stats.dropped["longer than max_length=40"] == 1
    with pytest.raises(DataError, match=r"data.jsonl:1: \d+ tokens, longer than data.max_length=40"):
        build_examples([row(text)], Renderer(tokenizer, max_length=40, truncation="error"))
    with pytest.raises(DataError, match="data.chunk_overlap"):
        Renderer(tokenizer, max_length=40, chunk_overlap=39)
