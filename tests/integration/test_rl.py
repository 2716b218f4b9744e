"""task: rl end to end on a tiny model: the loss and gradients of whole steps equal TRL's GRPOTrainer's
on the same completions (fed in, not sampled), for each loss; resume after a kill is bitwise; bad
reward functions stop the run naming the function and the row."""

import json
import os
import signal
import subprocess
import sys
from collections import defaultdict

import pytest

from sftkit.config import load_config
from sftkit.trainer import train

from ..conftest import make_tiny_llama, write_jsonl

pytestmark = pytest.mark.slow  # end to end on a real tiny model: `pytest -m 'not slow'` leaves it out

PROMPTS = [{"prompt": "Say a number:", "answer": "7"}, {"prompt": "Name a colour:", "answer": "red"}]
# Four completions of each prompt (group-major), tokens chosen so the rewards differ within a group.
TEXTS = {"Say a number:": [" 7", " seven or so", " 12", " 7 7 7 7"],
         "Name a colour:": [" red", " a deep blue", " green", " red and more red"]}


def length_reward(prompts, completions, **kw):
    """A reward of TRL's signature: longer replies score less; answers get a bonus."""
    return [1.0 / (1 + len(c)) + (1.0 if a in c else 0.0) for c, a in zip(completions, kw["answer"])]


def fixed_completions(tokenizer):
    eos = tokenizer.eos_token_id
    return {p: [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in ts] for p, ts in TEXTS.items()}


def _feeder(table):
    """Hands out the k-th completion of a prompt to its k-th occurrence in a generation batch."""
    seen = defaultdict(int)

    def take(key):
        k = seen[key] % 4
        seen[key] += 1
        return table[key][k]
    return take


@pytest.fixture
def policy_dir(tokenizer, tmp_path):
    d = tmp_path / "policy"
    make_tiny_llama(tokenizer, seed=0).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


TRL_EXTRA = {}


def trl_run(tmp_path, tokenizer, policy_dir, loss_type, beta, num_iterations, steps):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    table = fixed_completions(tokenizer)
    take = _feeder(table)

    def rollout(prompts, trainer):
        ids = [take(p) for p in prompts]
        return {"prompt_ids": [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts],
                "completion_ids": ids, "logprobs": None}

    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, num_generations=4,
                          max_steps=steps, learning_rate=1e-2, beta=beta, loss_type=loss_type, num_iterations=num_iterations,
                          max_completion_length=8, bf16=False, use_cpu=True, report_to=[], logging_steps=1,
                          save_strategy="no", temperature=1.0, lr_scheduler_type="linear", seed=0, **TRL_EXTRA)
    t = trl.GRPOTrainer(model=str(policy_dir), reward_funcs=[length_reward], args=args,
                        train_dataset=Dataset.from_list(PROMPTS), processing_class=tokenizer, rollout_func=rollout)
    t.train()
    return [h for h in t.state.log_history if "loss" in h]


def sftkit_run(tmp_path, tokenizer, policy_dir, monkeypatch, loss, beta, num_iterations, steps, **over):
    from sftkit.tasks import rl

    table = fixed_completions(tokenizer)
    take = _feeder(table)
    monkeypatch.setattr(rl, "generate_ids", lambda model, renderer, prompts, *a, **k: [take(p[-1]["content"]) for p in prompts])
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    cfg = load_config(None, {"task": "rl", "model.name": str(policy_dir), "data.train": str(data), "data.template": "plain",
                             "data.eval_fraction": 0, "peft.method": "full", "rl.loss": loss, "rl.beta": beta,
                             "rl.num_iterations": num_iterations, "rl.num_generations": 4, "rl.max_new_tokens": 8,
                             "rl.rewards": [{"function": "tests.integration.test_rl:length_reward"}],
                             "train.lr": 1e-2, "train.batch_size": 2, "train.max_steps": steps, "train.schedule": "linear",
                             "eval.reference": None, "output_dir": str(tmp_path / f"run-{loss}"), **over})
    train(cfg)
    return [json.loads(x) for x in open(tmp_path / f"run-{loss}" / "metrics.jsonl") if '"loss"' in x]


@pytest.mark.parametrize("loss,beta,iterations", [("grpo", 0.0, 1), ("grpo", 0.1, 2), ("dr_grpo", 0.1, 2),
                                                  ("dapo", 0.0, 2), ("dapo", 0.1, 1)])
