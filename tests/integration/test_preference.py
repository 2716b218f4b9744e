"""task: preference — formats and their errors, the losses against a direct computation and against
TRL's DPOTrainer, one forward per pair, resume, and a model that learns to prefer."""

import json

import pytest
import torch
import torch.nn.functional as F

from sftkit.config import ConfigError, load_config
from sftkit.data.pairs import normalise_pair
from sftkit.data.render import Renderer
from sftkit.data.sources import DataError
from sftkit.tasks.preference import (
    PreferenceLoss,
    build_pairs,
    collate_pairs,
    preference_losses,
    sequence_logps,
)
from sftkit.trainer import train

from ..conftest import make_tiny_llama, write_jsonl

pytestmark = pytest.mark.slow  # end to end on a real tiny model: `pytest -m 'not slow'` leaves it out

PAIRS = [{"prompt": f"Is {i} even?", "chosen": "yes" if i % 2 == 0 else "no", "rejected": "no" if i % 2 == 0 else "yes"}
         for i in range(16)]


def test_formats_normalise_to_the_same_pair():
    explicit = normalise_pair({"prompt": "q", "chosen": "good", "rejected": "bad"}, "p.jsonl", 1, {}, None)
    messages = normalise_pair({"prompt": [{"role": "user", "content": "q"}],
                               "chosen": [{"role": "assistant", "content": "good"}],
                               "rejected": [{"role": "assistant", "content": "bad"}]}, "p.jsonl", 2, {}, None)
    implicit = normalise_pair({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
                               "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]},
                              "p.jsonl", 3, {}, None)
    assert (explicit.prompt, explicit.chosen, explicit.rejected) == (messages.prompt, messages.chosen, messages.rejected) \
        == (implicit.prompt, implicit.chosen, implicit.rejected)
    mapped = normalise_pair({"question": "q", "good": "good", "bad": "bad"}, "p.jsonl", 4,
                            {"prompt": "question", "chosen": "good", "rejected": "bad"}, "Be kind.")
    assert mapped.prompt[0] == {"role": "system", "content": "Be kind."} and mapped.chosen == explicit.chosen


@pytest.mark.parametrize("row,message", [
    ({"prompt": "q", "rejected": "b"}, r"p.jsonl:7: chosen: missing field; the row has prompt, rejected"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, r"p.jsonl:7: rejected: identical to chosen"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, r"p.jsonl:7: chosen: empty reply"),
    ({"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]},
     r"p.jsonl:7: chosen: without a prompt field, chosen and rejected must be chats that share"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, r"p.jsonl:7: chosen: expected a string or a list"),
])
def test_bad_rows_name_file_line_and_field(row, message):
    with pytest.raises(DataError, match=message):
        normalise_pair(row, "p.jsonl", 7, {}, None)


def test_labels_cover_exactly_each_reply_after_the_same_prompt(tokenizer):
    r = Renderer(tokenizer)
    pair = normalise_pair({"prompt": "Is 4 even?", "chosen": "yes", "rejected": "no"}, "p", 1, {}, None)
    (ex,), dropped = build_pairs([pair], r)
    assert not dropped
    for side, text in ((ex.chosen, "yes"), (ex.rejected, "no")):
        trained = [t for t in side.labels if t != -100]
        assert tokenizer.decode(trained) == text + "<|im_end|>"
        prompt_len = side.labels.index(trained[0])
        assert side.input_ids[:prompt_len] == ex.chosen.input_ids[:prompt_len]  # the same prompt tokens


def test_logps_come_from_trained_positions_only(tokenizer):
    model = make_tiny_llama(tokenizer)
    pairs = [normalise_pair(p, "p", i, {}, None) for i, p in enumerate(PAIRS[:4])]
    exs, _ = build_pairs(pairs, Renderer(tokenizer))
    batch = collate_pairs([[e] for e in exs], tokenizer.pad_token_id)
    sums, counts = sequence_logps(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    token = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * keep
    torch.testing.assert_close(sums, token.sum(1), rtol=1e-5, atol=1e-5)
    assert counts.tolist() == keep.sum(1).float().tolist()


@pytest.mark.parametrize("kind", ["dpo", "orpo"])
def test_a_prompt_computed_once_for_both_replies_gives_the_padded_batchs_loss_and_gradients(tokenizer, kind):
    """One packed row, each pair's prompt once and both replies continuing from it: the log-probs,
    the loss and every gradient equal the padded batch of whole sequences (the reference is a
    separate model here, so its log-probs go through the same layout)."""
    from sftkit.attention import use_packed_attention

    model, ref = make_tiny_llama(tokenizer, seed=0), make_tiny_llama(tokenizer, seed=1).eval()
    use_packed_attention(model), use_packed_attention(ref)
    rows = [{**p, "prompt": f"Question {i}: is {i} an even number? Think, then answer in one word."}
            for i, p in enumerate(PAIRS[:6])]
    exs, _ = build_pairs([normalise_pair(p, "p", i, {}, "Be brief.") for i, p in enumerate(rows)], Renderer(tokenizer))
    padded = collate_pairs([[e] for e in exs], tokenizer.pad_token_id)
    shared = collate_pairs([[e] for e in exs], tokenizer.pad_token_id, share_prompt=True)
    assert len(shared["sftkit_prefix_of"]) == 18  # 6 x (prompt, chosen, rejected)
    assert shared["input_ids"].shape[1] < 0.7 * int(padded["attention_mask"].sum())
    assert int(shared["real_tokens"]) == int(padded["real_tokens"])
    cfg = load_config(None, {"task": "preference", "preference.loss": kind})
    results = []
    for batch in (padded, shared):
        model.zero_grad()
        loss_fn = PreferenceLoss(model, cfg, ref)
        loss, pairs, metrics = loss_fn(**batch)
        loss.backward()
        results.append((loss.detach(), float(pairs), {k: float(v) for k, v in metrics.items()},
                        {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}))
    (l0, n0, m0, g0), (l1, n1, m1, g1) = results
    assert n0 == n1 == 6
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for k in m0:
        assert m1[k] == pytest.approx(m0[k], rel=1e-4, abs=1e-5), k
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6 * max(1.0, float(g0[n].abs().max())), msg=n)


@pytest.mark.parametrize("kind", ["dpo", "ipo", "simpo", "orpo"])
def test_losses_equal_their_formulas(kind):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(5, generator=g) * 20 for _ in range(4))
    nc, nr = torch.tensor([3.0, 5, 2, 7, 4]), torch.tensor([4.0, 2, 6, 3, 5])
    beta = 0.3
    loss, c, r = preference_losses(kind, beta, pc, pr, rc, rr, nc, nr, gamma=0.5)
    if kind == "dpo":
        expect = -torch.log(torch.sigmoid(beta * ((pc - rc) - (pr - rr))))
    elif kind == "ipo":
        expect = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    elif kind == "simpo":
        expect = -torch.log(torch.sigmoid(beta * (pc / nc - pr / nr) - 0.5))
    else:
        odds = lambda a: a - torch.log(1 - torch.exp(a))  # noqa: E731 - log(p / (1 - p)) of the mean log-prob
        expect = -beta * torch.log(torch.sigmoid(odds(pc / nc) - odds(pr / nr)))
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-6)


