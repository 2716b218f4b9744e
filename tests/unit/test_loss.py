"""The trained-positions-only, chunked loss equals plain full-logits cross-entropy."""

import torch
import torch.nn.functional as F

from sftkit.data.packing import pad_collate
from sftkit.data.render import IGNORE, Renderer, build_examples
from sftkit.data.sources import Normaliser
from sftkit.loss import token_loss

from ..conftest import make_tiny_llama


def reference_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def test_chunked_loss_and_grads_equal_full_logits(tokenizer, chat_rows):
    model = make_tiny_llama(tokenizer)
    exs, _ = build_examples([Normaliser("x")(r, i) for i, r in enumerate(chat_rows)], Renderer(tokenizer))
    batch = pad_collate(exs[:6], tokenizer.pad_token_id)

    # Normalised by trained tokens, as the trainer does, so gradients are on the scale training sees.
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    ref = reference_loss(model, batch) / n
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    sums = token_loss(model, batch, chunk_size=7)  # several chunks, the last one partial
    (sums.loss / sums.tokens).backward()
    assert sums.tokens == n
    torch.testing.assert_close(sums.loss / sums.tokens, ref, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_loss_metrics_through_the_training_module_equal_the_model_s(tokenizer, chat_rows):
    # Under FSDP the trainer scores through its TokenLoss module (only its forward gathers the shards).
    from sftkit.evaluate import loss_metrics
    from sftkit.loss import TokenLoss

    model = make_tiny_llama(tokenizer)
    exs, _ = build_examples([Normaliser("x")(r, i) for i, r in enumerate(chat_rows)], Renderer(tokenizer))
    direct = loss_metrics(model, exs, 4, tokenizer.pad_token_id)
    wrapped = loss_metrics(TokenLoss(model), exs, 4, tokenizer.pad_token_id)
    assert direct == wrapped
    assert direct["eval_loss"] > 0


def test_frozen_head_takes_its_gradient_in_the_forward_pass_and_equals_full_logits(tokenizer, chat_rows, monkeypatch):
    # LoRA and QLoRA leave the (tied) head frozen: the loss then computes d loss / d hidden in the
    # forward pass. Loss and every trained parameter's gradient must equal plain cross-entropy's.
    from sftkit import loss as loss_module

    model = make_tiny_llama(tokenizer)
    model.get_input_embeddings().weight.requires_grad_(False)  # tied: the head too
    assert not model.get_output_embeddings().weight.requires_grad
    exs, _ = build_examples([Normaliser("x")(r, i) for i, r in enumerate(chat_rows)], Renderer(tokenizer))
    batch = pad_collate(exs[:6], tokenizer.pad_token_id)
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    ref = reference_loss(model, batch) / n
    ref.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    calls = []
    fused = loss_module._FrozenHeadCE.apply
    monkeypatch.setattr(loss_module._FrozenHeadCE, "apply", lambda *a: calls.append(1) or fused(*a))
    sums = token_loss(model, batch, chunk_size=7)
    (sums.loss / sums.tokens).backward()
    assert len(calls) == -(-n // 7)  # every chunk went through the fused path
    torch.testing.assert_close(sums.loss / sums.tokens, ref, rtol=1e-5, atol=1e-5)
    for k, g in ref_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[k].grad, g, rtol=1e-5, atol=1e-6, msg=k)
    ref_correct = (model(input_ids=batch["input_ids"]).logits[:, :-1].argmax(-1) == batch["labels"][:, 1:])
    assert sums.correct == int((ref_correct & (batch["labels"][:, 1:] != IGNORE)).sum())


def _tiny_granite(tokenizer, scaling: float, seed: int = 0):
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(seed)
    return GraniteForCausalLM(GraniteConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, logits_scaling=scaling, tie_word_embeddings=True)).float()


def test_a_model_that_scales_its_logits_is_found_numerically_and_loss_and_kl_use_its_logits(tokenizer, chat_rows):
    """Granite divides its logits by logits_scaling (as Falcon-H1 multiplies them): no list of model
    types names it; the check at the first batch finds that head(hidden) is not the model's logits."""
    from sftkit.loss import head_is_logits

    exs, _ = build_examples([Normaliser("x")(r, i) for i, r in enumerate(chat_rows)], Renderer(tokenizer))
    batch = pad_collate(exs[:4], tokenizer.pad_token_id)
    assert head_is_logits(make_tiny_llama(tokenizer), batch["input_ids"])
    assert head_is_logits(_tiny_granite(tokenizer, 1.0), batch["input_ids"])
    model = _tiny_granite(tokenizer, 8.0)
    sums = token_loss(model, batch)
    torch.testing.assert_close(sums.loss, reference_loss(model, batch), rtol=1e-6, atol=1e-4)
    # kl_to_base is computed, not skipped, on such a model: against a differing base it adds to the loss.
    other = _tiny_granite(tokenizer, 8.0, seed=1)
    with_kl = token_loss(model, batch, kl_coef=1.0, frozen_base=other).loss
    assert with_kl > sums.loss + 1e-3
    same = token_loss(model, batch, kl_coef=1.0, frozen_base=_tiny_granite(tokenizer, 8.0)).loss
    torch.testing.assert_close(same, sums.loss, rtol=1e-6, atol=1e-4)  # KL to itself is zero


def test_float16_training_is_refused_with_what_to_use(tmp_path):
    import pytest

    from sftkit.config import ConfigError, load_config
    from sftkit.trainer import train

    with pytest.raises(ConfigError, match="model.dtype=float16: training float16 weights without loss scaling"):
        train(load_config(None, {"model.dtype": "float16", "output_dir": str(tmp_path / "r")}))
    assert not (tmp_path / "r").exists()


def test_the_frozen_head_log_prob_and_its_gradient_equal_autograds():
    from sftkit.loss import FrozenHeadLogp

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g) * 0.5
    targets = torch.randint(0, 50, (7,), generator=g)
    upstream = torch.randn(7, generator=g)  # each position weighted differently, as DPO's pairs are
    fused = FrozenHeadLogp.apply(hidden, weight, targets)
    (fused * upstream).sum().backward()
    fused_grad = hidden.grad.clone()
    hidden.grad = None
    plain = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None])[:, 0]
    (plain * upstream).sum().backward()
    torch.testing.assert_close(fused, plain.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_grad, hidden.grad, rtol=1e-5, atol=1e-6)


def test_the_in_place_log_probs_equal_log_softmax_even_for_large_logits():
    from sftkit.loss import target_logps

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g) * 40 + torch.tensor([0.0, 500.0, -500.0, 90.0, 0.0])[:, None]
    targets = torch.randint(0, 300, (5,), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    got = target_logps(logits.clone(), targets)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
