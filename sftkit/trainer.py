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
from .attention import packing_problem, use_packed_attention
from .config import Config, ConfigError, resume_conflicts, save_config
from .data import prepare, renderer_for, text_source
from .data.packing import Batcher, pad_multiple
from .data.render import IGNORE, Renderer, build_examples
from .data.sources import Row, load_rows
from .evaluate import check_references, evaluate_model, loss_metrics
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
        if out.exists() and any(p.name not in (RUN_MARKER, "config.yaml") for p in out.iterdir()) and not resume:
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


def data_summary(data) -> dict:
    """Rows per source, kept, dropped by reason, truncated and tokens: for summary.json and the model card."""
    from collections import Counter

    out: dict = {"skipped": dict(data.read_stats.skipped)}
    for name, stats, rows in (("train", data.train_stats, data.train_rows), ("eval", data.eval_stats, data.eval_rows)):
        if stats is not None:
            out[name] = {"sources": dict(Counter(r.source for r in rows)), "rows": stats.rows, "kept": stats.kept,
                         "dropped": dict(stats.dropped), "truncated": stats.truncated, "tokens": stats.tokens,
                         "trained_tokens": stats.trained_tokens}
    return out


def write_data_quality(run_dir: Path, data, tok, max_length: int, limit: int = 100_000) -> None:
    """The data-quality counts of `sftkit data inspect --quality` (duplicates, eval overlap, lint) for the
    model card; skipped above `limit` training rows, where `data inspect` is the tool to run."""
    if len(data.train_rows) > limit:
        return
    from .data.quality import analyse

    q = analyse(data.train_rows, data.eval_rows, tok, max_length, diversity=False)
    (run_dir / "data_quality.json").write_text(json.dumps({
        "rows": q.rows, "exact_duplicates": sum(len(g) - 1 for g in q.exact),
        "near_duplicates": sum(len(g) - 1 for g in q.near), "contaminated": len(q.contaminated),
        "lint": {k: len(v) for k, v in q.lint.items() if v}}, indent=1))


