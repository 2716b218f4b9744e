"""The training loop, top to bottom: model -> data -> steps -> checkpoints -> final model -> scores."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from . import checkpoint
from .config import Config, ConfigError, save_config
from .data import prepare, renderer_for
from .data.packing import pad_collate, step_indices
from .data.render import IGNORE, Example, Renderer
from .data.sources import Row
from .evaluate import score
from .generate import generate
from .loss import token_loss
from .models import apply_method, count_parameters, load_model


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
    model: torch.nn.Module | None = None  # the final in-memory model (merged for LoRA)


def prepare_run_dir(path: str, overwrite: bool) -> Path:
    """A run directory that holds a run is never reused unless the user says --overwrite."""
    out = Path(path)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"output_dir {out} already holds a run; pass --overwrite to replace it "
                "or choose another output_dir"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def lr_lambda(total_steps: int, warmup: int, min_ratio: float):
    """Linear warmup, then cosine decay to min_ratio; a factor on the peak lr for step s (0-based)."""

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def total_steps_for(cfg: Config, n_examples: int) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    return max(1, math.ceil(cfg.train.epochs * n_examples / per_step))


def trained_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that enter the loss: those whose label (shifted by one) is trained."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


@torch.no_grad()
def eval_loss(model, examples: list[Example], batch_size: int, pad_id: int, device) -> dict[str, float]:
    """Token-weighted loss, perplexity and next-token accuracy over trained tokens."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    loss, tokens, correct = 0.0, 0, 0
    for b in range(0, len(order), batch_size):
        batch = pad_collate([examples[i] for i in order[b : b + batch_size]], pad_id)
        sums = token_loss(model, {k: v.to(device) for k, v in batch.items()})
        loss += float(sums.loss)
        tokens += sums.tokens
        correct += sums.correct
    model.train(was_training)
    mean = loss / max(tokens, 1)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50)), "eval_accuracy": correct / max(tokens, 1)}


def generation_scores(model, renderer: Renderer, rows: list[Row], cfg: Config, label: str) -> tuple[float, list[str]]:
    """Generate a reply to each held-out prompt (all turns before the last reply) and score it."""
    rows = [r for r in rows if r.text is None]  # text rows have no reply to generate
    rows = rows[: cfg.eval.limit] if cfg.eval.limit > 0 else rows
    prompts = [r.messages[:-1] for r in rows]
    refs = [r.messages[-1]["content"] for r in rows]
    with tqdm(total=len(prompts), desc=f"generate ({label})", file=sys.stderr, leave=False) as bar:
        preds = generate(model, renderer, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size, bar.update)
    return score(preds, refs, cfg.eval.metric), preds


def train(cfg: Config, overwrite: bool = False) -> RunResult:
    t_start = time.time()
    if cfg.train.batch_size < 1 or cfg.train.grad_accum < 1:
        raise ConfigError("train.batch_size and train.grad_accum must be at least 1")
    run_dir = prepare_run_dir(cfg.output_dir, overwrite)
    save_config(cfg, run_dir / "config.yaml")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(cfg.train.seed)

    # Model and data.
    log(f"loading model {cfg.model.name}")
    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.revision)
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
    model.to(device)
    if cfg.eval.generate and cfg.eval.compare_base:
        result.scores["base"], _ = generation_scores(model, renderer, eval_rows, cfg, "base model")
        log(f"base model {cfg.eval.metric} on {cfg.data.eval}: {result.scores['base']:.3f}")

    # Method and optimiser. Seeding right before wrapping makes the LoRA init reproducible.
    torch.manual_seed(cfg.train.seed)
    model = apply_method(model, cfg.peft)
    trainable, total = count_parameters(model)
    log(f"method {cfg.peft.method}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    total_steps = total_steps_for(cfg, len(train_ex))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    pad_id = tok.pad_token_id
    bs, ga = cfg.train.batch_size, cfg.train.grad_accum
    world = accelerator.num_processes
    log(f"{total_steps} optimizer steps of {bs} x {ga} samples; run directory {run_dir}")

    metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
    bar = tqdm(total=total_steps, desc="train", file=sys.stderr, dynamic_ncols=True)
    t_loop = time.time()
    seen_tokens = 0
    for step in range(total_steps):
        t0 = time.time()
        idx = step_indices(len(train_ex), cfg.train.seed, step, bs * ga)
        micro = [pad_collate([train_ex[i] for i in idx[k * bs : (k + 1) * bs]], pad_id) for k in range(ga)]
        # Normalise by the trained tokens of the whole optimizer step on every process, so a
        # token weighs the same whatever micro-batch or rank it lands in.
        local_tokens = sum(trained_tokens(mb) for mb in micro)
        step_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=device), "sum"))
        loss_sum = 0.0
        for k, mb in enumerate(micro):
            sync = nullcontext() if k == ga - 1 else accelerator.no_sync(model)
            with sync:
                sums = token_loss(model, {key: v.to(device) for key, v in mb.items()})
                # DDP averages gradients over ranks; multiplying by the world size turns that into a sum.
                accelerator.backward(sums.loss * world / step_tokens)
            loss_sum += float(sums.loss.detach())
        loss = float(accelerator.reduce(torch.tensor(loss_sum, device=device), "sum")) / step_tokens
        max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
        grad_norm = float(accelerator.clip_grad_norm_(params, max_norm))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        n_tokens = sum(int(mb["attention_mask"].sum()) for mb in micro)
        seen_tokens += n_tokens
        record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "trained_tokens": step_tokens,
                  "tokens": n_tokens, "step_seconds": round(time.time() - t0, 4)}
        last = step + 1 == total_steps
        if eval_ex and ((cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0) or last):
            record.update(eval_loss(model, eval_ex, bs, pad_id, device))
            result.eval_loss = record["eval_loss"]
        if accelerator.is_main_process:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and not last:
                checkpoint.save(run_dir, step + 1, accelerator.unwrap_model(model), optimizer, scheduler,
                                {"config": cfg.to_dict()})
        tps = seen_tokens / (time.time() - t_loop)
        postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tps:.0f}"}
        if "eval_loss" in record:
            postfix["eval"] = f"{record['eval_loss']:.4f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        result.steps, result.final_loss = step + 1, loss
    bar.close()
    metrics.close()

    # Final model: the adapter as peft saves it, and a merged model plain transformers loads.
    model = accelerator.unwrap_model(model)
    final = run_dir / "final"
    if accelerator.is_main_process:
        if cfg.peft.method == "lora":
            model.save_pretrained(final / "adapter")
            tok.save_pretrained(final / "adapter")
            model = model.merge_and_unload()
        model.save_pretrained(final / "model")
        tok.save_pretrained(final / "model")
        log(f"saved {final / 'model'}" + (f" and {final / 'adapter'}" if cfg.peft.method == "lora" else ""))
    if cfg.eval.generate:
        result.scores["tuned"], preds = generation_scores(model, renderer, eval_rows, cfg, "tuned model")
        log(f"tuned model {cfg.eval.metric} on {cfg.data.eval}: {result.scores['tuned']:.3f}")
    result.seconds = time.time() - t_start
    result.model = model
    if accelerator.is_main_process:
        summary = {"steps": result.steps, "final_loss": result.final_loss, "eval_loss": result.eval_loss,
                   "metric": cfg.eval.metric if cfg.eval.generate else None, "scores": result.scores,
                   "trainable_parameters": trainable, "total_parameters": total,
                   "train_examples": len(train_ex), "seconds": round(result.seconds, 1)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return result
