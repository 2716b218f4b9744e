"""The loop machinery (sftkit.engine) on a fake Job: a three-weight model, a batcher of fixed tensors and
a scripted eval. No language model, no tokenizer: milliseconds a test. What a real task adds is tested
end to end in tests/integration (marked slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from sftkit import checkpoint
from sftkit.config import load_config
from sftkit.engine import Engine
from sftkit.job import Job, Run, RunResult, TrainingError


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.5, -0.25, 1.0]))


class SquaredError(torch.nn.Module):
    """(sum of weighted squared errors, the rows' total weight, metric sums): a task's loss contract."""

    def __init__(self, model: Linear):
        super().__init__()
        self.model = model

    def forward(self, x, y, weight):
        err = x @ self.model.w - y
        return (weight * err**2).sum(), weight.sum(), {"abs_error": (weight * err.abs()).detach().sum()}


class FixedBatches:
    """Micro-batches of the step, a function of the step alone. `rows` gives each micro-batch's row
    count (so micro-batches of a step differ in units); `nan_at` steps carry a NaN target."""

    def __init__(self, rows=(1, 3), nan_at=(), scale: float = 1.0, weighted: bool = False):
        self.rows, self.nan_at, self.scale, self.weighted = rows, set(nan_at), scale, weighted

    def micro_batches(self, step: int) -> list[dict]:
        g = torch.Generator().manual_seed(step)
        out = []
        for n in self.rows:
            x = torch.randn(n, 3, generator=g) * self.scale
            y = torch.randn(n, generator=g)
            if step in self.nan_at:
                y[0] = float("nan")
            w = torch.rand(n, generator=g) + 0.5 if self.weighted else torch.ones(n)
            out.append({"x": x, "y": y, "weight": w})
        return out

    def __len__(self) -> int:
        return 100


class Scripted:
    """An eval that returns the next of `values` as eval_loss, and remembers the weights it saw."""

    def __init__(self, values):
        self.values, self.calls, self.weights = list(values), [], []

    def __call__(self, scorer, state):
        self.weights.append(scorer.w.detach().clone())
        self.calls.append(len(self.calls))
        return {"eval_loss": self.values[len(self.calls) - 1]}


class Finish:
    def __call__(self, model, run, sharded_module, result, state):
        return {}

    def after_summary(self, run_dir: Path) -> None:
        pass


def make(tmp_path: Path, name: str = "run", batcher=None, evaluate=None, resume: Path | None = None, **over):
    cfg = load_config(None, {"train.lr": 0.1, "train.warmup_steps": 0, "train.schedule": "constant",
                             "train.max_steps": 6, "train.max_grad_norm": 0.0, "train.eval_every": 0,
                             "output_dir": str(tmp_path / name), **over})
    (tmp_path / name).mkdir(exist_ok=True)
    torch.manual_seed(0)
    model = Linear()
    job = Job(model=model, loss=SquaredError(model), batcher=batcher or FixedBatches(), evaluate=evaluate,
              finish=Finish(), units_name="rows")
    run = Run(Accelerator(cpu=True), tmp_path / name, resume, cfg.to_dict())
    return Engine(cfg, run, job), cfg


def records(engine: Engine) -> list[dict]:
    return [json.loads(line) for line in (engine.run.dir / "metrics.jsonl").read_text().splitlines()]


def reference_gradient(batches: list[dict], w: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The loss and gradient of the whole step as one batch: sum of weighted errors / total weight."""
    w = w.detach().clone().requires_grad_(True)
    x = torch.cat([b["x"] for b in batches])
    y = torch.cat([b["y"] for b in batches])
    weight = torch.cat([b["weight"] for b in batches])
    loss = (weight * (x @ w - y) ** 2).sum() / weight.sum()
    loss.backward()
    return float(loss.detach()), w.grad


@pytest.mark.parametrize("rows,weighted", [((1, 3), False), ((2, 1, 4), True)])
def test_accumulation_is_normalised_by_the_units_of_the_whole_step(tmp_path, rows, weighted):
    engine, _ = make(tmp_path, batcher=FixedBatches(rows, weighted=weighted))
    seen = {}
    engine.apply_update = lambda record: seen.update(grad=engine.job.model.w.grad.clone(), record=record)
    record, tokens = engine.optimizer_step()
    want_loss, want_grad = reference_gradient(engine.job.batcher.micro_batches(0), engine.job.model.w)
    assert record["loss"] == pytest.approx(want_loss, rel=1e-6)
    assert torch.allclose(seen["grad"], want_grad, rtol=1e-5, atol=1e-7)
    units = sum(float(b["weight"].sum()) for b in engine.job.batcher.micro_batches(0))
    assert record["rows"] == pytest.approx(units)  # the units the loss returned, under the job's name
    assert tokens is None  # these batches say nothing of tokens: none are counted or faked
    abs_err = sum(float((b["weight"] * (b["x"] @ engine.job.model.w - b["y"]).abs()).sum())
                  for b in engine.job.batcher.micro_batches(0))
    assert record["abs_error"] == pytest.approx(abs_err / units, rel=1e-5)  # a task's figure, per unit


def test_a_step_split_into_more_micro_batches_gives_the_same_update(tmp_path):
    one, _ = make(tmp_path, "one", batcher=FixedBatches((4,)))
    four, _ = make(tmp_path, "four", batcher=FixedBatches((4,)))
    # The same rows in four passes of one row each.
    four.job.batcher.micro_batches = lambda step: [
        {k: v[i : i + 1] for k, v in one.job.batcher.micro_batches(step)[0].items()} for i in range(4)]
    for _ in range(3):
        a, _ = one.optimizer_step()
        b, _ = four.optimizer_step()
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert torch.allclose(one.job.model.w, four.job.model.w, rtol=1e-5, atol=1e-7)


def test_clipping_caps_the_gradient_norm_and_reports_the_norm_before(tmp_path):
    engine, _ = make(tmp_path, batcher=FixedBatches(scale=50.0), **{"train.max_grad_norm": 0.1})
    seen = {}
    engine.apply_update = lambda record: seen.update(norm=float(engine.job.model.w.grad.norm()), record=record)
    engine.optimizer_step()
    _, want = reference_gradient(engine.job.batcher.micro_batches(0), engine.job.model.w)
    assert seen["record"]["grad_norm"] == pytest.approx(float(want.norm()), rel=1e-5)  # before clipping
    assert seen["record"]["grad_norm"] > 1
    assert seen["norm"] == pytest.approx(0.1, rel=1e-4)


def test_a_non_finite_step_is_skipped_and_counted_and_too_many_stop_the_run(tmp_path):
    engine, _ = make(tmp_path, batcher=FixedBatches(nan_at={1, 3, 4}), **{"train.max_bad_steps": 1})
    engine.optimizer_step()
    before = engine.job.model.w.detach().clone()
    record, _ = engine.optimizer_step()  # step 1: NaN
    assert record["loss"] is None and record["grad_norm"] is None and record["skipped"]
    assert torch.equal(engine.job.model.w, before)  # the weights never see it
    assert engine.state["bad_steps"] == 1 and engine.state["step"] == 2
    engine.optimizer_step()  # step 2: fine, the count starts again
    assert engine.state["bad_steps"] == 0
    engine.optimizer_step()  # step 3: one bad step, allowed
    with pytest.raises(TrainingError, match="2 consecutive steps with a non-finite loss"):
        engine.optimizer_step()  # step 4: the second in a row


def test_eval_cadence_every_n_steps_and_at_the_last(tmp_path):
    ev = Scripted([5.0] * 10)
    engine, _ = make(tmp_path, evaluate=ev, **{"train.max_steps": 7, "train.eval_every": 3})
    engine.loop(RunResult(engine.run.dir, 0, float("nan")), None)
    assert [r["step"] for r in records(engine) if "eval_loss" in r] == [3, 6, 7]


def test_early_stopping_keeps_the_best_weights_and_restores_them(tmp_path):
    ev = Scripted([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    engine, _ = make(tmp_path, evaluate=ev, **{"train.max_steps": 12, "train.eval_every": 2, "train.patience": 2})
    result = RunResult(engine.run.dir, 0, float("nan"))
    engine.loop(result, None)
    assert result.stopped == "early stopping"
    assert engine.state["step"] == 8  # evals at 2, 4 (best), 6, 8: two without improvement
    assert engine.state["best_step"] == 4 and engine.state["best_eval"] == 2.0
    assert not torch.equal(engine.job.model.w, ev.weights[1])
    what = engine.best.restore(engine.state, engine.run.dir)
    assert what == "best (step 4)"
    assert torch.equal(engine.job.model.w, ev.weights[1])  # the weights the best eval saw
    assert [r.get("best", False) for r in records(engine) if "eval_loss" in r] == [True, True, False, False]


def test_min_delta_an_improvement_too_small_does_not_count(tmp_path):
    ev = Scripted([3.0, 2.95, 2.9, 2.85])
    engine, _ = make(tmp_path, evaluate=ev, **{"train.max_steps": 8, "train.eval_every": 2, "train.patience": 2,
                                             "train.min_delta": 0.1})
    result = RunResult(engine.run.dir, 0, float("nan"))
    engine.loop(result, None)
    assert result.stopped == "early stopping" and engine.state["best_step"] == 2 and engine.state["step"] == 6


def test_checkpoint_and_resume_continue_the_same_curve_bitwise(tmp_path):
    full, _ = make(tmp_path, "full", batcher=FixedBatches(weighted=True))
    full.loop(RunResult(full.run.dir, 0, float("nan")), None)

    cut, _ = make(tmp_path, "cut", batcher=FixedBatches(weighted=True), **{"train.max_steps": 6, "train.save_every": 3})
    for _ in range(3):  # "killed" after the checkpoint at step 3
        record, _ = cut.optimizer_step()
        cut.metrics.write(record)
    cut.save_checkpoint()
    cut.metrics.close()
    ckpt = checkpoint.complete_checkpoints(cut.run.dir)[-1]
    assert ckpt.name == "step-0000003"

    resumed, _ = make(tmp_path, "cut", batcher=FixedBatches(weighted=True), resume=ckpt, **{"train.save_every": 3})
    assert resumed.state["step"] == 3
    resumed.loop(RunResult(resumed.run.dir, 3, float("nan")), None)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "step_seconds"} for r in rs]  # noqa: E731
    assert strip(records(resumed)) == strip(records(full))  # step for step, every figure
    assert torch.equal(resumed.job.model.w, full.job.model.w)