class BestWeights:
    """The trainable weights of the best eval so far, kept in memory (on the CPU) when early stopping
    is on, so the final model can be the best one even without a checkpoint of that step. Skipped
    when they would take more than a quarter of the free memory; the final model is then the best
    checkpoint if one is on disk, else the last weights, and the log and summary.json say which."""

    def __init__(self, cfg: Config, module: torch.nn.Module):
        self.module, self.step, self.weights = module, None, None
        size = checkpoint.size_estimate(module) // 3  # the weights, without AdamW's two moments
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = None
        self.enabled = cfg.train.patience > 0 and (free is None or size <= free // 4)

    def keep(self, step: int) -> None:
        if self.enabled:
            self.weights = {k: v.clone() for k, v in checkpoint.gather_state(self.module, MODEL_PREFIX).items()}
            self.step = step

    def restore(self, state: dict, run_dir: Path) -> str:
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
        log(f"final model = the best weights, step {step} (eval loss {state['best_eval']:.4f}, {where})")
        return f"best (step {step})"


def train(cfg: Config, overwrite: bool = False, resume: bool = False,
          on_eval: Callable[[int, dict], None] | None = None) -> RunResult:
    """Run one training job. `on_eval(step, record)` is called after each eval (a sweep prunes there)."""
    t_start = time.time()
    if cfg.train.batch_size < 1 or cfg.train.grad_accum < 1:
        raise ConfigError("train.batch_size and train.grad_accum must be at least 1")
    check_precision(cfg)
    require_loggers(cfg)
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
        start_ckpt = resumable_checkpoint(run_dir)
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
    cap_max_length(cfg, model)
    renderer = renderer_for(cfg.data, tok)
    data = prepare(cfg.data, cfg.train.seed, renderer)
    for line in data.summary():
        log(line)
    train_ex, eval_ex, eval_rows = data.train, data.eval, data.eval_rows
    if main_process:
        write_data_quality(run_dir, data, tok, cfg.data.max_length)
    if not train_ex:
        raise ConfigError(f"{cfg.data.train}: no example has a trained token left; raise data.max_length")
    if cfg.eval.generate and not eval_rows:
        raise ConfigError("eval.generate=true needs held-out rows: set data.eval or data.eval_fraction")
    if cfg.eval.generate:
        check_references(eval_rows)

    result = RunResult(run_dir=run_dir, steps=0, final_loss=float("nan"))
    device = accelerator.device
    if cfg.peft.method != "qlora":  # 4-bit weights are placed by bitsandbytes at load
        model.to(device)
    if cfg.data.pack:
        log(f"packed rows: attention {use_packed_attention(model)}")
        problem = packing_problem(model, train_ex)
        if problem:
            raise ConfigError(problem)
    if cfg.eval.generate and cfg.eval.compare_base and start_ckpt is None and main_process:
        result.scores["base"] = generation_scores(model, renderer, eval_rows, cfg, "base model")
        log(f"base model {cfg.eval.metric} on the held-out rows: {result.scores['base']:.3f}")

    # Forgetting: perplexity on general text, for the base model now and the tuned model at each eval.
    ref_ex: list = []
    if cfg.eval.reference:
        ref_ex, _ = build_examples(load_rows(text_source(cfg.eval.reference), "text"), renderer)
    base_ref_ppl = None
    saved_state = checkpoint.read_meta(start_ckpt)["state"] if start_ckpt is not None else {}
    saved_reference = checkpoint.read_meta(start_ckpt)["config"]["eval"].get("reference") if start_ckpt else None
    if ref_ex and (start_ckpt is None or saved_state.get("base_ref_ppl") is None or saved_reference != cfg.eval.reference):
        # On --resume too when the reference text was off or another one: the model is still the
        # base here (the checkpoint is loaded later), so its figure is the base's.
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
        if base_ref_ppl is not None:  # computed above for this run's reference text
            state["base_ref_ppl"] = base_ref_ppl
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
                                + (f"the last complete checkpoint {last[-1]} is intact; free space and run again "
                                   "with --resume" if last else "no complete checkpoint yet; free space and run again")
                                ) from None
        if main_process:  # one process deletes; two would race on the same directories
            checkpoint.prune(run_dir, cfg.train.keep, state["best_step"])

    best = BestWeights(cfg, step_module)

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
                    if state["base_ref_ppl"]:
                        record["forgetting"] = record["ref_ppl"] / state["base_ref_ppl"] - 1
                        result.forgetting = record["forgetting"]
            if eval_ex and ((cfg.train.eval_every and state["step"] % cfg.train.eval_every == 0) or last):
                ev = loss_metrics(scorer, eval_ex, bs, pad_id)
                record.update(eval_loss=ev["eval_loss"], eval_ppl=ev["perplexity"], eval_accuracy=ev["token_accuracy"])
                result.eval_loss = record["eval_loss"]
                if state["best_eval"] is None or record["eval_loss"] < state["best_eval"] - cfg.train.min_delta:
                    state.update(best_eval=record["eval_loss"], best_step=state["step"], bad_evals=0)
                    best.keep(state["step"])
                    improved = True
                else:
                    state["bad_evals"] += 1
            metrics.write(record)
            if on_eval is not None and "eval_loss" in record:
                on_eval(state["step"], record)
            early = cfg.train.patience > 0 and state["bad_evals"] >= cfg.train.patience
            # Every rank must stop after the same step, or one would wait for the others forever; and
            # they must agree before the save, whose gathers are collective: a rank that saw the signal
            # alone would enter them while its peer waited in the next step's reduce.
            stop_now = stop.signal is not None
            if world > 1:
                stop_now = int(accelerator.reduce(torch.tensor(int(stop_now), device=device), "sum")) > 0
            periodic = cfg.train.save_every and state["step"] % cfg.train.save_every == 0
            if cfg.train.save_every and not last and (periodic or stop_now or (improved and cfg.train.keep)):
                save_checkpoint()
            postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{seen_tokens / (time.time() - t_loop):.0f}"}
            if "eval_loss" in record:
                postfix["eval"] = f"{record['eval_loss']:.4f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            result.steps, result.final_loss = state["step"], loss
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

    final_weights = f"last (step {state['step']})"
    if result.stopped == "early stopping" and state["best_step"] not in (None, state["step"]):
        final_weights = best.restore(state, run_dir)

    try:
        model = _save_final(model, tok, cfg, run_dir, main_process, step_module if sharded else None)
    except Exception as e:
        why = checkpoint.write_failure(e, run_dir)
        if why is None:
            raise
        last = checkpoint.complete_checkpoints(run_dir)
        raise TrainingError(f"could not write the final model in {run_dir / 'final'}: {why}; "
                            + (f"free space and run again with --resume (from {last[-1].name})" if last
                               else "free space and run again")) from None
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
                   "final_weights": final_weights,
                   "method": cfg.peft.method, "trainable_parameters": trainable, "total_parameters": total,
                   "train_examples": len(train_ex), "seconds": round(result.seconds, 1), "data": data_summary(data)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        from .export import write_card

        write_card(run_dir)
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
    # The tokenizer saved with the model carries the template actually trained (data.template,
    # data.system), so whatever loads it renders prompts as training did.
    import copy

    tok = copy.deepcopy(tok)
    tok.chat_template = renderer_for(cfg.data, tok).trained_template(cfg.data.system)
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