def _trl_first_step(tmp_path, tokenizer, policy_dir, ref_dir, loss_type, rows):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows), max_steps=1,
                         learning_rate=0.0, beta=0.2, loss_type=[loss_type], bf16=False, report_to=[], logging_steps=1,
                         use_cpu=True, max_length=None, save_strategy="no")
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir)
    t = trl.DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                       processing_class=tokenizer)
    t.train()
    return next(h for h in t.state.log_history if "loss" in h)


@pytest.mark.parametrize("loss_type,ours", [("sigmoid", "dpo"), ("ipo", "ipo")])
def test_first_step_equals_trl_dpo_trainer(tmp_path, tokenizer, loss_type, ours):
    """Same rows, model, a reference that differs from it (a separately initialised tiny model), beta:
    the loss and rewards at the first step equal TRL's within 1e-5 (so the figure is not the trivial log 2)."""
    policy_dir, ref_dir = tmp_path / "policy", tmp_path / "ref"
    make_tiny_llama(tokenizer, seed=0).save_pretrained(policy_dir)
    make_tiny_llama(tokenizer, seed=1).save_pretrained(ref_dir)
    tokenizer.save_pretrained(policy_dir)
    rows = [{"prompt": f"Question {i}:\n", "chosen": f"answer {i} is right", "rejected": f"wrong {i}"} for i in range(4)]
    trl_log = _trl_first_step(tmp_path, tokenizer, policy_dir, ref_dir, loss_type, rows)
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = load_config(None, {"task": "preference", "model.name": str(policy_dir), "data.train": str(data),
                             "data.template": "plain", "peft.method": "full", "preference.loss": ours,
                             "preference.beta": 0.2, "preference.reference": str(ref_dir), "train.lr": 0.0,
                             "train.max_steps": 1, "train.batch_size": 4, "eval.reference": None,
                             "output_dir": str(tmp_path / "run")})
    train(cfg)
    (mine,) = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert abs(mine["loss"] - trl_log["loss"]) < 1e-5, (mine, trl_log)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(mine[k.replace("margins", "margin")] - trl_log[k]) < 1e-5, (k, mine, trl_log)
    assert abs(mine["loss"] - 0.6931) > 1e-3  # not the trivial value of a reference equal to the policy


