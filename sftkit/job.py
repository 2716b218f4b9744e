"""The task contract: what a task (sftkit/tasks/) hands the loop, and what the loop hands back. It
knows no task and no loop: tasks import it, the engine drives what it describes.

A task is a plain module with `prepare(cfg, run) -> Job` (and optionally `check(cfg)`, run before
anything is written). The Job holds a loss module whose forward(**batch) returns (loss sum, units,
metric sums): the loop divides the sum by the units of the whole optimizer step, across
micro-batches and processes, and reports each metric per unit.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .config import Config

if TYPE_CHECKING:  # for the annotations only: the contract itself needs neither at run time
    import torch
    from accelerate import Accelerator

# A task's loss module holds the model as `.model`; checkpoints are keyed by the model's own names.
MODEL_PREFIX = "model."


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to change."""


def log(msg: str) -> None:
    """Every line sftkit says about its work: to stderr, with one prefix, at once."""
    print(f"[sftkit] {msg}", file=sys.stderr, flush=True)


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    final_loss: float
    eval_loss: float | None = None
    scores: dict[str, float] = field(default_factory=dict)  # "base"/"tuned" -> the value of `metric`
    metric: str | None = None  # what `scores` measure (exact_match, preference_accuracy, ...)
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


class Batcher(Protocol):
    """The step's micro-batches, a function of the step alone (so resume needs no state)."""

    def micro_batches(self, step: int) -> list[dict]:
        """This process's batches of optimizer step `step` (0-based). A batch may carry `real_tokens`
        (the tokens it holds, for the progress line); the rest goes to the loss module's forward."""
        ...

    def __len__(self) -> int:
        """Examples (or rows) per epoch: what train.epochs counts."""
        ...


class Finish(Protocol):
    """The end of a run: the final save and scores."""

    def __call__(self, model: torch.nn.Module, run: Run, sharded_module: torch.nn.Module | None,
                 result: RunResult, state: dict) -> dict:
        """Save the final model (every process takes part when `sharded_module` is given) and fill
        `result`; returns what summary.json adds."""
        ...

    def after_summary(self, run_dir: Path) -> None:
        """Files written from summary.json once it exists (model card, report.md); may do nothing."""
        ...


@dataclass
class Job:
    """What a task hands the loop; everything else the loop does the same for every task."""

    model: torch.nn.Module  # the model being trained (method applied), unwrapped
    loss: torch.nn.Module  # forward(**batch) -> (loss sum, units, metric sums); holds the model as `.model`
    batcher: Batcher
    evaluate: Callable[[torch.nn.Module, dict], dict] | None  # (scorer, state) -> metrics; None: nothing held out
    finish: Finish
    select: str = "eval_loss"  # the metric that picks the best eval (and drives early stopping)
    maximize: bool = False
    final_is_best: bool = False  # the final model is the best eval's weights even without early stopping
    train_mode: Callable[[], None] = lambda: None  # after .train(): put back what must stay in eval mode
    state: dict = field(default_factory=dict)  # the task's own figures, saved in checkpoints
    units_name: str = "trained_tokens"  # the units' name in metrics.jsonl
    progress: tuple[str, ...] = ("eval_loss",)  # metrics shown on the progress line when an eval gives them
    # Figures of step `step` known before its passes, the same on every process (an RL step's rewards and
    # completion lengths, measured when it generated): added to the step's record as they are.
    step_figures: Callable[[int], dict] | None = None


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

