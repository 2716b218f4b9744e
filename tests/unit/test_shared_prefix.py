"""A prefix shared by a packed row's examples, computed once: layout, and the loss and gradients of
the examples laid out whole."""

import pytest
import torch

from sftkit.attention import prefix_sharing_problem, use_packed_attention
from sftkit.data.packing import Batcher, pack_collate, shared_prefix_length
from sftkit.data.render import IGNORE, Example, Renderer, build_examples
from sftkit.data.sources import Normaliser
from sftkit.evaluate import _passes
from sftkit.loss import token_loss

from ..conftest import make_tiny_llama

SYSTEM = "You are a careful assistant. Answer in one short sentence, and show the sum."


def examples(tokenizer, rows, system=SYSTEM):
    exs, _ = build_examples([Normaliser("x", system=system)(r, i) for i, r in enumerate(rows)], Renderer(tokenizer))
    return exs


def test_the_shared_prefix_stops_before_the_first_trained_token_and_the_token_after_it():
    ex = [Example([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [IGNORE] * 10 + [11, 12]),
          Example([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 15], [IGNORE] * 11 + [14, 15])]
    assert shared_prefix_length(ex) == 9  # 10 in common, but token 11 of the first is trained: 10 must stay
    assert shared_prefix_length(ex[:1]) == 0
    assert shared_prefix_length(ex, least=10) == 0
    short = [Example([1, 2, 3, 4, 9], [IGNORE] * 4 + [9]), Example([1, 2, 3, 4, 8], [IGNORE] * 4 + [8])]
    assert shared_prefix_length(short) == 0  # 3 tokens: not worth a segment


def test_the_layout_continues_each_example_from_the_prefix(tokenizer, chat_rows):
    exs = examples(tokenizer, chat_rows)[:3]
    p = shared_prefix_length(exs)
    assert p >= 20  # the system message and the template's opening
    batch = pack_collate([exs[:2], exs[2:]], tokenizer.pad_token_id, share_prefix=True)
    own = [len(e.input_ids) - p for e in exs]
    assert batch["sftkit_prefix_of"] == [-1, 0, 0, 0]
    assert batch["input_ids"][0].tolist() == exs[0].input_ids[:p] + [t for e in exs for t in e.input_ids[p:]]
    assert batch["position_ids"][0].tolist() == list(range(p)) + [p + k for n in own for k in range(n)]
    assert batch["cu_seq_lens_q"].tolist() == [0, p, p + own[0], p + own[0] + own[1], p + sum(own)]
    assert batch["labels"][0].tolist() == [IGNORE] * p + [y for e in exs for y in e.labels[p:]]
    assert int(batch["real_tokens"]) == sum(len(e.input_ids) for e in exs)  # the examples' tokens, as before
    assert "sftkit_prefix_of" not in pack_collate([exs], 0)  # off unless asked


def _loss_and_grads(model, batch):
    model.zero_grad()
    sums = token_loss(model, batch)
    sums.loss.backward()
    return sums, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "mistral-window"])
def test_loss_and_gradients_equal_the_examples_laid_out_whole(tokenizer, chat_rows, family):
    """Mistral's 16-token sliding window is shorter than the prefix and the examples: the window
    must cut into the prefix exactly as it does in the whole example."""
    if family == "llama":
        model = make_tiny_llama(tokenizer)
    else:
        import transformers as T

        torch.manual_seed(0)
        model = T.MistralForCausalLM(T.MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                     sliding_window=16))
    model = model.float().eval()
    assert use_packed_attention(model) == "sftkit_sdpa"
    exs = examples(tokenizer, chat_rows)
    assert prefix_sharing_problem(model, exs) is None
    whole, g_whole = _loss_and_grads(model, pack_collate([exs], tokenizer.pad_token_id))
    shared_batch = pack_collate([exs], tokenizer.pad_token_id, share_prefix=True)
    assert shared_batch["input_ids"].shape[1] < sum(len(e.input_ids) for e in exs) - 10 * 20  # really shared
    shared, g_shared = _loss_and_grads(model, shared_batch)
    assert shared.tokens == whole.tokens and shared.correct == whole.correct
    torch.testing.assert_close(shared.loss, whole.loss, rtol=1e-5, atol=1e-5)
    assert g_shared.keys() == g_whole.keys()
    for n in g_whole:
        scale = max(1.0, float(g_whole[n].abs().max()))
        torch.testing.assert_close(g_shared[n], g_whole[n], rtol=1e-4, atol=1e-5 * scale, msg=n)


def test_a_prefix_seen_without_its_positions_or_keys_would_fail(tokenizer, chat_rows, monkeypatch):
    """The equality above is not vacuous: an attention that ignored the prefix (each example on its
    own segment only) gives another loss."""
    model = make_tiny_llama(tokenizer).eval()
    use_packed_attention(model)
    exs = examples(tokenizer, chat_rows)
    whole = token_loss(model, pack_collate([exs], 0)).loss.detach()
    batch = pack_collate([exs], 0, share_prefix=True)
    batch.pop("sftkit_prefix_of")  # the same layout read as plain packing
    assert abs(float(token_loss(model, batch).loss.detach()) - float(whole)) > 1e-2


def test_sharing_is_refused_where_the_attention_cannot_do_it(tokenizer, chat_rows):
    model = make_tiny_llama(tokenizer)
    model.set_attn_implementation("eager")
    assert "attention eager" in prefix_sharing_problem(model, examples(tokenizer, chat_rows))


def test_the_batcher_shares_each_passs_prefix(tokenizer, chat_rows):
    exs = examples(tokenizer, chat_rows)
    plain = Batcher(exs, 4, 1, 0, 0, pack=True, max_length=256)
    shared = Batcher(exs, 4, 1, 0, 0, pack=True, max_length=256, share_prefix=True)
    for step in range(2):
        a, b = plain.micro_batches(step), shared.micro_batches(step)
        assert [int(x["real_tokens"]) for x in a] == [int(x["real_tokens"]) for x in b]
        assert all(x["input_ids"].shape[1] < y["input_ids"].shape[1] for x, y in zip(b, a))


def test_the_eval_loss_packed_with_shared_prefixes_equals_the_padded_one(tokenizer, chat_rows):
    from sftkit.attention import packed_layout
    from sftkit.evaluate import loss_metrics

    model = make_tiny_llama(tokenizer).eval()
    exs = examples(tokenizer, chat_rows)
    padded = loss_metrics(model, exs, 5, tokenizer.pad_token_id)
    assert packed_layout(model, exs) == (True, True)
    shared = loss_metrics(model, exs, 5, tokenizer.pad_token_id, pack=True, share_prefix=True)
    assert shared["token_accuracy"] == padded["token_accuracy"]
    assert shared["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-6)
    by_tokens = loss_metrics(model, exs, 5, tokenizer.pad_token_id, pack=True, share_prefix=True, pass_tokens=120)
    assert by_tokens["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-6)
    model.set_attn_implementation("eager")
    assert packed_layout(model, exs) == (False, False)  # eager: padded as before (a packed row would need a full mask)


def test_packed_eval_passes_hold_up_to_the_token_budget():
    assert _passes([3, 0, 1, 2], [5, 4, 6, 30], 10) == [[3], [0, 1], [2]]  # one example at least, even if longer
    assert _passes([0, 1, 2], [2, 2, 2], 6) == [[0, 1, 2]]