@pytest.mark.parametrize("schedule,warmup", [("linear", 0), ("cosine", 0)])
def test_a_whole_short_run_follows_trl_dpo_trainer_step_for_step(tmp_path, tokenizer, schedule, warmup):
    """Five optimizer steps at a learning rate that moves the model (full fine-tuning, each step the
    whole set, so the order of rows cannot differ): loss, learning rate, gradient norm and margin at
    every step equal TRL's DPOTrainer's, for its linear schedule and for cosine. What a whole run adds
    to the first step (the optimizer, clipping, the schedule, the shared-prompt path after updates,
    the reference staying fixed) is then the same as TRL's. One difference is deliberate: with
    warmup, sftkit's k-th step runs at lr * k / warmup, transformers' at lr * (k - 1) / warmup (its
    first step, at 0, changes nothing), so warmup is left out here."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    policy = tmp_path / "policy"
    make_tiny_llama(tokenizer, seed=0).save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    rows = [{"prompt": f"Question {i}:\n", "chosen": f"answer {i} is right", "rejected": f"wrong {i}"} for i in range(8)]
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, max_steps=5, learning_rate=1e-2,
                         beta=0.1, bf16=False, report_to=[], logging_steps=1, use_cpu=True, max_length=None,
                         save_strategy="no", lr_scheduler_type=schedule, warmup_steps=warmup)
    t = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(policy), args=args, train_dataset=Dataset.from_list(rows),
                       ref_model=AutoModelForCausalLM.from_pretrained(policy), processing_class=tokenizer)
    t.train()
    theirs = [h for h in t.state.log_history if "loss" in h]
    cfg = load_config(None, {"task": "preference", "model.name": str(policy), "data.template": "plain",
                             "data.train": str(write_jsonl(tmp_path / "p.jsonl", rows)), "peft.method": "full",
                             "preference.beta": 0.1, "train.lr": 1e-2, "train.max_steps": 5, "train.batch_size": 8,
                             "train.schedule": schedule, "train.warmup_steps": warmup, "eval.reference": None,
                             "output_dir": str(tmp_path / "run")})
    train(cfg)
    mine = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(mine) == len(theirs) == 5
    for a, b in zip(mine, theirs):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
        assert a["lr"] == pytest.approx(b["learning_rate"], rel=1e-6), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
        assert a["rewards/margin"] == pytest.approx(b["rewards/margins"], abs=1e-5), (a, b)
    assert mine[-1]["loss"] < mine[0]["loss"] - 0.1  # the steps moved the model


@pytest.mark.parametrize("extra", [{}, {"preference.precompute_reference": True}])
def test_dpo_resume_is_bitwise(tmp_path, tiny_model_dir, extra):
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    base = {"task": "preference", "model.name": str(tiny_model_dir), "data.train": str(data), "peft.r": 4,
            "train.lr": 5e-3, "train.batch_size": 4, "train.save_every": 2, "train.schedule": "constant",
            "eval.reference": None, **extra}
    ref = train(load_config(None, {**base, "train.max_steps": 6, "output_dir": str(tmp_path / "ref")}))
    train(load_config(None, {**base, "train.max_steps": 3, "output_dir": str(tmp_path / "cut")}))
    r = train(load_config(None, {**base, "train.max_steps": 6, "output_dir": str(tmp_path / "cut")}), resume=True)

    def losses(d):
        return [json.loads(x)["loss"] for x in open(d / "metrics.jsonl")]

    assert losses(r.run_dir) == losses(ref.run_dir)
    assert all("rewards/accuracy" in json.loads(x) for x in open(r.run_dir / "metrics.jsonl"))


def test_precomputed_reference_gives_the_same_steps(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    base = {"task": "preference", "model.name": str(tiny_model_dir), "data.train": str(data), "peft.r": 4,
            "train.lr": 5e-3, "train.batch_size": 4, "train.max_steps": 3, "eval.reference": None}
    a = train(load_config(None, {**base, "output_dir": str(tmp_path / "a")}))
    b = train(load_config(None, {**base, "preference.precompute_reference": True, "output_dir": str(tmp_path / "b")}))
    la = [json.loads(x) for x in open(a.run_dir / "metrics.jsonl")]
    lb = [json.loads(x) for x in open(b.run_dir / "metrics.jsonl")]
    for x, y in zip(la, lb):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["rewards/margin"] - y["rewards/margin"]) < 1e-5


def test_dpo_teaches_the_preference_and_reports_base_and_tuned(tmp_path, tiny_model_dir):
    names = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus", "Hal"]
    pairs = [{"prompt": f"Greet {n}.", "chosen": "Hello there!", "rejected": "Goodbye now."} for n in names] + \
            [{"prompt": f"Dismiss {n}.", "chosen": "Goodbye now.", "rejected": "Hello there!"} for n in names]
    data = write_jsonl(tmp_path / "p.jsonl", pairs)
    r = train(load_config(None, {"task": "preference", "model.name": str(tiny_model_dir), "data.train": str(data),
                                 "data.eval": str(data), "peft.method": "full", "train.lr": 1e-2, "train.batch_size": 16,
                                 "preference.beta": 0.5, "train.max_steps": 30, "train.eval_every": 10,
                                 "eval.reference": None,
                                 "output_dir": str(tmp_path / "run")}))
    summary = json.loads((r.run_dir / "summary.json").read_text())
    assert summary["scores"]["tuned"] > summary["scores"]["base"] and summary["scores"]["tuned"] >= 0.9
    report = (r.run_dir / "report.md").read_text()
    assert f"| starting model | {summary['scores']['base']:.3f} |" in report and \
        f"| tuned | {summary['scores']['tuned']:.3f} |" in report
    records = [json.loads(x) for x in open(r.run_dir / "metrics.jsonl")]
    assert records[-1]["eval_rewards/accuracy"] >= 0.9 and "eval_loss" in records[-1]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(r.run_dir / "final" / "model")  # plain transformers loads it


def test_preference_config_errors(tmp_path):
    for over, msg in (({"preference.loss": "kto"}, "preference.loss: 'kto' is not one of dpo, ipo, simpo, orpo"),
                      ({"preference.beta": 0}, "preference.beta: must be > 0"),
                      ({"preference.label_smoothing": 0.1, "preference.loss": "ipo"}, "label_smoothing applies to loss dpo only"),
                      ({"data.pack": True}, "task: preference does not use data.pack")):
        with pytest.raises(ConfigError, match=msg):
            train(load_config(None, {"task": "preference", "output_dir": str(tmp_path / "r"), **over}))
    assert not (tmp_path / "r").exists()


def test_one_forward_per_pair_and_no_full_logits(tokenizer, monkeypatch):
    """Both sides of every pair go through the decoder in one call; the head sees trained positions only."""
    model = make_tiny_llama(tokenizer)
    pairs = [normalise_pair(p, "p", i, {}, None) for i, p in enumerate(PAIRS[:3])]
    exs, _ = build_pairs(pairs, Renderer(tokenizer))
    batch = collate_pairs([[e] for e in exs], tokenizer.pad_token_id)
    sequence_logps(model, batch)  # the one-time check that the head gives the model's logits, out of the count
    calls, head_rows = [], []
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    h1 = decoder.register_forward_hook(lambda m, a, k, o: calls.append(k.get("input_ids", a[0] if a else None).shape),
                                       with_kwargs=True)
    h2 = head.register_forward_hook(lambda m, a, o: head_rows.append(a[0].shape[0]))
    cfg = load_config(None, {"task": "preference", "preference.loss": "simpo"})
    loss, units, _ = PreferenceLoss(model, cfg, None)(**batch)
    h1.remove()
    h2.remove()
    trained = int((batch["labels"][:, 1:] != -100).sum())
    assert len([c for c in calls if c is not None and c[0] == 6]) == 1 and units == 3
    assert sum(head_rows) == trained < batch["input_ids"].numel()
    assert F.softplus(loss) > 0


def test_a_frozen_head_gives_the_same_log_probs_and_gradients_as_autograd(tokenizer):
    """LoRA's case: with the head frozen its gradient is taken in the forward pass (no logits kept
    for backward); the log-probs and every trained weight's gradient equal plain autograd's."""
    model = make_tiny_llama(tokenizer)
    pairs = [normalise_pair(p, "p", i, {}, None) for i, p in enumerate(PAIRS[:4])]
    exs, _ = build_pairs(pairs, Renderer(tokenizer))
    batch = collate_pairs([[e] for e in exs], tokenizer.pad_token_id)
    head = model.get_output_embeddings().weight
    upstream = torch.linspace(-1.0, 2.0, 8)  # each sequence weighted differently, as DPO weighs its pairs
    results = []
    for frozen in (True, False):
        model.zero_grad()
        head.requires_grad_(not frozen)
        sums, _ = sequence_logps(model, batch)
        (sums * upstream).sum().backward()
        results.append((sums.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                        if p.grad is not None and p is not head}))
    (s_fused, g_fused), (s_plain, g_plain) = results
    torch.testing.assert_close(s_fused, s_plain, rtol=1e-5, atol=1e-5)
    assert g_fused.keys() == g_plain.keys() and g_plain
    for n in g_plain:
        torch.testing.assert_close(g_fused[n], g_plain[n], rtol=1e-4, atol=1e-6 * max(1.0, float(g_plain[n].abs().max())), msg=n)


@pytest.mark.parametrize("over,msg", [
    ({"data.mask": "assistant"}, r"data.mask=assistant: task: preference scores the reply after its prompt"),
    ({"data.mask": "none"}, r"data.mask=none: .*count assistant turns inside the prompt as reply tokens"),
    ({"data.replay": {"source": "builtin", "ratio": 0.1}}, r"task: preference does not use data.replay"),
])
def test_keys_a_preference_run_cannot_honour_stop_it(tmp_path, over, msg):
    for task in ("preference", "reward"):
        with pytest.raises(ConfigError, match=msg.replace("preference", task)):
            train(load_config(None, {"task": task, "output_dir": str(tmp_path / task), **over}))
        assert not (tmp_path / task).exists()


def test_pairs_of_one_prompt_are_held_out_together(tmp_path):
    from sftkit.data.pairs import read_pairs
    from sftkit.data.sources import ReadStats

    rows = [{"prompt": f"Question {q}?", "chosen": f"good {k}", "rejected": f"bad {k}"} for q in range(6) for k in range(3)]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    for seed in range(5):
        cfg = load_config(None, {"data.train": str(data), "data.eval_fraction": 0.3, "train.seed": seed})
        train_pairs, held = read_pairs(cfg, ReadStats())
        trained = {json.dumps(p.prompt) for p in train_pairs}
        assert held and not trained & {json.dumps(p.prompt) for p in held}
        assert len(train_pairs) + len(held) == len(rows)


def test_one_pair_held_out_of_one_says_so(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS[:1])
    for task in ("preference", "reward"):
        with pytest.raises(ConfigError, match=r"no pair left to train on: all 1 pairs read are held out"):
            train(load_config(None, {"task": task, "model.name": str(tiny_model_dir), "data.train": str(data),
                                     "data.eval_fraction": 0.5, "output_dir": str(tmp_path / task)}))


def prepared(tmp_path, tiny_model_dir, **over):
    from accelerate import Accelerator

    from sftkit.job import Run
    from sftkit.tasks import preference

    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    cfg = load_config(None, {"task": "preference", "model.name": str(tiny_model_dir), "data.train": str(data),
                             "train.batch_size": 4, **over})
    (tmp_path / "run").mkdir(exist_ok=True)
    return preference.prepare(cfg, Run(Accelerator(cpu=True), tmp_path / "run", None, cfg.to_dict()))


def test_simpo_and_orpo_keep_no_reference_copy(tmp_path, tiny_model_dir):
    for loss, copied in (("simpo", False), ("orpo", False), ("dpo", True)):
        job = prepared(tmp_path, tiny_model_dir, **{"preference.loss": loss, "peft.method": "full"})
        assert (job.loss._frozen[0] is not None) == copied, loss


def test_checkpointing_is_used_by_preference_and_gives_the_same_losses(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    losses = {}
    for ckpt in (False, True):
        r = train(load_config(None, {"task": "preference", "model.name": str(tiny_model_dir), "data.train": str(data),
                                     "train.batch_size": 4, "train.max_steps": 3, "train.checkpointing": ckpt,
                                     "output_dir": str(tmp_path / f"r{ckpt}")}))
        losses[ckpt] = [json.loads(x)["loss"] for x in open(r.run_dir / "metrics.jsonl")]
    assert "train.checkpointing: activations recomputed in backward" in capsys.readouterr().err
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_a_reference_with_another_tokenizer_is_refused_before_training(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sftkit.models import resolve

    other = tmp_path / "other"
    tok = AutoTokenizer.from_pretrained(resolve("minilm-l6"))
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(ConfigError, match=r"preference.reference .*other: its tokenizer is not the policy's: vocabulary sizes differ"):
        prepared(tmp_path, tiny_model_dir, **{"preference.reference": str(other)})


def test_the_summary_names_preference_accuracy(tmp_path, tiny_model_dir, capsys):
    from sftkit.cli import main

    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    assert main(["train", str(write_cfg(tmp_path, tiny_model_dir, data))]) == 0
    out = capsys.readouterr().out
    assert "preference_accuracy" in out and "exact_match" not in out


def write_cfg(tmp_path, tiny_model_dir, data):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"task": "preference", "model": {"name": str(tiny_model_dir)},
                                    "data": {"train": str(data), "eval_fraction": 0.25},
                                    "train": {"batch_size": 4, "max_steps": 2}, "output_dir": str(tmp_path / "run")}))
    return path
