"""The training loop, top to bottom: model -> data -> steps -> checkpoints -> final model -> scores."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed
from tqdm.auto import tqdm

from . import checkpoint
from .config import Config, ConfigError, resume_conflicts, save_config
from .report import MetricsLog, plot_loss

# A task's loss module holds the model as `.model`; checkpoints are keyed by the model's own names.
MODEL_PREFIX = "model."


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to change."""


def log(msg: str) -> None:
    print(f"[sftkit] {msg}", file=sys.stderr, flush=True)


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    final_loss: float
    eval_loss: float | None = None
    scores: dict[str, float] = field(default_factory=dict)  # "base"/"tuned" -> metric value
    seconds: float = 0.0
    stopped: str = "completed"  # completed | early stopping | signal
    forgetting: float | None = None  # relative rise of the reference-text perplexity, last eval
    model: torch.nn.Module | None = None  # the final in-memory model (merged for LoRA)
    metrics: dict[str, float] = field(default_factory=dict)  # the task's final held-out metrics (classification)
    report: dict | None = None  # classification: per-class precision/recall/F1 and the confusion matrix


@dataclass
class Run:
    """Where a run happens: its processes, its directory, and the checkpoint it resumes from."""

    accelerator: Accelerator
    dir: Path
    start_ckpt: Path | None
    config: dict = field(default_factory=dict)  # the config as given (before any adjustment, e.g. a capped
    # data.max_length): what checkpoints record and --resume compares against

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


@dataclass
class Job:
    """What a task (sftkit/tasks/) hands the loop; everything else the loop does the same for every task."""

    model: torch.nn.Module  # the model being trained (method applied), unwrapped
    loss: torch.nn.Module  # forward(**batch) -> (loss sum, units, correct); holds the model as `.model`
    batcher: Any  # micro_batches(step) -> this process's batches of the step; len() = units per epoch
    units: Callable[[dict], float]  # what a micro-batch adds to the step's normaliser (trained tokens, rows)
    evaluate: Callable[[torch.nn.Module, dict], dict] | None  # (scorer, state) -> metrics; None: nothing held out
    finish: Any  # (model, run, sharded module, result, state) -> summary fields; optional .after_summary(run_dir)
    select: str = "eval_loss"  # the metric that picks the best eval (and drives early stopping)
    maximize: bool = False
    final_is_best: bool = False  # the final model is the best eval's weights even without early stopping
    train_mode: Callable[[], None] = lambda: None  # after .train(): put back what must stay in eval mode
    state: dict = field(default_factory=dict)  # the task's own figures, saved in checkpoints
    units_name: str = "trained_tokens"  # the units' name in metrics.jsonl


# Written into every run directory: --overwrite replaces only a folder that holds this marker (or
# a run from before the marker: config.yaml and metrics.jsonl), never anything else.
RUN_MARKER = ".sftkit-run"


def is_run_dir(path: Path) -> bool:
    return (path / RUN_MARKER).is_file() or ((path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file())


def _overwrite_refusal(out: Path) -> str | None:
    """Why --overwrite must not delete `out`, or None when it holds an sftkit run and nothing else."""
    real = out.resolve()
    protected = {Path("/").resolve(): "the root directory", Path.home().resolve(): "the home directory",
                 Path.cwd().resolve(): "the current directory"}
    if real in protected:
        return f"output_dir {out} is {protected[real]}"
    if not is_run_dir(out):
        found = sorted(p.name for p in out.iterdir())
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        return f"output_dir {out} holds {shown}, which is not an sftkit run (no {RUN_MARKER}, config.yaml or metrics.jsonl)"
    return None


def prepare_run_dir(path: str, overwrite: bool, resume: bool) -> Path:
    """A run directory that holds a run is never reused unless the user says --overwrite or --resume,
    and --overwrite deletes only a folder that holds an sftkit run."""
    out = Path(path)
    try:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output_dir {out} is not writable: it is a file, not a directory")
        # A run that stopped before its first step (bad data, say) left only these: it is taken again.
        if out.exists() and any(p.name not in (RUN_MARKER, "config.yaml", "status.json") for p in out.iterdir()) and not resume:
            if not overwrite and not is_run_dir(out):
                raise ConfigError(f"{_overwrite_refusal(out)}; choose an empty or new output_dir")
            if not overwrite:
                raise ConfigError(f"output_dir {out} already holds a run; pass --resume to continue it, "
                                  "--overwrite to replace it, or choose another output_dir")
            refusal = _overwrite_refusal(out)
            if refusal:
                raise ConfigError(f"--overwrite: {refusal}; nothing was deleted. Choose an output_dir of its own "
                                  "(e.g. runs/NAME)")
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_MARKER).write_text("sftkit run directory: `--overwrite` may replace this folder\n")
    except OSError as e:
        raise ConfigError(f"output_dir {out} is not writable: {e.strerror or e}") from None
    return out


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


