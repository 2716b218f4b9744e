"""NEFTune: uniform noise of alpha / sqrt(L * d) on the input embeddings while training, never at eval."""

import math

import pytest
import torch

from sftkit.loss import NEFTune, TokenLoss

from ..conftest import make_tiny_llama


def embeddings_of(model, ids, **batch):
    out = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, o: out.append(o.detach().clone()))
    model(input_ids=ids, **batch)
    hook.remove()
    return out[0]


def test_noise_is_uniform_at_the_paper_s_scale_in_training_only(tokenizer):
    model = make_tiny_llama(tokenizer)
    ids = torch.randint(0, 1000, (4, 50))
    clean = model.get_input_embeddings()(ids).detach()
    neft = NEFTune(model, 5.0)
    model.train()
    noise = embeddings_of(model, ids) - clean
    bound = 5.0 / math.sqrt(50 * 32)  # L = the batch's (padded) width, d = the hidden size
    assert noise.abs().max() <= bound * (1 + 1e-5)
    assert noise.abs().max() > 0.99 * bound and abs(noise.mean()) < 0.05 * bound  # fills [-bound, bound], centred
    assert abs(noise.std() - bound / math.sqrt(3)) < 0.05 * bound  # the std of a uniform on [-b, b]
    again = embeddings_of(model, ids) - clean
    assert not torch.equal(noise, again)  # a fresh draw each pass
    model.eval()
    assert torch.equal(embeddings_of(model, ids), clean)  # eval and generation see the clean embeddings
    neft.handle.remove()


def test_a_packed_row_scales_each_example_by_its_own_length(tokenizer):
    model = make_tiny_llama(tokenizer).train()
    ids = torch.randint(0, 1000, (1, 300))
    clean = model.get_input_embeddings()(ids).detach()
    neft = NEFTune(model, 10.0)
    neft.segments = torch.tensor([0, 40, 290], dtype=torch.int32)  # two examples, then 10 positions of padding
    noise = (embeddings_of(model, ids) - clean)[0]
    for (a, b) in ((0, 40), (40, 290)):
        bound = 10.0 / math.sqrt((b - a) * 32)
        assert noise[a:b].abs().max() <= bound * (1 + 1e-5) and noise[a:b].abs().max() > 0.98 * bound
    assert torch.equal(noise[290:], torch.zeros_like(noise[290:]))


def test_the_training_module_passes_the_packed_layout_and_eval_loss_has_no_noise(tokenizer):
    model = make_tiny_llama(tokenizer)
    ids = torch.randint(0, 1000, (1, 24))
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.cat([torch.arange(10), torch.arange(14)])[None],
             "cu_seq_lens_q": torch.tensor([0, 10, 24], dtype=torch.int32),
             "cu_seq_lens_k": torch.tensor([0, 10, 24], dtype=torch.int32), "max_length_q": 14, "max_length_k": 14}
    plain = TokenLoss(model)
    model.eval()
    with torch.no_grad():
        clean = plain(**batch)[0]
    noisy = TokenLoss(model, neftune=NEFTune(model, 5.0))
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, a, o: seen.append(noisy._neftune[0].segments))
    model.eval()
    with torch.no_grad():
        assert torch.equal(noisy(**batch)[0], clean)
    model.train()
    assert not torch.equal(noisy(**batch)[0], clean)
    assert torch.equal(seen[-1], batch["cu_seq_lens_q"])


@pytest.mark.parametrize("overrides, message", [
    ({"train.neftune_alpha": -1}, "train.neftune_alpha: must be >= 0"),
    ({"train.neftune_alpha": 5, "train.kl_to_base": 0.1}, "train.neftune_alpha with train.kl_to_base"),
    ({"task": "preference", "train.neftune_alpha": 5}, "task: preference does not use train.neftune_alpha"),
    ({"task": "rl", "train.neftune_alpha": 5, "rl.rewards": [{"function": "length"}]},
     "task: rl does not use train.neftune_alpha"),
])
def test_neftune_settings_that_cannot_work_are_refused_before_anything_is_written(overrides, message, tmp_path):
    from sftkit.config import ConfigError, load_config
    from sftkit.trainer import train

    with pytest.raises(ConfigError, match=message):
        train(load_config(None, {"data.train": "x.jsonl", "output_dir": str(tmp_path / "run"), **overrides}))
    assert not (tmp_path / "run").exists()
