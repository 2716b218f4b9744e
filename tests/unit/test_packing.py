"""Packing: bins, positions, no attention across examples, and loss/grads equal to one-by-one."""

import pytest
import torch

from sftkit.attention import use_packed_attention
from sftkit.data.packing import Batcher, best_fit_decreasing, pack_collate, pad_collate
from sftkit.data.render import IGNORE, Renderer, build_examples
from sftkit.data.sources import Normaliser
from sftkit.loss import token_loss

from ..conftest import make_tiny_llama


def examples(tokenizer, chat_rows):
    exs, _ = build_examples([Normaliser("x")(r, i) for i, r in enumerate(chat_rows)], Renderer(tokenizer))
    return exs


def test_best_fit_decreasing():
    lengths = [5, 3, 8, 2, 7, 1, 4]
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3  # 30 tokens in bins of 10: as few bins as possible
    assert bins[0] == [2, 3]  # 8 first, then the largest that fits the 2 left


def test_pack_collate_positions_restart_and_first_tokens_untrained(tokenizer, chat_rows):
    exs = examples(tokenizer, chat_rows)[:3]
    batch = pack_collate([exs], tokenizer.pad_token_id)
    lens = [len(e.input_ids) for e in exs]
    assert batch["position_ids"][0].tolist() == [p for n in lens for p in range(n)]
    starts = [sum(lens[:k]) for k in range(3)]
    assert all(batch["labels"][0, s] == IGNORE for s in starts)
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == (1, sum(lens))  # one flat row, no padding
    assert batch["cu_seq_lens_q"].tolist() == [0, *[sum(lens[: k + 1]) for k in range(3)]]
    assert batch["max_length_q"] == max(lens)


# sftkit_sdpa: per-example causal SDPA from cu_seq_lens; sdpa and eager: transformers' block-diagonal
# mask from the restarting position ids. All three must give the one-by-one result.
IMPLEMENTATIONS = ["sftkit_sdpa", "sdpa", "eager"]


def tiny_model(tokenizer, impl):
    model = make_tiny_llama(tokenizer)
    if impl == "sftkit_sdpa":
        assert use_packed_attention(model) == "sftkit_sdpa"
    else:
        model.set_attn_implementation(impl)
    return model


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_packed_examples_never_attend_to_each_other(tokenizer, chat_rows, impl):
    model = tiny_model(tokenizer, impl).eval()
    a, b = examples(tokenizer, chat_rows)[:2]
    changed = type(a)([t + 1 for t in a.input_ids], a.labels)
    def logits(batch):  # use_cache=False as in training: a cache disables the packed mask
        keys = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
        return model(**{k: batch[k] for k in keys}, use_cache=False).logits

    with torch.no_grad():
        out1, out2 = logits(pack_collate([[a, b]], 0)), logits(pack_collate([[changed, b]], 0))
        alone = model(input_ids=torch.tensor([b.input_ids]), use_cache=False).logits
    n = len(a.input_ids)
    torch.testing.assert_close(out1[0, n:], out2[0, n:], rtol=0, atol=1e-6)  # b does not see a
    torch.testing.assert_close(out1[0, n:], alone[0], rtol=1e-5, atol=1e-5)  # as if b were alone


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_packed_loss_and_grads_equal_one_by_one(tokenizer, chat_rows, impl):
    model = tiny_model(tokenizer, impl)
    exs = examples(tokenizer, chat_rows)
    bins = best_fit_decreasing([len(e.input_ids) for e in exs], 256)
    assert len(bins) < len(exs)  # something was really packed
    packed = pack_collate([[exs[i] for i in b] for b in bins], tokenizer.pad_token_id)
    sums = token_loss(model, packed)
    sums.loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    total, tokens = 0.0, 0
    for e in exs:
        s = token_loss(model, pad_collate([e], tokenizer.pad_token_id))
        s.loss.backward()
        total, tokens = total + s.loss.detach(), tokens + s.tokens
    assert sums.tokens == tokens
    torch.testing.assert_close(sums.loss.detach(), total, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n] / tokens, p.grad / tokens, rtol=1e-5, atol=1e-6, msg=n)