def test_steps_equal_trl_grpo_trainer_on_the_same_completions(tmp_path, tokenizer, policy_dir, monkeypatch,
                                                               loss, beta, iterations):
    """Two optimizer steps: with num_iterations 2 the second reuses the first's completions after an
    update, so the ratio is not 1 and the KL to the (starting) reference is not 0."""
    theirs = trl_run(tmp_path, tokenizer, policy_dir, loss, beta, iterations, steps=2)
    mine = sftkit_run(tmp_path, tokenizer, policy_dir, monkeypatch, loss, beta, iterations, steps=2)
    assert len(mine) == len(theirs) == 2
    for a, b in zip(mine, theirs):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4, abs=1e-6), (a, b)
        if "reward" in b:  # TRL logs rewards on the steps that generated
            assert a["reward"] == pytest.approx(b["reward"], abs=1e-5), (a, b)
            assert a["reward_std"] == pytest.approx(b["reward_std"], abs=1e-5), (a, b)
        if beta and loss == "dapo":  # aggregated per token, as TRL logs it
            assert a["kl"] == pytest.approx(b["kl"], abs=1e-5), (a, b)
        if loss == "dapo":
            assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-5), (a, b)
    if iterations == 2:  # the second step saw a moved policy: the ratio is not 1 there
        assert mine[1]["loss"] != pytest.approx(mine[0]["loss"], abs=1e-6)
    assert mine[0]["grad_norm"] > 1e-3  # the loss is ~0 at ratio 1 (advantages sum to 0), its gradient is not


def test_a_reward_function_that_fails_stops_the_run_naming_it_and_the_row(tmp_path, tokenizer, policy_dir, monkeypatch,
                                                                          capsys):
    from sftkit.cli import main
    from sftkit.tasks import rl

    table = fixed_completions(tokenizer)
    take = _feeder(table)
    monkeypatch.setattr(rl, "generate_ids", lambda model, renderer, prompts, *a, **k: [take(p[-1]["content"]) for p in prompts])
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Say a number:"}, {"prompt": "Name a colour:"}])
    (tmp_path / "c.yaml").write_text(json.dumps({"task": "rl", "model": {"name": str(policy_dir)},
                                                 "data": {"train": str(data), "template": "plain", "eval_fraction": 0},
                                                 "peft": {"method": "full"}, "rl": {"num_generations": 4, "max_new_tokens": 8,
                                                 "rewards": [{"function": "exact_match"}]},
                                                 "train": {"batch_size": 2, "max_steps": 1}, "eval": {"reference": None},
                                                 "output_dir": str(tmp_path / "run")}))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    assert "reward exact_match: the prompt rows have no column 'answer'" in capsys.readouterr().err


def slow_number_match(prompts, completions, **columns):
    """number_match that takes its time, so a kill lands inside a run of the tiny model."""
    import time

    from sftkit.rewards import number_match

    time.sleep(0.4)
    return number_match(prompts, completions, **columns)


RESUME_SCRIPT = r"""
import json, sys
from sftkit.config import load_config
from sftkit.trainer import train
cfg = load_config(None, json.loads(sys.argv[1]))
train(cfg, resume=len(sys.argv) > 2)
"""


def test_an_rl_run_killed_after_a_checkpoint_resumes_bitwise(tmp_path, tokenizer, policy_dir):
    """Sampled for real (the tiny model's own generation), kill -9 after the step-2 checkpoint, resume:
    the same losses and rewards, step for step, as the run that was not interrupted."""
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Count to {i}:", "answer": str(i)} for i in range(6)])
    base = {"task": "rl", "model.name": str(policy_dir), "data.train": str(data), "data.eval_fraction": 0, "peft.r": 4,
            "rl.num_generations": 3, "rl.max_new_tokens": 6, "rl.num_iterations": 2, "rl.beta": 0.05,
            "rl.rewards": [{"function": "length", "target": 3, "unit": "tokens"},
                           {"function": "tests.integration.test_rl:slow_number_match"}],
            "train.lr": 5e-3, "train.batch_size": 2, "train.max_steps": 5, "train.save_every": 1, "eval.reference": None}
    whole = {**base, "output_dir": str(tmp_path / "whole")}
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, json.dumps(whole)], check=True, capture_output=True, timeout=600)
    cut = {**base, "output_dir": str(tmp_path / "cut")}
    p = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, json.dumps(cut)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    import time

    deadline = time.time() + 300
    while time.time() < deadline and not any((tmp_path / "cut" / "checkpoints").glob("step-0000003*")):
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) < 5  # killed before the end
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, json.dumps(cut), "resume"], check=True, capture_output=True,
                   timeout=600)

    def curve(d):
        return [(r["step"], r["loss"], r["reward"]) for r in map(json.loads, open(d / "metrics.jsonl")) if "loss" in r]

    assert curve(tmp_path / "cut") == curve(tmp_path / "whole")
    assert len(curve(tmp_path / "whole")) == 5