def _oom_advice(cfg: Config) -> str:
    return (f"out of memory at batch_size={cfg.train.batch_size}, data.max_length={cfg.data.max_length}, "
            f"peft.method={cfg.peft.method}. To use less: lower train.batch_size (raise train.grad_accum to keep "
            "the same batch), lower data.max_length, set train.checkpointing=true, or use peft.method=qlora")


def _check_disk(run_dir: Path, model: torch.nn.Module, cfg: Config) -> None:
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


def check_precision(cfg: Config) -> None:
    """float16 weights need loss scaling, which a pure-fp16 model cannot use (the scaler needs fp32
    master weights): refuse rather than train with gradients that underflow to zero."""
    if cfg.model.dtype in ("float16", "fp16") and cfg.peft.method != "qlora":
        raise ConfigError("model.dtype=float16: training float16 weights without loss scaling loses small "
                          "gradients; use model.dtype=bfloat16 (GPUs since Ampere) or float32, or auto")


def require_loggers(cfg: Config) -> None:
    """log.* that needs a package: checked before any model is loaded."""
    import importlib.util

    if cfg.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("log.tensorboard=true needs the tensorboard package: pip install tensorboard "
                          "(or set log.tensorboard=false)")
    if cfg.log.mlflow and importlib.util.find_spec("mlflow") is None:
        raise ConfigError("log.mlflow needs the mlflow package: pip install mlflow-skinny (or unset log.mlflow)")


def resumable_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint that reads back whole; a damaged one is passed over with a warning."""
    ckpts = checkpoint.complete_checkpoints(run_dir)
    if not ckpts:
        raise ConfigError(f"--resume: {run_dir} holds no complete checkpoint (set train.save_every to write them)")
    problems = []
    for path in reversed(ckpts):
        problem = checkpoint.problem(path)
        if problem is None:
            if problems:
                log(f"warning: resuming from the older checkpoint {path.name}")
            return path
        problems.append(problem)
        log(f"warning: checkpoint {path.name} is damaged ({problem}); trying the one before it")
    raise ConfigError(f"--resume: no checkpoint in {run_dir} reads back whole (newest: {problems[0]}); "
                      "start again without --resume (with --overwrite)")


def position_limit(model) -> int | None:
    """The longest sequence the model's position embeddings cover (None: no fixed limit, e.g. ALiBi)."""
    c = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(c, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def cap_max_length(cfg: Config, model) -> None:
    """data.max_length never exceeds what the model can take: longer rows then follow data.truncation."""
    limit = position_limit(model)
    if limit is not None and cfg.data.max_length > limit:
        log(f"data.max_length={cfg.data.max_length} is more than {cfg.model.name} takes ({limit} positions): "
            f"using {limit}")
        cfg.data.max_length = limit


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
            from .compat import unwrapped_name

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
            from safetensors.torch import load_file

            weights, where = load_file(str(ckpt / "trainable.safetensors")), f"checkpoint {ckpt.name}"
        else:
            log(f"final model = the last weights (step {state['step']}): the best eval (step {step}) was neither "
                "kept in memory nor in a checkpoint")
            return f"last (step {state['step']}); best step {step} not kept"
        checkpoint.load_trainable(self.module, weights, where, MODEL_PREFIX)
        log(f"final model = the best weights, step {step} ({metric} {state['best_eval']:.4f}, {where})")
        return f"best (step {step})"




# -- the run -----------------------------------------------------------------------------------------
@contextmanager
def run_status(run: Run):
    """status.json says what the run is doing, for people and for `sftkit ui`: running (with the
    process id and host, so a run killed with -9 is told from a live one), completed, or how it
    ended otherwise (failed with the error, stopped by a signal)."""
    path = run.dir / "status.json"
    process = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}

    def write(**fields) -> None:
        if run.main:
            with contextlib.suppress(OSError):  # a full disk is reported by what failed, not here
                path.write_text(json.dumps({**fields, **process, "time": time.time()}))

    write(status="running")
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as e:
        write(status="stopped", error=f"stopped by a signal (exit {getattr(e, 'code', 130)}); continue with --resume")
        raise
    except BaseException as e:
        write(status="failed", error=str(e).splitlines()[0][:500] if str(e) else type(e).__name__)
        raise
    write(status="completed")