def test_batcher_covers_each_example_once_per_epoch_and_groups_lengths(tokenizer, chat_rows):
    exs = examples(tokenizer, chat_rows)
    b = Batcher(exs, batch_size=2, grad_accum=2, seed=1, pad_id=0, group_by_length=True)
    epoch = [u for s in range(3) for u in b.step_units(s)]  # 12 examples, 4 per step
    assert sorted(epoch) == list(range(12))
    assert Batcher(exs, 2, 2, 1, 0).step_units(5) == b.step_units(5)  # a function of the step alone
    mb = b.micro_batches(0)
    assert len(mb) == 2 and all(x["input_ids"].shape[0] == 2 for x in mb)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_varlen_kernel_equals_per_example_attention(tokenizer, chat_rows, monkeypatch):
    """On a GPU in bf16, sftkit_sdpa runs PyTorch's varlen flash kernel once per row; its loss and
    gradients must match the per-example SDPA path (bf16 tolerance), and it must really be the path taken."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftkit import attention

    if attention.varlen_attn is None:
        pytest.skip("this PyTorch has no torch.nn.attention.varlen")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    assert use_packed_attention(model) == "sftkit_sdpa"
    exs = examples(tokenizer, chat_rows)
    packed = pack_collate([exs], tokenizer.pad_token_id)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in packed.items()}

    def loss_and_grads():
        model.zero_grad()
        s = token_loss(model, batch)
        s.loss.backward()
        return s.loss.detach().float() / s.tokens, {n: p.grad.float() for n, p in model.named_parameters()}

    calls = []
    real = attention._torch_varlen
    monkeypatch.setattr(attention, "_torch_varlen", lambda *a: calls.append(1) or real(*a))
    varlen_loss, varlen_grads = loss_and_grads()
    assert len(calls) == config.num_hidden_layers
    monkeypatch.setattr(attention, "varlen_attn", None)  # the per-example SDPA path
    loop_loss, loop_grads = loss_and_grads()
    assert len(calls) == config.num_hidden_layers
    torch.testing.assert_close(varlen_loss, loop_loss, rtol=1e-2, atol=1e-2)
    for n, g in loop_grads.items():
        assert torch.linalg.vector_norm(varlen_grads[n] - g) <= 2e-2 * torch.linalg.vector_norm(g) + 1e-6, n


def test_pad_collate_rounds_the_width_up_and_masks_the_extra_padding(tokenizer, chat_rows):
    exs = examples(tokenizer, chat_rows)[:3]
    plain, rounded = pad_collate(exs, 0), pad_collate(exs, 0, multiple=64)
    width = plain["input_ids"].shape[1]
    assert rounded["input_ids"].shape[1] == -(-width // 64) * 64 > width
    assert torch.equal(rounded["input_ids"][:, :width], plain["input_ids"])
    assert torch.equal(rounded["labels"][:, :width], plain["labels"])
    assert (rounded["labels"][:, width:] == IGNORE).all() and (rounded["attention_mask"][:, width:] == 0).all()
    assert rounded["real_tokens"] == plain["real_tokens"]
    model = make_tiny_llama(tokenizer)
    with torch.no_grad():
        a, b = token_loss(model, plain), token_loss(model, rounded)
    assert a.tokens == b.tokens
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)


# -- packing across model families ------------------------------------------------------------------
def _family(tokenizer, name: str):
    import transformers as T

    v, small = len(tokenizer), {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 4}
    torch.manual_seed(0)
    if name == "mistral-window":
        m = T.MistralForCausalLM(T.MistralConfig(vocab_size=v, num_key_value_heads=2, sliding_window=16, **small))
    elif name == "qwen2-window":
        m = T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=v, num_key_value_heads=2, use_sliding_window=True,
                                             sliding_window=16, max_window_layers=0, **small))
    elif name == "gpt2":
        m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0))
    elif name == "gpt-neox":
        m = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=v, **small))
    elif name == "gemma2":  # local (sliding) and global layers, eager attention
        m = T.Gemma2ForCausalLM(T.Gemma2Config(vocab_size=v, num_key_value_heads=2, head_dim=8, sliding_window=16,
                                               **small))
    elif name == "bloom":
        m = T.BloomForCausalLM(T.BloomConfig(vocab_size=v, hidden_size=32, n_layer=2, n_head=4))
    elif name.startswith("llama"):
        m = make_tiny_llama(tokenizer)
        m.set_attn_implementation(name.split("-")[1])
    return m.float().eval()  # no dropout: the two computations must be comparable token for token


def _long_examples(tokenizer):
    """Examples longer than the 16-token windows, so that a window that is ignored shows."""
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}? " + "word " * (3 * i)},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(8)]
    exs, _ = build_examples([Normaliser("x")(r, i) for i, r in enumerate(rows)], Renderer(tokenizer))
    assert min(len(e.input_ids) for e in exs) > 16
    return exs


@pytest.mark.parametrize("family", ["llama-eager", "llama-sdpa", "mistral-window", "qwen2-window", "gpt2", "gpt-neox",
                                    "gemma2"])
def test_packed_loss_equals_unpacked_on_each_family(tokenizer, family):
    from sftkit.attention import packing_problem

    model = _family(tokenizer, family)
    use_packed_attention(model)
    exs = _long_examples(tokenizer)
    assert packing_problem(model, exs) is None
    bins = best_fit_decreasing([len(e.input_ids) for e in exs], 512)
    packed = token_loss(model, pack_collate([[exs[i] for i in b] for b in bins], tokenizer.pad_token_id))
    packed.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total = 0.0
    for e in exs:
        s = token_loss(model, pad_collate([e], tokenizer.pad_token_id))
        s.loss.backward()
        total = total + s.loss.detach()
    torch.testing.assert_close(packed.loss.detach(), total, rtol=1e-5, atol=1e-4)
    for n, p in model.named_parameters():
        if p.grad is not None:
            # A packed row sums its examples' gradients in another order than separate rows do: fp32
            # rounding, relative to the gradient's own scale (GPT-2's embeddings reach ~18 here; one
            # element differed by 4e-5 on an AMD EPYC). A leak between examples is orders larger.
            scale = max(1.0, float(p.grad.abs().max()))
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5 * scale, msg=n)


def test_packing_is_refused_where_examples_would_see_each_other(tokenizer, tmp_path):
    """Bloom's ALiBi attention takes no positions: packed examples attend across their boundary."""
    from sftkit.attention import packing_problem
    from sftkit.config import ConfigError, load_config
    from sftkit.trainer import train

    from ..conftest import write_jsonl

    model = _family(tokenizer, "bloom")
    assert "model type 'bloom'" in packing_problem(model, _long_examples(tokenizer))
    model.save_pretrained(tmp_path / "bloom")
    tokenizer.save_pretrained(tmp_path / "bloom")
    data = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"q{i} " * 20, "completion": f"a{i}"} for i in range(4)])
    cfg = load_config(None, {"model.name": str(tmp_path / "bloom"), "data.train": str(data), "data.pack": True,
                             "output_dir": str(tmp_path / "run"), "eval.reference": None})
    with pytest.raises(ConfigError, match=r"data.pack=true: packing is not exact for model type 'bloom'.*set data.pack=false"):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before any step