@pytest.mark.parametrize("beta,iterations", [(0.0, 1), (0.05, 2)])
def test_rloo_steps_equal_trl_rloo_trainer_on_the_same_completions(tmp_path, tokenizer, policy_dir, monkeypatch,
                                                                   beta, iterations):
    """RLOO: the leave-one-out baseline, a sequence-level ratio, and the KL (first order, summed) as a
    penalty on the reward, as TRL's RLOOTrainer; its generation is replaced by the same completions."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    table = fixed_completions(tokenizer)
    take = _feeder(table)
    by_ids = {tuple(tokenizer(p, add_special_tokens=False)["input_ids"]): p for p in TEXTS}
    monkeypatch.setattr(trl.RLOOTrainer, "_generate_single_turn",
                        lambda self, prompt_ids, images, fields: [take(by_ids[tuple(p)]) for p in prompt_ids])
    args = trl.RLOOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, num_generations=4, max_steps=2,
                          learning_rate=1e-2, beta=beta, num_iterations=iterations, max_completion_length=8, bf16=False,
                          use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", lr_scheduler_type="linear",
                          seed=0)
    t = trl.RLOOTrainer(model=str(policy_dir), reward_funcs=[length_reward], args=args,
                        train_dataset=Dataset.from_list(PROMPTS), processing_class=tokenizer)
    t.train()
    theirs = [h for h in t.state.log_history if "loss" in h]
    mine = sftkit_run(tmp_path, tokenizer, policy_dir, monkeypatch, "rloo", beta, iterations, steps=2)
    assert len(mine) == len(theirs) == 2
    for a, b in zip(mine, theirs):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4, abs=1e-6), (a, b)


def test_a_reward_model_scores_the_completions_as_sftkit_score_does(tmp_path, tokenizer, policy_dir, monkeypatch):
    """{model: DIR}: each completion scored by a reward model (a one-output classifier) after its
    prompt, as `sftkit score` scores a row; the step's reward is their mean."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from sftkit.tasks.reward import Scorer

    rm_dir = tmp_path / "rm"
    torch.manual_seed(3)
    rm = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)
    mine = sftkit_run(tmp_path, tokenizer, policy_dir, monkeypatch, "grpo", 0.0, 1, steps=1,
                      **{"rl.rewards": [{"model": str(rm_dir)}], "data.template": "auto"})
    texts = [tokenizer.decode(c, skip_special_tokens=True) for cs in fixed_completions(tokenizer).values() for c in cs]
    prompts = [p for p in TEXTS for _ in range(4)]
    want = Scorer(str(rm_dir)).score([([{"role": "user", "content": p}], [{"role": "assistant", "content": t}])
                                      for p, t in zip(prompts, texts)])
    assert mine[0]["rewards/model:rm/mean"] == pytest.approx(sum(want) / len(want), abs=1e-5)
    assert mine[0]["reward"] == pytest.approx(sum(want) / len(want), abs=1e-5)


