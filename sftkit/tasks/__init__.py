"""Tasks: what differs between kinds of training; the loop in sftkit/trainer.py is the same for all.

A task is a plain module with one function, `prepare(cfg, run) -> Job` (see trainer.Job): it loads
the model, turns rows into examples and batches, and hands the loop

  - `loss`: a module whose forward(**batch) returns (loss sum, units, correct): the loop divides
    the sum by the units of the whole optimizer step (trained tokens, or rows),
  - `batcher`: the step's micro-batches, a function of the step alone (so resume needs no state),
  - `evaluate(scorer)`: held-out metrics for metrics.jsonl, including the one that picks the best,
  - `finish(...)`: the final save and scores, and what summary.json adds.

To add a task: write tasks/NAME.py with `prepare`, and add it to TASKS below.
"""

from __future__ import annotations

from . import classification, preference, reward, rl, sft

TASKS = {"sft": sft, "classification": classification, "preference": preference, "reward": reward, "rl": rl}