def train(cfg: Config, overwrite: bool = False, resume: bool = False,
          on_eval: Callable[[int, dict], None] | None = None, options: dict | None = None) -> RunResult:
    """Run one training job of any task. `on_eval(step, record)` is called after each eval (a sweep
    prunes there); `options` go to the task's prepare (e.g. classification's feature cache)."""
    from .tasks import TASKS

    t_start = time.time()
    if cfg.task not in TASKS:
        raise ConfigError(f"task: {cfg.task!r} is not {' or '.join(TASKS)}")
    if cfg.train.batch_size < 1 or cfg.train.grad_accum < 1:
        raise ConfigError("train.batch_size and train.grad_accum must be at least 1")
    check_precision(cfg)
    require_loggers(cfg)
    task = TASKS[cfg.task]
    if hasattr(task, "check"):  # the task's own config checks, before anything is written
        task.check(cfg)
    run = start_run(cfg, overwrite, resume)
    with run_status(run):
        return _train(cfg, task, run, on_eval, options, t_start)


def _train(cfg: Config, task, run: Run, on_eval, options: dict | None, t_start: float) -> RunResult:
    with SetupInterrupt():
        job = task.prepare(cfg, run, **(options or {}))
        _check_disk(run.dir, job.model, cfg)
        engine = Engine(cfg, run, job)
    result = RunResult(run_dir=run.dir, steps=engine.state["step"], final_loss=float("nan"))
    engine.loop(result, on_eval)

    final_weights = f"last (step {engine.state['step']})"
    early = result.stopped == "early stopping" or job.final_is_best
    if early and engine.state["best_step"] not in (None, engine.state["step"]):
        final_weights = engine.best.restore(engine.state, run.dir, job.select)
    try:
        summary = job.finish(job.model, run, engine.step_module if engine.sharded else None, result, job.state)
    except Exception as e:
        why = checkpoint.write_failure(e, run.dir)
        if why is None:
            raise
        last = checkpoint.complete_checkpoints(run.dir)
        raise TrainingError(f"could not write the final model in {run.dir / 'final'}: {why}; "
                            + (f"free space and run again with --resume (from {last[-1].name})" if last
                               else "free space and run again")) from None
    run.accelerator.wait_for_everyone()
    result.seconds = time.time() - t_start
    if run.main:
        plot_loss(run.dir)
        state = engine.state
        summary = {"task": cfg.task, "steps": result.steps, "stopped": result.stopped, "final_loss": result.final_loss,
                   "eval_loss": result.eval_loss, "best_eval": state["best_eval"], "best_step": state["best_step"],
                   "best_eval_loss": state["best_eval"] if job.select == "eval_loss" else None,
                   "final_weights": final_weights, **summary, "seconds": round(result.seconds, 1)}
        (run.dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if hasattr(job.finish, "after_summary"):  # files written from summary.json (model card, report)
            job.finish.after_summary(run.dir)
    return result


def start_run(cfg: Config, overwrite: bool, resume: bool) -> Run:
    """Processes, run directory, the checkpoint to resume from (checked against the config), seeds."""
    # One process, or several under torchrun / accelerate launch (gloo on CPU). The timeout is a
    # backstop; a rank that dies closes its sockets and the others fail at once.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=600))])
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError("DeepSpeed is not supported by sftkit's trainer yet: its checkpoints gather weights and "
                          "optimizer state through torch.distributed.checkpoint, which cannot read DeepSpeed's ZeRO "
                          "optimizer. Shard with configs/accelerate/fsdp.yaml instead, or replicate with ddp.yaml")
    if accelerator.is_main_process:
        prepare_run_dir(cfg.output_dir, overwrite, resume)
    accelerator.wait_for_everyone()
    run_dir = Path(cfg.output_dir)
    start_ckpt = None
    if resume:
        start_ckpt = resumable_checkpoint(run_dir)
        meta = checkpoint.read_meta(start_ckpt)
        conflicts = resume_conflicts(meta["config"], cfg)
        if conflicts:
            raise ConfigError(f"--resume: the config changed in a way that would change the run: {', '.join(conflicts)} "
                              f"differ from {start_ckpt}; restore them, or start a new run in another output_dir")
        if meta.get("world", 1) != accelerator.num_processes:
            raise ConfigError(f"--resume: {start_ckpt} was written by {meta.get('world', 1)} process(es), this run has "
                              f"{accelerator.num_processes}; resume with --nproc {meta.get('world', 1)} (the split of "
                              "each step's batch depends on it)")
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    set_seed(cfg.train.seed)
    return Run(accelerator, run_dir, start_ckpt, cfg.to_dict())


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
        t_loop, seen_tokens = time.time(), 0
        with StopRequest() as stop:
            while state["step"] < self.total_steps:
                t0 = time.time()
                record, n_tokens = self.optimizer_step()
                seen_tokens += n_tokens
                record.update(tokens=n_tokens, step_seconds=round(time.time() - t0, 4))
                last = state["step"] == self.total_steps
                improved = self.evaluate(record, result, last)
                self.metrics.write(record)
                if on_eval is not None and any(k in record for k in ("eval_loss", self.job.select)):
                    on_eval(state["step"], record)
                stop_now = self.agree(stop.signal is not None)
                periodic = cfg.train.save_every and state["step"] % cfg.train.save_every == 0
                if cfg.train.save_every and not last and (periodic or stop_now or (improved and cfg.train.keep)):
                    self.save_checkpoint()
                bar.set_postfix(self.postfix(record, seen_tokens / (time.time() - t_loop)), refresh=False)
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

    def optimizer_step(self) -> tuple[dict, int]:
        """One optimizer step over this process's micro-batches; the loss is normalised by the units of
        the whole step on every process, so a token (or row) weighs the same wherever it lands."""
        acc, state, world, device = self.run.accelerator, self.state, self.run.world, self.run.device
        step = state["step"]
        micro = self.job.batcher.micro_batches(step)
        local = sum(self.job.units(mb) for mb in micro)
        step_units = float(acc.reduce(torch.tensor(float(local), dtype=torch.float64, device=device), "sum"))
        step_units = int(step_units) if step_units.is_integer() else step_units
        loss_sum, extras = 0.0, {}
        try:
            for k, mb in enumerate(micro):
                # Gradients are exchanged once per step, after the last pass.
                sync = nullcontext() if k == len(micro) - 1 else acc.no_sync(self.step_module)
                with sync:
                    loss_k, _, more = self.step_module(**{key: v.to(device) if torch.is_tensor(v) else v
                                                          for key, v in mb.items()})
                    # DDP averages gradients over ranks; multiplying by the world size makes it a sum.
                    acc.backward(loss_k * world / step_units)
                loss_sum += float(loss_k.detach())
                if isinstance(more, dict):  # a task's own per-step figures, as sums over its units
                    for key, v in more.items():
                        extras[key] = extras.get(key, 0.0) + float(v)
        except torch.OutOfMemoryError:
            raise TrainingError(_oom_advice(self.cfg)) from None
        except RuntimeError as e:
            if "out of memory" in str(e) or "can't allocate memory" in str(e):
                raise TrainingError(_oom_advice(self.cfg)) from None
            raise
        loss = float(acc.reduce(torch.tensor(loss_sum, device=device), "sum")) / step_units
        max_norm = self.cfg.train.max_grad_norm if self.cfg.train.max_grad_norm > 0 else float("inf")
        grad_norm = float(acc.clip_grad_norm_(self.params, max_norm))
        record = {"step": step + 1, "loss": loss, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  self.job.units_name: step_units}
        if extras:  # summed over processes, then per unit of the step
            summed = acc.reduce(torch.tensor(list(extras.values()), dtype=torch.float64, device=device), "sum")
            record.update({key: float(v) / step_units for key, v in zip(extras, summed.tolist())})
        self.apply_update(record)
        return record, sum(int(mb["real_tokens"]) for mb in micro)

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

    def postfix(self, record: dict, tokens_per_s: float) -> dict:
        out = {"loss": f"{record['loss']:.4f}" if record["loss"] is not None else "nan",
               "lr": f"{record['lr']:.2e}", "tok/s": f"{tokens_per_s:.0f}"}
        for key, name in (("eval_loss", "eval"), ("macro_f1", "macro_f1")):
            if key in record:
                out[name] = f"{record[key]:.4f}"
        return out