def test_two_processes_give_the_curve_of_one_with_the_same_global_batch(tmp_path, tokenizer, policy_dir):
    """--nproc 2 with 2 prompts each against one process with 4: each completion is sampled from a seed
    of its own place in the step's global batch, so the two processes generate between them what the
    one did; the rewards, losses and units are those of one process, and rank 0 alone writes."""
    import yaml

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Count to {i}:", "answer": str(i)} for i in range(8)])

    def run(name, nproc, batch):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({
            "task": "rl", "model": {"name": str(policy_dir)}, "data": {"train": str(data), "eval_fraction": 0},
            "peft": {"r": 4}, "rl": {"num_generations": 3, "max_new_tokens": 6, "scale_rewards": "batch",
                                     "temperature": 1.5, "top_p": 0.9,
                                     "rewards": [{"function": "tests.integration.test_rl:length_reward"}]},
            "train": {"batch_size": batch, "max_steps": 3, "lr": 5e-2}, "eval": {"reference": None},
            "output_dir": str(tmp_path / name)}))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-m", "sftkit", "train", str(cfg), "--nproc", str(nproc)],
                             capture_output=True, text=True, timeout=600, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        return [json.loads(x) for x in open(tmp_path / name / "metrics.jsonl")]

    two, one = run("two", 2, 2), run("one", 1, 4)
    assert [r["step"] for r in two] == [1, 2, 3]
    assert all(r["units"] == 12 for r in two)  # 2 processes x 2 prompts x 3 completions
    assert all(r["generated_tokens"] == pytest.approx(r["completion_length"] * 12) for r in two)
    for a, b in zip(two, one):
        for k in ("generated_tokens", "completion_length/min", "completion_length/max", "truncated", "units"):
            assert a[k] == b[k], (k, a, b)
        for k in ("reward", "reward_std", "loss", "grad_norm", "entropy"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (k, a, b)
    assert len({r["reward"] for r in one}) == 3  # each step sampled other completions


def test_prompts_longer_than_the_room_left_are_dropped_and_counted_or_stop_the_run(tmp_path, tokenizer, policy_dir,
                                                                                   monkeypatch, capsys):
    from sftkit.data.sources import DataError
    from sftkit.tasks import rl

    take = _feeder(fixed_completions(tokenizer))
    monkeypatch.setattr(rl, "generate_ids", lambda model, renderer, prompts, *a, **k: [take(p[-1]["content"]) for p in prompts])
    rows = PROMPTS + [{"prompt": "word " * 60, "answer": "x"}]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    base = {"task": "rl", "model.name": str(policy_dir), "data.train": str(data), "data.template": "plain",
            "data.eval_fraction": 0, "data.max_length": 40, "peft.method": "full", "rl.num_generations": 4,
            "rl.max_new_tokens": 8, "rl.rewards": [{"function": "tests.integration.test_rl:length_reward"}],
            "train.batch_size": 2, "train.max_steps": 1, "eval.reference": None}
    train(load_config(None, {**base, "output_dir": str(tmp_path / "a")}))
    assert "dropped 1 training prompts longer than data.max_length - rl.max_new_tokens = 32 tokens" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"long\.jsonl:3: the prompt is \d+ tokens; with rl.max_new_tokens=8 it does not fit"):
        train(load_config(None, {**base, "data.truncation": "error", "output_dir": str(tmp_path / "b")}))


def test_compare_on_an_rl_run_scores_base_and_tuned_with_the_runs_rewards(tmp_path, tokenizer, policy_dir):
    """`sftkit compare BASE RL_RUN --data prompts`: greedy replies of both models scored by the run's
    rewards, the same figures as the run's own held-out evals of the starting and the final model;
    report.md of the run (before compare rewrites it) holds them too."""
    rows = [{"prompt": f"Count to {i}:", "answer": str(i)} for i in range(10)]
    data, held = write_jsonl(tmp_path / "p.jsonl", rows[:6]), write_jsonl(tmp_path / "e.jsonl", rows[6:])
    run = tmp_path / "run"
    train(load_config(None, {"task": "rl", "model.name": str(policy_dir), "data.train": str(data), "data.eval": str(held),
                             "peft.r": 4, "rl.num_generations": 3, "rl.max_new_tokens": 6, "rl.pass_at": 0.2,
                             "rl.rewards": [{"function": "tests.integration.test_rl:length_reward"},
                                            {"function": "length", "target": 2, "unit": "tokens", "weight": 0.5}],
                             "train.lr": 5e-2, "train.batch_size": 2, "train.max_steps": 2, "eval.reference": None,
                             "output_dir": str(run)}))
    summary = json.loads((run / "summary.json").read_text())
    base, tuned = summary["rewards"]["base"], summary["rewards"]["tuned"]
    report = (run / "report.md").read_text()
    assert f"| starting model | {base['eval_reward']:.3f} | {base['eval_pass_rate']:.3f} |" in report
    assert f"| tuned | {tuned['eval_reward']:.3f} | {tuned['eval_pass_rate']:.3f} |" in report
    out = subprocess.run([sys.executable, "-m", "sftkit", "compare", str(policy_dir), str(run), "--data", str(held)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for name, want in (("base", base), ("tuned", tuned)):
        got = json.loads((run / "compare" / name / "eval.json").read_text())["metrics"]
        assert got["reward"] == pytest.approx(want["eval_reward"], abs=1e-6), (name, got, want)
        assert got["pass_rate"] == pytest.approx(want["eval_pass_rate"], abs=1e-6)
        assert set(got) >= {"rewards/length_reward", "rewards/length"}
        preds = [json.loads(x) for x in open(run / "compare" / name / "predictions.jsonl")]
        assert [p["source"] for p in preds] == [f"{held}:{i}" for i in range(1, 5)]
    assert "pass_rate" in out.stdout and "reward" in out.stdout
    assert (run / "compare.png").is_file() and "pass_rate" in (run / "report.md").read_text()
