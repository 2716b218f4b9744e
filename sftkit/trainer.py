"""train(): start a run (processes, run directory, the checkpoint to resume from, seeds), pick the
task, let the engine run its Job, and finish (the final model, summary.json). The loop itself is
sftkit/engine.py; what differs between tasks is in sftkit/tasks/."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed

from . import checkpoint
from .config import Config, ConfigError, resume_conflicts, save_config
from .engine import Engine, SetupInterrupt, check_disk
from .job import Run, RunResult, TrainingError, log
from .report import plot_loss
from .rundir import prepare_run_dir
from .tasks import TASKS


def check_precision(cfg: Config) -> None:
    """float16 weights need loss scaling, which a pure-fp16 model cannot use (the scaler needs fp32
    master weights): refuse rather than train with gradients that underflow to zero."""
    if cfg.model.dtype in ("float16", "fp16") and cfg.peft.method != "qlora":
        raise ConfigError("model.dtype=float16: training float16 weights without loss scaling loses small "
                          "gradients; use model.dtype=bfloat16 (GPUs since Ampere) or float32, or auto")


def require_loggers(cfg: Config) -> None:
    """log.* that needs a package: checked before any model is loaded."""
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
    t_start = time.time()
    if cfg.task not in TASKS:
        raise ConfigError(f"task: {cfg.task!r} is not {' or '.join(TASKS)}")
    if cfg.train.batch_size < 1 or cfg.train.grad_accum < 1:
        raise ConfigError("train.batch_size and train.grad_accum must be at least 1")
    check_precision(cfg)
    require_loggers(cfg)
    if isinstance(cfg.data.eval, dict) and cfg.task != "sft":
        raise ConfigError(f"data.eval: named eval sets ({{name: path}}) are for task: sft; task: {cfg.task} takes one "
                          "path")
    if cfg.data.rag and cfg.task != "sft":
        raise ConfigError(f"data.rag: retrieval-augmented training is for task: sft, not task: {cfg.task}")
    task = TASKS[cfg.task]
    if hasattr(task, "check"):  # the task's own config checks, before anything is written
        task.check(cfg)
    run = start_run(cfg, overwrite, resume)
    with run_status(run):
        return _train(cfg, task, run, on_eval, options, t_start)


def _train(cfg: Config, task, run: Run, on_eval, options: dict | None, t_start: float) -> RunResult:
    with SetupInterrupt():
        job = task.prepare(cfg, run, **(options or {}))
        check_disk(run.dir, job.model, cfg)
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
        job.finish.after_summary(run.dir)  # files written from summary.json (model card, report)
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




def launch_processes(nproc: int, accelerate_config: str | None, argv: list[str]) -> int:
    """Re-run this command (`argv`, without --nproc / --accelerate-config) in `nproc` processes through
    accelerate (torch.distributed; gloo on CPU); returns the launcher's exit status."""
    with socket.socket() as sock:  # a free port, so two runs on one machine never collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc),
           "--main_process_port", str(port)]
    cmd += ["--config_file", accelerate_config] if accelerate_config else ["--multi_gpu"]
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--nproc", "--accelerate-config"):
            skip = True
        elif not a.startswith(("--nproc=", "--accelerate-config=")):
            rest.append(a)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    log(f"launching {nproc} processes: {' '.join(cmd[1:])} -m sftkit {' '.join(rest)}")
    rc = subprocess.call(cmd + ["-m", "sftkit", *rest], env=env)
    if rc != 0:
        print(f"sftkit: error: a training process failed (exit {rc}; the launcher's report above names the rank); "
              "the other processes were stopped", file=sys.stderr)
    return rc
