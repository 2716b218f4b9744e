"""The loop machinery: optimizer and schedule, accumulation normalised by the units of the whole
step, clipping, the non-finite guard, eval cadence, best weights and early stopping, checkpoints and
bitwise resume, stop requests (signals), and the advice for a full disk or memory. It knows no task:
it drives a Job (sftkit.job), whose loss module says what its units are and whose batcher gives the
step's micro-batches; what a task's metrics mean is the task's business.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import checkpoint
from .compat import unwrapped_name
from .config import Config, ConfigError
from .job import MODEL_PREFIX, Job, Run, RunResult, TrainingError, log
from .report import MetricsLog


def lr_lambda(total_steps: int, warmup: int, schedule: str, min_ratio: float):
    """A factor on the peak lr for step s (0-based): linear warmup, then the schedule's decay."""
    if schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(f"train.schedule: {schedule!r} is not one of cosine, linear, constant")

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total_steps - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * decay

    return f


def total_steps_for(cfg: Config, n_examples: int, world: int = 1) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    per_step = cfg.train.batch_size * cfg.train.grad_accum * world
    return max(1, math.ceil(cfg.train.epochs * n_examples / per_step))


class StopRequest:
    """SIGINT/SIGTERM: the first asks the loop to stop after the current step; a second exits at once."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals to the caller
                pass
        return self

    def _handle(self, sig, frame):
        if self.signal is not None:
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
            return
        self.signal = sig
        log(f"{signal.Signals(sig).name}: finishing this step and saving a checkpoint (send again to quit at once)")

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class SetupInterrupt:
    """Ctrl-C while the model and data load. The default handler raises KeyboardInterrupt wherever
    Python happens to be, and where that is a finalizer (`__del__`, a weakref callback: plenty run
    while thousands of rows are tokenized) Python prints "Exception ignored" and carries on: the run
    would go on to train. So the signal is also remembered, and honoured before the first step."""

    def __init__(self):
        self.signal: int | None = None
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave signals to the caller
            pass
        return self

    def _handle(self, sig, frame):
        self.signal = sig
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        if self.signal is not None and exc[0] is None:  # raised where it was swallowed: raise it here
            raise KeyboardInterrupt


def oom_advice(cfg: Config) -> str:
    return (f"out of memory at batch_size={cfg.train.batch_size}, data.max_length={cfg.data.max_length}, "
            f"peft.method={cfg.peft.method}. To use less: lower train.batch_size (raise train.grad_accum to keep "
            "the same batch), lower data.max_length, set train.checkpointing=true, or use peft.method=qlora")


def check_disk(run_dir: Path, model: torch.nn.Module, cfg: Config) -> None:
    """Fail before training when the checkpoints and final model cannot fit on the disk."""
    per_ckpt = checkpoint.size_estimate(model)
    n_ckpt = (cfg.train.keep + 1) if cfg.train.save_every else 0
    final = sum(p.numel() * p.element_size() for p in model.parameters()) * (2 if cfg.peft.method == "lora" else 1)
    need = per_ckpt * (n_ckpt + 1) + final  # +1: a checkpoint is written aside before the old one goes
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise ConfigError(f"not enough disk space in {run_dir}: about {need / 2**20:.0f} MiB needed for checkpoints "
                          f"and the final model, {free / 2**20:.0f} MiB free; free space, lower train.keep, or "
                          "choose another output_dir")


class BestWeights:
    """The trainable weights of the best eval so far, kept in memory (on the CPU) when early stopping
    is on, so the final model can be the best one even without a checkpoint of that step. Skipped
    when they would take more than a quarter of the free memory; the final model is then the best
    checkpoint if one is on disk, else the last weights, and the log and summary.json say which."""

    def __init__(self, cfg: Config, module: torch.nn.Module, always: bool = False, sharded: bool = False):
        self.module, self.step, self.weights = module, None, None
        size = checkpoint.size_estimate(module) // 3  # the weights, without AdamW's two moments
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = None
        # Sharded weights would have to be gathered onto one rank and spread again: there, the best
        # checkpoint (or the last weights) is the final model.
        self.enabled = (cfg.train.patience > 0 or always) and not sharded and (free is None or size <= free // 4)

    def keep(self, step: int) -> None:
        if self.enabled:  # every process holds the weights whole (one process, or DDP): a local copy
            self.weights = {unwrapped_name(n).removeprefix(MODEL_PREFIX): p.detach().clone()
                            for n, p in self.module.named_parameters() if p.requires_grad}
            self.step = step

    def restore(self, state: dict, run_dir: Path, metric: str = "eval loss") -> str:
        """Load the best weights into the model; returns what the final model is, for the log and summary."""
        step = state["best_step"]
        ckpt = next((p for p in checkpoint.complete_checkpoints(run_dir) if p.name == f"step-{step:07d}"), None)
        if self.step == step and self.weights is not None:
            weights, where = self.weights, "kept in memory"
        elif ckpt is not None:
            weights, where = load_file(str(ckpt / "trainable.safetensors")), f"checkpoint {ckpt.name}"
        else:
            log(f"final model = the last weights (step {state['step']}): the best eval (step {step}) was neither "
                "kept in memory nor in a checkpoint")
            return f"last (step {state['step']}); best step {step} not kept"
        checkpoint.load_trainable(self.module, weights, where, MODEL_PREFIX)
        log(f"final model = the best weights, step {step} ({metric} {state['best_eval']:.4f}, {where})")
        return f"best (step {step})"




class Engine:
    """Optimizer, schedule and the wrapped loss module of one run, and the loop that drives them."""

    def __init__(self, cfg: Config, run: Run, job: Job):
        self.cfg, self.run, self.job = cfg, run, job
        params = [p for p in job.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.total_steps = total_steps_for(cfg, len(job.batcher), run.world)
        warmup = cfg.train.warmup_steps or round(cfg.train.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(self.total_steps, warmup, cfg.train.schedule, cfg.train.min_lr_ratio))
        # DDP hooks `forward`: the module it wraps computes the loss, so the whole step goes through it.
        self.step_module, self.optimizer = run.accelerator.prepare(job.loss, optimizer)
        # FSDP replaces each parameter by a sharded one: clip the gradients of those, not of the originals.
        self.params = [p for p in self.step_module.parameters() if p.requires_grad]
        self.sharded = run.accelerator.distributed_type == DistributedType.FSDP
        # FSDP: only the wrapped module's forward gathers the weights, so scoring goes through it.
        self.scorer = self.step_module if self.sharded else job.model
        self.set_train_mode()
        self.state = {"step": 0, "best_eval": None, "best_step": None, "bad_evals": 0, "bad_steps": 0}
        if run.start_ckpt is not None:
            meta = checkpoint.load(run.start_ckpt, self.step_module, self.optimizer, self.scheduler, run.rank,
                                   MODEL_PREFIX)
            self.state.update({k: meta["state"][k] for k in self.state if k in meta["state"]})
            saved = meta.get("task_state", meta["state"])  # runs before task_state kept it with the loop's
            job.state.update({k: saved.get(k) for k in job.state if job.state[k] is None and k in saved})
            log(f"resuming from {run.start_ckpt} at step {self.state['step']}")
        self.best = BestWeights(cfg, self.step_module, always=job.final_is_best, sharded=self.sharded)
        self.metrics = MetricsLog(run.dir, cfg, self.state["step"], run.main)
        bs, ga, world = cfg.train.batch_size, cfg.train.grad_accum, run.world
        engine = "FSDP" if self.sharded else "DDP"
        log(f"{self.total_steps} optimizer steps of {bs} x {ga} samples"
            + (f" x {world} process{'es' if world > 1 else ''} ({engine})" if world > 1 or self.sharded else "")
            + f"; run directory {run.dir}")

    def set_train_mode(self) -> None:
        self.step_module.train()
        self.job.train_mode()

    def loop(self, result: RunResult, on_eval) -> None:
        """Steps until the last, an eval where due, a checkpoint where due; stops early, or on a signal."""
        cfg, state = self.cfg, self.state
        bar = tqdm(total=self.total_steps, initial=state["step"], desc="train", file=sys.stderr, dynamic_ncols=True)
        t_loop, seen_tokens, seen_units = time.time(), 0, 0.0
        with StopRequest() as stop:
            while state["step"] < self.total_steps:
                t0 = time.time()
                record, n_tokens = self.optimizer_step()
                if n_tokens is not None:
                    seen_tokens += n_tokens
                    record["tokens"] = n_tokens
                seen_units += record[self.job.units_name]
                record["step_seconds"] = round(time.time() - t0, 4)
                last = state["step"] == self.total_steps
                improved = self.evaluate(record, result, last)
                self.metrics.write(record)
                if on_eval is not None and any(k in record for k in ("eval_loss", self.job.select)):
                    on_eval(state["step"], record)
                stop_now = self.agree(stop.signal is not None)
                periodic = cfg.train.save_every and state["step"] % cfg.train.save_every == 0
                if cfg.train.save_every and not last and (periodic or stop_now or (improved and cfg.train.keep)):
                    self.save_checkpoint()
                rate = (seen_tokens if seen_tokens else seen_units) / (time.time() - t_loop)
                bar.set_postfix(self.postfix(record, rate, "tok/s" if seen_tokens else f"{self.job.units_name}/s"),
                                refresh=False)
                bar.update(1)
                result.steps = state["step"]
                result.final_loss = record["loss"] if record["loss"] is not None else float("nan")
                if stop_now and not last:
                    bar.close()
                    self.metrics.close()
                    self.stop_for_signal(stop.signal, result)
                if cfg.train.patience > 0 and state["bad_evals"] >= cfg.train.patience:
                    log(f"early stopping: {self.job.select} has not improved by {cfg.train.min_delta} for "
                        f"{cfg.train.patience} evals; best {state['best_eval']:.4f} at step {state['best_step']}")
                    result.stopped = "early stopping"
                    break
        bar.close()
        self.metrics.close()

    def optimizer_step(self) -> tuple[dict, int | None]:
        """One optimizer step over this process's micro-batches. Each pass's loss is a sum over its units
        (the loss module says what they are and how many); the gradient is divided by the units of the
        whole step on every process once they are known, so a token (or row) weighs the same wherever it
        lands. Returns the step's record and the tokens this process read (None: the batches hold none)."""
        acc, state, world, device = self.run.accelerator, self.state, self.run.world, self.run.device
        step = state["step"]
        micro = self.job.batcher.micro_batches(step)
        loss_sum, units, tokens, extras = 0.0, 0.0, None, {}
        try:
            for k, mb in enumerate(micro):
                if "real_tokens" in mb:  # what the pass reads, for the progress line; not an input
                    tokens = (tokens or 0) + int(mb["real_tokens"])
                inputs = {key: v.to(device) if torch.is_tensor(v) else v for key, v in mb.items() if key != "real_tokens"}
                # Gradients are exchanged once per step, after the last pass.
                sync = nullcontext() if k == len(micro) - 1 else acc.no_sync(self.step_module)
                with sync:
                    loss_k, units_k, more = self.step_module(**inputs)
                    # DDP averages gradients over ranks; multiplying by the world size makes it a sum.
                    acc.backward(loss_k * world)
                loss_sum += float(loss_k.detach())
                units += float(units_k)
                if isinstance(more, dict):  # a task's own per-step figures, as sums over its units
                    for key, v in more.items():
                        extras[key] = extras.get(key, 0.0) + float(v)
        except torch.OutOfMemoryError:
            raise TrainingError(oom_advice(self.cfg)) from None
        except RuntimeError as e:
            if "out of memory" in str(e) or "can't allocate memory" in str(e):
                raise TrainingError(oom_advice(self.cfg)) from None
            raise
        # One exchange for the step's loss, units and the task's figures, summed over processes.
        summed = acc.reduce(torch.tensor([loss_sum, units, *extras.values()], dtype=torch.float64, device=device),
                            "sum").tolist()
        step_units = int(summed[1]) if float(summed[1]).is_integer() else summed[1]
        if step_units > 0:
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, 1.0 / step_units)
        loss = summed[0] / step_units if step_units > 0 else float("nan")  # no units: nothing to learn from
        max_norm = self.cfg.train.max_grad_norm if self.cfg.train.max_grad_norm > 0 else float("inf")
        grad_norm = float(acc.clip_grad_norm_(self.params, max_norm))
        record = {"step": step + 1, "loss": loss, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  self.job.units_name: step_units}
        if step_units > 0:  # per unit of the step
            record.update({key: v / step_units for key, v in zip(extras, summed[2:])})
        if self.job.step_figures is not None:
            record.update(self.job.step_figures(step))
        self.apply_update(record)
        return record, tokens

    def apply_update(self, record: dict) -> None:
        """The update, unless the loss or gradient is not finite: then it is skipped and counted."""
        state, cfg = self.state, self.cfg
        if math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]):
            self.optimizer.step()
            self.scheduler.step()
            state["bad_steps"] = 0
        else:  # never let a NaN/inf reach the weights, and never report it as a number
            state["bad_steps"] += 1
            record.update(loss=None, grad_norm=None, skipped="non-finite loss or gradient")
            log(f"step {record['step']}: non-finite loss or gradient, update skipped "
                f"({state['bad_steps']} in a row, limit train.max_bad_steps={cfg.train.max_bad_steps})")
        self.optimizer.zero_grad(set_to_none=True)
        state["step"] = record["step"]
        if state["bad_steps"] > cfg.train.max_bad_steps:
            self.metrics.write(record)
            raise TrainingError(f"{state['bad_steps']} consecutive steps with a non-finite loss or gradient "
                                f"(last at step {record['step']}); lower train.lr, check the data, or keep "
                                "train.max_grad_norm on")

    def evaluate(self, record: dict, result: RunResult, last: bool) -> bool:
        """The task's held-out metrics where due; returns whether the selection metric improved."""
        cfg, state, job = self.cfg, self.state, self.job
        due = (cfg.train.eval_every and state["step"] % cfg.train.eval_every == 0) or last
        if job.evaluate is None or not due:
            return False
        record.update(job.evaluate(self.scorer, job.state))
        self.set_train_mode()
        if "forgetting" in record:
            result.forgetting = record["forgetting"]
        if "eval_loss" in record:
            result.eval_loss = record["eval_loss"]
        value = record.get(job.select)
        if value is None:
            return False
        best = state["best_eval"]
        better = best is None or (value > best + cfg.train.min_delta if job.maximize else value < best - cfg.train.min_delta)
        if better:
            state.update(best_eval=value, best_step=state["step"], bad_evals=0)
            self.best.keep(state["step"])
            record["best"] = True
        else:
            state["bad_evals"] += 1
        return better

    def agree(self, local: bool) -> bool:
        """Whether any process was asked to stop. Every rank must stop after the same step, and they must
        agree before the save, whose gathers are collective: a rank that saw the signal alone would enter
        them while its peer waited in the next step's reduce."""
        if self.run.world == 1:
            return local
        flag = torch.tensor(int(local), device=self.run.device)
        return int(self.run.accelerator.reduce(flag, "sum")) > 0

    def save_checkpoint(self) -> None:
        run, state = self.run, self.state
        try:
            checkpoint.save(run.dir, state["step"], self.step_module, self.optimizer, self.scheduler,
                            {"config": run.config, "state": dict(state), "task_state": dict(self.job.state),
                             "world": run.world}, run.rank, run.accelerator.wait_for_everyone, MODEL_PREFIX)
        except OSError as e:
            last = checkpoint.complete_checkpoints(run.dir)
            raise TrainingError(f"could not write a checkpoint in {run.dir}: {e.strerror or e}; "
                                + (f"the last complete checkpoint {last[-1]} is intact; free space and run again "
                                   "with --resume" if last else "no complete checkpoint yet; free space and run again")
                                ) from None
        if run.main:  # one process deletes; two would race on the same directories
            checkpoint.prune(run.dir, self.cfg.train.keep, state["best_step"])

    def stop_for_signal(self, signum: int | None, result: RunResult) -> None:
        step = self.state["step"]
        where = f"a checkpoint at step {step}" if self.cfg.train.save_every else "no checkpoint (train.save_every=0)"
        name = signal.Signals(signum).name if signum else "a signal to another process"
        log(f"stopped by {name} after step {step}, wrote {where}; "
            f"continue with: sftkit train CONFIG --resume (output_dir={self.run.dir})")
        result.stopped = "signal"
        raise SystemExit(128 + (signum or signal.SIGTERM))

    def postfix(self, record: dict, rate: float, rate_name: str) -> dict:
        out = {"loss": f"{record['loss']:.4f}" if record["loss"] is not None else "nan",
               "lr": f"{record['lr']:.2e}", rate_name: f"{rate:.0f}"}
        for key in self.job.progress:  # the task's own figures, where this step's eval gave them
            if isinstance(record.get(key), (int, float)):
                out["eval" if key == "eval_loss" else key] = f"{record[key]:.4f}"
        return out
