"""The training loop, top to bottom: model -> data -> steps -> checkpoints -> final model -> scores."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed
from tqdm.auto import tqdm

from . import checkpoint
from .attention import use_packed_attention
from .config import Config, ConfigError, resume_conflicts, save_config
from .data import prepare, renderer_for, text_source
from .data.packing import Batcher, pad_multiple
from .data.render import IGNORE, Renderer, build_examples
from .data.sources import Row, load_rows
from .evaluate import evaluate_model, loss_metrics
from .loss import TokenLoss
from .models import apply_method, count_parameters, load_model
from .report import MetricsLog, plot_loss

# TokenLoss holds the model as `.model`; checkpoints are keyed by the model's own parameter names.
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


def prepare_run_dir(path: str, overwrite: bool, resume: bool) -> Path:
    """A run directory that holds a run is never reused unless the user says --overwrite or --resume."""
    out = Path(path)
    try:
        if out.exists() and any(out.iterdir()) and not resume:
            if not overwrite:
                raise ConfigError(f"output_dir {out} already holds a run; pass --resume to continue it, "
                                  "--overwrite to replace it, or choose another output_dir")
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
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


def forward_tokens(cfg: Config) -> int:
    """Token budget of one forward pass. On CPU, small passes are as fast as big ones (measured:
    benchmarks/throughput.py) and hold a fraction of the activations; GPUs want big ones."""
    if cfg.train.max_forward_tokens >= 0:
        return cfg.train.max_forward_tokens
    return 16384 if torch.cuda.is_available() else 512


def trained_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that enter the loss: those whose label (shifted by one) is trained."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def generation_scores(model, renderer: Renderer, rows: list[Row], cfg: Config, label: str) -> float:
    """Generate a reply to each held-out prompt (all turns before the last reply) and score it."""
    rows = rows[: cfg.eval.limit] if cfg.eval.limit > 0 else rows
    result = evaluate_model(model, renderer, rows, [cfg.eval.metric], loss=False, max_new_tokens=cfg.eval.max_new_tokens,
                            batch_size=cfg.eval.batch_size, label=label)
    return result.metrics[cfg.eval.metric]


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


def train(cfg: Config, overwrite: bool = False, resume: bool = False,
          on_eval: Callable[[int, dict], None] | None = None) -> RunResult:
    """Run one training job. `on_eval(step, record)` is called after each eval (a sweep prunes there)."""
    t_start = time.time()
    if cfg.train.batch_size < 1 or cfg.train.grad_accum < 1:
        raise ConfigError("train.batch_size and train.grad_accum must be at least 1")
    # Processes: one, or several under torchrun / accelerate launch (gloo on CPU). The timeout is a
    # backstop; a rank that dies closes its sockets and the others fail at once.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=600))])
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError("DeepSpeed is not supported by sftkit's trainer yet: its checkpoints gather weights and "
                          "optimizer state through torch.distributed.checkpoint, which cannot read DeepSpeed's ZeRO "
                          "optimizer. Shard with configs/accelerate/fsdp.yaml instead, or replicate with ddp.yaml")
    main_process = accelerator.is_main_process
    world = accelerator.num_processes
    if main_process:
        prepare_run_dir(cfg.output_dir, overwrite, resume)
    accelerator.wait_for_everyone()
    run_dir = Path(cfg.output_dir)
    start_ckpt = None
    if resume:
        ckpts = checkpoint.complete_checkpoints(run_dir)
        if not ckpts:
            raise ConfigError(f"--resume: {run_dir} holds no complete checkpoint (set train.save_every to write them)")
        start_ckpt = ckpts[-1]
        conflicts = resume_conflicts(checkpoint.read_meta(start_ckpt)["config"], cfg)
        if conflicts:
            raise ConfigError(f"--resume: the config changed in a way that would change the run: {', '.join(conflicts)} "
                              f"differ from {start_ckpt}; restore them, or start a new run in another output_dir")
    if main_process:
        save_config(cfg, run_dir / "config.yaml")
    set_seed(cfg.train.seed)

    # Model and data.
    log(f"loading model {cfg.model.name}")
    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.revision, cfg.peft.method == "qlora")
    renderer = renderer_for(cfg.data, tok)
    data = prepare(cfg.data, cfg.train.seed, renderer)
    for line in data.summary():
        log(line)
    train_ex, eval_ex, eval_rows = data.train, data.eval, data.eval_rows
    if not train_ex:
        raise ConfigError(f"{cfg.data.train}: no example has a trained token left; raise data.max_length")
    if cfg.eval.generate and not eval_rows:
        raise ConfigError("eval.generate=true needs held-out rows: set data.eval or data.eval_fraction")

    result = RunResult(run_dir=run_dir, steps=0, final_loss=float("nan"))
    device = accelerator.device
    if cfg.peft.method != "qlora":  # 4-bit weights are placed by bitsandbytes at load
        model.to(device)
    if cfg.data.pack:
        log(f"packed rows: attention {use_packed_attention(model)}")
    if cfg.eval.generate and cfg.eval.compare_base and start_ckpt is None and main_process:
        result.scores["base"] = generation_scores(model, renderer, eval_rows, cfg, "base model")
        log(f"base model {cfg.eval.metric} on the held-out rows: {result.scores['base']:.3f}")

    # Forgetting: perplexity on general text, for the base model now and the tuned model at each eval.
    ref_ex: list = []
    if cfg.eval.reference:
        ref_ex, _ = build_examples(load_rows(text_source(cfg.eval.reference), "text"), renderer)
    base_ref_ppl = None
    if ref_ex and start_ckpt is None:
        base_ref_ppl = loss_metrics(model, ref_ex, cfg.train.batch_size, tok.pad_token_id)["perplexity"]
        log(f"base model perplexity on the reference text ({cfg.eval.reference}): {base_ref_ppl:.3f}")
    frozen = None
    if cfg.train.kl_to_base > 0 and cfg.peft.method in ("full", "freeze"):
        import copy

        frozen = copy.deepcopy(model).eval().requires_grad_(False)  # the base, for the KL term

    # Method and optimiser. Seeding right before wrapping makes the LoRA init reproducible.
    torch.manual_seed(cfg.train.seed)
    model = apply_method(model, cfg.peft)
    if cfg.train.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    trainable, total = count_parameters(model)
    log(f"method {cfg.peft.method}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")
    _check_disk(run_dir, model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    batcher = Batcher(train_ex, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seed, tok.pad_token_id,
                      cfg.data.pack, cfg.data.max_length, cfg.train.group_by_length,
                      rank=accelerator.process_index, world=accelerator.num_processes,
                      max_forward_tokens=forward_tokens(cfg), pad_multiple=pad_multiple())
    if cfg.data.pack:
        log(f"packed {len(train_ex)} examples into {len(batcher)} rows of up to {cfg.data.max_length} tokens "
            f"({sum(batcher.sizes) / (len(batcher) * cfg.data.max_length):.0%} full); train.batch_size counts rows")
    total_steps = total_steps_for(cfg, len(batcher), accelerator.num_processes)
    warmup = cfg.train.warmup_steps or round(cfg.train.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup, cfg.train.schedule, cfg.train.min_lr_ratio))
    # DDP hooks `forward`: the module it wraps computes the loss, so the whole step goes through it.
    step_module, optimizer = accelerator.prepare(TokenLoss(model, kl_coef=cfg.train.kl_to_base, frozen_base=frozen),
                                                 optimizer)
    # FSDP replaces each parameter by a sharded one: clip the gradients of those, not of the originals.
    params = [p for p in step_module.parameters() if p.requires_grad]
    step_module.train()

    # Where the run stands: restored from the checkpoint on --resume.
    state = {"step": 0, "best_eval": None, "best_step": None, "bad_evals": 0, "bad_steps": 0, "base_ref_ppl": base_ref_ppl}
    if start_ckpt is not None:
        saved_world = checkpoint.read_meta(start_ckpt).get("world", 1)
        if saved_world != world:
            raise ConfigError(f"--resume: {start_ckpt} was written by {saved_world} process(es), this run has {world}; "
                              f"resume with --nproc {saved_world} (the split of each step's batch depends on it)")
        meta = checkpoint.load(start_ckpt, step_module, optimizer, scheduler, accelerator.process_index, MODEL_PREFIX)
        state.update(meta["state"])
        log(f"resuming from {start_ckpt} at step {state['step']}")
    metrics = MetricsLog(run_dir, cfg, state["step"], main_process)

    pad_id = tok.pad_token_id
    bs, ga = cfg.train.batch_size, cfg.train.grad_accum
    sharded = accelerator.distributed_type == DistributedType.FSDP
    scorer = step_module if sharded else model  # FSDP: only the wrapped module's forward gathers the weights
    engine = "FSDP" if sharded else "DDP"
    log(f"{total_steps} optimizer steps of {bs} x {ga} samples"
        + (f" x {world} process{'es' if world > 1 else ''} ({engine})" if world > 1 or sharded else "")
        + f"; run directory {run_dir}")

    def save_checkpoint() -> None:
        try:
            checkpoint.save(run_dir, state["step"], step_module, optimizer, scheduler,
                            {"config": cfg.to_dict(), "state": dict(state), "world": world},
                            accelerator.process_index, accelerator.wait_for_everyone, MODEL_PREFIX)
        except OSError as e:
            last = checkpoint.complete_checkpoints(run_dir)
            raise TrainingError(f"could not write a checkpoint in {run_dir}: {e.strerror or e}; "
                                + (f"the last complete checkpoint {last[-1]} is intact" if last else "no checkpoint")
                                ) from None
        if main_process:  # one process deletes; two would race on the same directories
            checkpoint.prune(run_dir, cfg.train.keep, state["best_step"])

    bar = tqdm(total=total_steps, initial=state["step"], desc="train", file=sys.stderr, dynamic_ncols=True)
    t_loop, seen_tokens = time.time(), 0
    with StopRequest() as stop:
        while state["step"] < total_steps:
            step = state["step"]
            t0 = time.time()
            micro = batcher.micro_batches(step)
            # Normalise by the trained tokens of the whole optimizer step on every process, so a
            # token weighs the same whatever micro-batch or rank it lands in.
            local_tokens = sum(trained_tokens(mb) for mb in micro)
            step_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=device), "sum"))
            loss_sum = 0.0
            try:
                for k, mb in enumerate(micro):
                    # Gradients are exchanged once per step, after the last pass.
                    sync = nullcontext() if k == len(micro) - 1 else accelerator.no_sync(step_module)
                    with sync:
                        loss_k, _, _ = step_module(**{key: v.to(device) if torch.is_tensor(v) else v for key, v in mb.items()})
                        # DDP averages gradients over ranks; multiplying by the world size makes it a sum.
                        accelerator.backward(loss_k * world / step_tokens)
                    loss_sum += float(loss_k.detach())
            except torch.OutOfMemoryError:
                raise TrainingError(_oom_advice(cfg)) from None
            except RuntimeError as e:
                if "out of memory" in str(e) or "can't allocate memory" in str(e):
                    raise TrainingError(_oom_advice(cfg)) from None
                raise
            loss = float(accelerator.reduce(torch.tensor(loss_sum, device=device), "sum")) / step_tokens
            max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
            grad_norm = float(accelerator.clip_grad_norm_(params, max_norm))
            lr = scheduler.get_last_lr()[0]
            record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "trained_tokens": step_tokens}
            if math.isfinite(loss) and math.isfinite(grad_norm):
                optimizer.step()
                scheduler.step()
                state["bad_steps"] = 0
            else:
                # Never let a NaN/inf reach the weights, and never report it as a number.
                state["bad_steps"] += 1
                record.update(loss=None, grad_norm=None, skipped="non-finite loss or gradient")
                log(f"step {step + 1}: non-finite loss or gradient, update skipped "
                    f"({state['bad_steps']} in a row, limit train.max_bad_steps={cfg.train.max_bad_steps})")
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step + 1
            if state["bad_steps"] > cfg.train.max_bad_steps:
                metrics.write(record)
                raise TrainingError(f"{state['bad_steps']} consecutive steps with a non-finite loss or gradient "
                                    f"(last at step {step + 1}); lower train.lr, check the data, or keep "
                                    "train.max_grad_norm on")

            n_tokens = sum(int(mb["real_tokens"]) for mb in micro)
            seen_tokens += n_tokens
            record.update(tokens=n_tokens, step_seconds=round(time.time() - t0, 4))
            last = state["step"] == total_steps
            improved = False
            if (eval_ex or ref_ex) and ((cfg.train.eval_every and state["step"] % cfg.train.eval_every == 0) or last):
                if ref_ex:
                    record["ref_ppl"] = loss_metrics(scorer, ref_ex, bs, pad_id)["perplexity"]
                    record["forgetting"] = record["ref_ppl"] / state["base_ref_ppl"] - 1
                    result.forgetting = record["forgetting"]
            if eval_ex and ((cfg.train.eval_every and state["step"] % cfg.train.eval_every == 0) or last):
                ev = loss_metrics(scorer, eval_ex, bs, pad_id)
                record.update(eval_loss=ev["eval_loss"], eval_ppl=ev["perplexity"], eval_accuracy=ev["token_accuracy"])
                result.eval_loss = record["eval_loss"]
                best = state["best_eval"]
                if best is None or record["eval_loss"] < best - cfg.train.min_delta:
                    state.update(best_eval=record["eval_loss"], best_step=state["step"], bad_evals=0)
                    improved = True
                else:
                    state["bad_evals"] += 1
            metrics.write(record)
            if on_eval is not None and "eval_loss" in record:
                on_eval(state["step"], record)
            early = cfg.train.patience > 0 and state["bad_evals"] >= cfg.train.patience
            periodic = cfg.train.save_every and state["step"] % cfg.train.save_every == 0
            if cfg.train.save_every and not last and (periodic or stop.signal or (improved and cfg.train.keep)):
                save_checkpoint()
            postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{seen_tokens / (time.time() - t_loop):.0f}"}
            if "eval_loss" in record:
                postfix["eval"] = f"{record['eval_loss']:.4f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            result.steps, result.final_loss = state["step"], loss
            # Every rank must stop after the same step, or one would wait for the others forever.
            stop_now = stop.signal is not None
            if world > 1:
                stop_now = int(accelerator.reduce(torch.tensor(int(stop_now), device=device), "sum")) > 0
            if stop_now and not last:
                bar.close()
                metrics.close()
                where = f"a checkpoint at step {state['step']}" if cfg.train.save_every else "no checkpoint (train.save_every=0)"
                name = signal.Signals(stop.signal).name if stop.signal else "a signal to another process"
                log(f"stopped by {name} after step {state['step']}, wrote {where}; "
                    f"continue with: sftkit train CONFIG --resume (output_dir={run_dir})")
                result.stopped = "signal"
                raise SystemExit(128 + (stop.signal or signal.SIGTERM))
            if early:
                log(f"early stopping: eval loss has not improved by {cfg.train.min_delta} for "
                    f"{cfg.train.patience} evals; best {state['best_eval']:.4f} at step {state['best_step']}")
                result.stopped = "early stopping"
                break
    bar.close()
    metrics.close()

    if result.stopped == "early stopping" and state["best_step"] not in (None, state["step"]):
        best = next(p for p in checkpoint.complete_checkpoints(run_dir)
                    if checkpoint.read_meta(p)["step"] == state["best_step"])
        from safetensors.torch import load_file

        checkpoint.load_trainable(step_module, load_file(str(best / "trainable.safetensors")), str(best), MODEL_PREFIX)
        log(f"final model = best checkpoint {best.name} (eval loss {state['best_eval']:.4f})")

    model = _save_final(model, tok, cfg, run_dir, main_process, step_module if sharded else None)
    accelerator.wait_for_everyone()
    if cfg.eval.generate and main_process:
        result.scores["tuned"] = generation_scores(model, renderer, eval_rows, cfg, "tuned model")
        log(f"tuned model {cfg.eval.metric} on the held-out rows: {result.scores['tuned']:.3f}")
    result.seconds = time.time() - t_start
    result.model = model
    if main_process:
        plot_loss(run_dir)
        summary = {"steps": result.steps, "stopped": result.stopped, "final_loss": result.final_loss,
                   "eval_loss": result.eval_loss, "best_eval_loss": state["best_eval"], "best_step": state["best_step"],
                   "metric": cfg.eval.metric if cfg.eval.generate else None, "scores": result.scores,
                   "base_ref_ppl": state["base_ref_ppl"], "forgetting": result.forgetting,
                   "method": cfg.peft.method, "trainable_parameters": trainable, "total_parameters": total,
                   "train_examples": len(train_ex), "seconds": round(result.seconds, 1)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return result


def _save_final(model, tok, cfg: Config, run_dir: Path, main_process: bool, sharded_module=None):
    """The adapter as peft saves it (LoRA), and a merged model plain transformers loads.

    With the weights sharded over processes (FSDP, `sharded_module` the wrapped loss module), every
    process takes part in gathering them whole onto rank 0, which writes them; the LoRA merge then
    starts from a fresh copy of the base model, as for QLoRA."""
    final = run_dir / "final"
    lora = cfg.peft.method in ("lora", "qlora")
    state = None
    if sharded_module is not None:
        state = checkpoint.gather_state(sharded_module, MODEL_PREFIX, trainable_only=lora)
    if not main_process:
        return model
    if lora:
        model.save_pretrained(final / "adapter", state_dict=state)
        tok.save_pretrained(final / "adapter")
        if cfg.peft.method == "qlora" or state is not None:
            # QLoRA: merging into 4-bit weights would round the update away; FSDP: the weights in
            # memory are shards. Either way, merge into a fresh full-precision copy of the base.
            from .export import merge_adapter

            model = merge_adapter(cfg.model.name, final / "adapter", cfg.model.dtype, cfg.model.revision)
        else:
            model = model.merge_and_unload()
        state = None
    model.save_pretrained(final / "model", state_dict=state)
    tok.save_pretrained(final / "model")
    log(f"saved {final / 'model'}" + (f" and {final / 'adapter'}" if (final / "adapter").exists() else ""))
    return model
