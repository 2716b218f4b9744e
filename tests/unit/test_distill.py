"""Distillation (train.distill): the chunked loss on trained tokens equals the plain full-logits
computation, for each divergence and temperature; top-k; the tokenizer check."""

import pytest
import torch
import torch.nn.functional as F

from sftkit.config import ConfigError, load_config
from sftkit.data.render import IGNORE
from sftkit.distill import check_distill as check
from sftkit.distill import tokenizer_difference
from sftkit.loss import Distill, divergence, token_loss

from ..conftest import make_tiny_llama


def batch_of(tokenizer):
    torch.manual_seed(0)
    ids = torch.randint(5, 2000, (2, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE  # a prompt
    labels[1, 9:] = IGNORE
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def plain(student, teacher, batch, weight, temperature, kind):
    """(1 - w) NLL + w D from both models' full logits, D written out with probabilities."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    s_logits = student(input_ids=batch["input_ids"]).logits[:, :-1][keep]
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"]).logits[:, :-1][keep]
    log_s, log_t = F.log_softmax(s_logits / temperature, -1), F.log_softmax(t_logits / temperature, -1)
    if kind == "forward_kl":
        d = F.kl_div(log_s, log_t, log_target=True, reduction="sum")  # KL(teacher || student)
    elif kind == "reverse_kl":
        d = F.kl_div(log_t, log_s, log_target=True, reduction="sum")
    else:
        p, q = log_s.exp(), log_t.exp()
        m = (p + q) / 2
        d = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    return (1 - weight) * F.cross_entropy(s_logits, targets[keep], reduction="sum") + weight * d


def plain_terms(student, teacher, batch, temperature, kind):
    """The NLL and the divergence apart: plain() at weight 0 and at weight 1."""
    return (float(plain(student, teacher, batch, 0.0, temperature, kind)),
            float(plain(student, teacher, batch, 1.0, temperature, kind)))


@pytest.mark.parametrize("chunk_size", [4, 1024])
def test_the_nll_and_the_distillation_term_are_reported_apart(tokenizer, chunk_size):
    """What a distillation run logs as `nll` and `distill`: each term's sum, unweighted, from the
    chunked path (several chunks or one); the loss is their blend."""
    from sftkit.loss import TokenLoss

    student, teacher = make_tiny_llama(tokenizer, seed=0), make_tiny_llama(tokenizer, seed=1).eval()
    batch = batch_of(tokenizer)
    d = Distill(teacher, weight=0.3, temperature=2.0, kind="forward_kl")
    loss, tokens, parts = TokenLoss(student, chunk_size=chunk_size, distill=d)(**batch)
    nll, div = plain_terms(student, teacher, batch, 2.0, "forward_kl")
    assert float(parts["nll"]) == pytest.approx(nll, rel=1e-5)
    assert float(parts["distill"]) == pytest.approx(div, rel=1e-5)
    assert float(loss) == pytest.approx(0.7 * nll + 0.3 * div, rel=1e-5)
    assert not parts["nll"].requires_grad and int(tokens) == int((batch["labels"][:, 1:] != IGNORE).sum())
    with torch.no_grad():  # an eval pass scores the plain NLL and reports correct predictions as before
        assert torch.is_tensor(TokenLoss(student, distill=d)(**batch)[2])


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_chunked_loss_equals_the_full_logits_computation(tokenizer, kind, temperature):
    student, teacher = make_tiny_llama(tokenizer, seed=0), make_tiny_llama(tokenizer, seed=1).eval()
    batch = batch_of(tokenizer)
    d = Distill(teacher, weight=0.3, temperature=temperature, kind=kind)
    got = token_loss(student, batch, chunk_size=4, distill=d).loss  # several chunks, recomputed in backward
    got.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    want = plain(student, teacher, batch, 0.3, temperature, kind)
    want.backward()
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    for n, p in student.named_parameters():
        scale = float(p.grad.abs().max())
        assert float((grads[n] - p.grad).abs().max()) <= 1e-4 * scale + 1e-8, n  # fp32 rounding only
    assert all(p.grad is None for p in teacher.parameters())  # the teacher learns nothing


def test_top_k_over_the_whole_vocabulary_is_the_full_divergence_and_fewer_is_not():
    torch.manual_seed(0)
    s, t = torch.randn(5, 50), torch.randn(5, 50) * 3
    full = divergence(s, t, 1.5, "forward_kl")
    assert float(divergence(s, t, 1.5, "forward_kl", top_k=50)) == pytest.approx(float(full), rel=1e-6)
    assert abs(float(divergence(s, t, 1.5, "forward_kl", top_k=5)) - float(full)) > 1e-3


def test_a_teacher_with_another_tokenizer_is_named_with_the_first_difference(tokenizer):
    import copy

    other = copy.deepcopy(tokenizer)
    assert tokenizer_difference(tokenizer, other) is None
    other.add_tokens(["<sftkit-extra>"])
    assert tokenizer_difference(tokenizer, other) == f"vocabulary sizes differ: student {len(tokenizer)}, teacher {len(tokenizer) + 1}"
    renamed = copy.deepcopy(tokenizer)
    renamed.eos_token = "<|im_start|>"
    assert tokenizer_difference(tokenizer, renamed).startswith("eos_token differs: student '<|im_end|>'")


@pytest.mark.parametrize("override, message", [
    ({"train.distill.loss": "kl"}, "train.distill.loss: 'kl' is not forward_kl | reverse_kl | jsd"),
    ({"train.distill.weight": 1.5}, "train.distill.weight: must be in [0, 1]"),
    ({"train.distill.temperature": 0}, "train.distill.temperature: must be above 0"),
    ({"train.distill.top_k": 8, "train.distill.loss": "jsd"}, "above 0 only with loss forward_kl"),
    ({"train.kl_to_base": 0.1}, "two teachers"),
])
def test_bad_distillation_settings_stop_before_anything_is_written(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("|", r"\|")):
        check(load_config(None, {"train.distill.teacher": "x", **override}))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_cached_divergence_from_top_k_log_probs_equals_top_k_from_the_teachers_logits(temperature):
    from sftkit.loss import cached_divergence

    torch.manual_seed(0)
    s, t = torch.randn(6, 40), torch.randn(6, 40) * 2
    for k in (5, 40):
        logp, idx = torch.log_softmax(t, -1).topk(k, -1)  # what the cache stores: temperature 1
        want = divergence(s, t, temperature, "forward_kl", top_k=k)
        assert float(cached_divergence(s, logp, idx, temperature)) == pytest.approx(float(want), rel=1e-6)
    full = divergence(s, t, temperature, "forward_kl")
    logp, idx = torch.log_softmax(t, -1).topk(40, -1)
    assert float(cached_divergence(s, logp, idx, temperature)) == pytest.approx(float(full), rel=1e-6)


class TopKCache:
    """What sftkit.distill.TeacherCache.lookup gives, made from a teacher's logits on one batch."""

    def __init__(self, teacher, batch, k):
        keep = batch["labels"][:, 1:] != IGNORE
        with torch.no_grad():
            logits = teacher(input_ids=batch["input_ids"]).logits[:, :-1][keep]
        self.logp, self.idx = torch.log_softmax(logits.float(), -1).topk(k, -1)

    def lookup(self, example_ids, device):
        return self.logp, self.idx


def test_a_model_whose_logits_are_not_its_head_takes_the_full_logits_path_with_the_same_distilled_loss(tokenizer):
    """Models with a logit cap or scale (Gemma-2, Cohere) are scored from their own logits: the distilled
    loss, online and from a cache, equals the chunked head path's."""
    batch = batch_of(tokenizer)
    batch["example_ids"] = torch.tensor([0, 1])
    teacher = make_tiny_llama(tokenizer, seed=1).eval()
    for d in (Distill(teacher, weight=0.4, temperature=2.0, kind="jsd"),
              Distill(None, weight=0.4, temperature=2.0, top_k=7, cache=TopKCache(teacher, batch, 7))):
        chunked = token_loss(make_tiny_llama(tokenizer, seed=0), batch, chunk_size=4, distill=d)
        student = make_tiny_llama(tokenizer, seed=0)
        student._sftkit_head_is_logits = False  # as head_is_logits finds for a capped model
        full = token_loss(student, batch, distill=d)
        assert float(full.loss) == pytest.approx(float(chunked.loss), rel=1e-5)
        assert full.tokens == chunked.tokens and full.correct == chunked.correct
        assert torch.allclose(full.parts, chunked.parts, rtol=1e-5)  # the terms logged apart, too


def _cache_cfg(tmp_path):
    return load_config(None, {"train.distill.teacher": str(tmp_path / "teacher"), "train.distill.top_k": 4,
                              "data.train": str(tmp_path / "t.jsonl")})


def test_distill_cache_overwrite_deletes_only_a_cache(tmp_path):
    """--overwrite replaces a cache this command wrote, never a folder of something else, and never a
    `.partial` sibling it did not write (refused before any model loads)."""
    from sftkit.distill import CACHE_FILE, PARTIAL_MARKER, build

    out = tmp_path / "cache"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"holds precious.txt, which is not a teacher cache.*nothing was deleted"):
        build(_cache_cfg(tmp_path), out, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="exists and is not empty; choose another --out or pass --overwrite"):
        build(_cache_cfg(tmp_path), out, overwrite=False)

    partial = tmp_path / "fresh.partial"
    partial.mkdir()
    (partial / "notes.md").write_text("mine")
    with pytest.raises(ConfigError, match=r"fresh.partial.*is not an interrupted cache of this command's \(notes.md\)"):
        build(_cache_cfg(tmp_path), tmp_path / "fresh", overwrite=True)
    assert (partial / "notes.md").read_text() == "mine"

    # What it may replace: a cache of its own, and an interrupted one (the marker): the refusal is gone
    # and the next check (the teacher itself) is what stops this run.
    (out / "precious.txt").unlink()
    (out / CACHE_FILE).write_text("{}")
    (partial / PARTIAL_MARKER).write_text("")
    for target in (out, tmp_path / "fresh"):
        with pytest.raises(Exception) as e:
            build(_cache_cfg(tmp_path), target, overwrite=True)
        assert "nothing was deleted" not in str(e.value)
