"""task: rl — the online loop after SFT: generate, score, update (GRPO family and RLOO).

Each optimizer step takes `train.batch_size x train.grad_accum` prompts (per process), samples
`rl.num_generations` completions of each with the policy as it is (KV-cached, the training template,
stopping at the end-of-turn token), scores them with `rl.rewards` (TRL's reward-function signature,
the built-ins in sftkit.rewards, or a reward run), turns the rewards into advantages within each
prompt's group, and updates the policy on exactly the sampled tokens. docs/rl.md gives each loss's
formula. The step runs on the shared loop, so it has checkpoints, resume, `--nproc`, logging and the
non-finite guard like every task.

Why the step is a function of (weights, seed, step) alone: the prompts of a step come from the same
seeded order as every task's batches, and the sampling seed of each completion is derived from
`train.seed`, the generation batch and its place in the step's global batch. A resumed run regenerates what the uninterrupted run
generated; with `rl.num_iterations` > 1 the generation batch in use is kept in the checkpoint (one
process), since the weights that made it are gone.

The update pass lays each prompt down once and its completions after it in one packed row (the
`data.share_prefix` layout, where the model's attention is proven exact for it; padded rows
otherwise), and takes log-probs only at completion positions from the hidden states there.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..attention import shared_layout_problem
from ..config import Config, ConfigError
from ..data import renderer_for
from ..data.packing import epoch_order, packed_row, pad_collate, step_slice
from ..data.render import IGNORE, Example
from ..data.sources import DataError, read_source, source_files
from ..export import write_card
from ..generate import generate_ids
from ..job import Job, Run, RunResult, cap_max_length, log
from ..loss import token_logps
from ..models import apply_method, count_parameters, load_model
from ..rewards import Reward, call, parse_rewards
from .preference import enable_checkpointing, load_reference
from .reward import Scorer
from .sft import save_final

LOSSES = ("grpo", "dr_grpo", "dapo", "rloo")
SCALES = ("group", "batch", "none")


# -- prompt rows ------------------------------------------------------------------------------------
@dataclass
class PromptRow:
    prompt: str | list  # as given: what reward functions receive (TRL passes prompts as the data holds them)
    messages: list[dict]  # the conversation the model replies to
    columns: dict  # the row's other columns, handed to reward functions
    source: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def chat(self) -> bool:
        return not isinstance(self.prompt, str)


def _messages(value, at: str, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{at}: {field}: expected a string or a non-empty list of messages", "wrong type")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{at}: {field}[{i}]: expected {{role, content}} with string values, got {m!r}", "wrong type")
        if m["role"] not in ("system", "user", "assistant"):
            raise DataError(f"{at}: {field}[{i}].role: unknown role {m['role']!r}", "bad role")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise DataError(f"{at}: {field}[{len(out) - 1}]: a prompt must end with a user turn (the model replies to it)",
                        "no user turn")
    return out


def read_prompt_rows(source: str, columns: dict[str, str], on_error: str = "error") -> tuple[list[PromptRow], int]:
    """Every prompt row of a source (a file, a dataset folder, a folder of files): `prompt` as a string
    or a message list, or `messages` ending with a user turn; the rest of the row is kept as columns.
    Returns the rows and how many were skipped (data.on_error=skip)."""
    col = columns.get("prompt", "prompt")
    rows, skipped = [], 0
    for path in source_files(source):
        for line, obj in read_source(path):
            at = f"{path}:{line}"
            try:
                if isinstance(obj, DataError):
                    raise obj
                if not isinstance(obj, dict):
                    raise DataError(f"{at}: expected an object per row, got {type(obj).__name__}", "not an object")
                if col in obj:
                    given = obj[col]
                    if isinstance(given, str):
                        if not given.strip():
                            raise DataError(f"{at}: {col}: empty prompt", "empty prompt")
                        msgs = [{"role": "user", "content": given}]
                    else:
                        msgs = _messages(given, at, col)
                    rest = {k: v for k, v in obj.items() if k != col}
                elif "messages" in obj:
                    given = msgs = _messages(obj["messages"], at, "messages")
                    rest = {k: v for k, v in obj.items() if k != "messages"}
                else:
                    raise DataError(f"{at}: {col}: missing field (the row has {', '.join(sorted(obj)) or 'nothing'}); a "
                                    f"prompt row holds {col!r} (a string or messages) or `messages` ending with a user turn",
                                    "missing field")
                rows.append(PromptRow(given, msgs, rest, path, line))
            except DataError:
                if on_error != "skip":
                    raise
                skipped += 1
    if not rows:
        raise DataError(f"{source}: no prompt rows", "empty file")
    return rows, skipped


def split_rows(rows: list[PromptRow], fraction: float, seed: int) -> tuple[list[PromptRow], list[PromptRow]]:
    """A seeded share of the prompts held out; the same prompt text never on both sides."""
    keys = sorted({json.dumps(r.messages) for r in rows})
    random.Random(seed).shuffle(keys)
    held = set(keys[: int(round(len(keys) * fraction))])
    return ([r for r in rows if json.dumps(r.messages) not in held], [r for r in rows if json.dumps(r.messages) in held])


# -- advantages -------------------------------------------------------------------------------------
def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The unbiased standard deviation of the values that are not NaN (as torch.std, NaN-aware)."""
    ok = ~torch.isnan(x)
    n = ok.sum(dim) if dim is not None else ok.sum()
    mean = torch.nanmean(x, dim=dim, keepdim=dim is not None)
    var = torch.nansum((x - mean) ** 2, dim=dim) / (n - 1).clamp(min=1)
    return var.sqrt()


def advantages(rewards: torch.Tensor, groups: int, kind: str, scale: str, batch_std: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per completion (group-major: `groups` prompts x G completions): the advantage, and whether its
    group's rewards are all equal. NaN rewards (no function applied) are left out of baselines and get 0.

    grpo, dr_grpo, dapo: reward minus the group mean, divided by the group's std (scale group), the
    batch's (batch: `batch_std`, over every process's rewards) or not at all (none), + 1e-4 as TRL.
    rloo: reward minus the mean of the group's other completions (leave-one-out)."""
    g = rewards.view(groups, -1)
    std = nanstd(g, 1)
    zero_std = torch.isclose(std, torch.zeros_like(std)).repeat_interleave(g.shape[1])
    if kind == "rloo":
        count = (~torch.isnan(g)).sum(1, keepdim=True)
        baseline = (torch.nansum(g, 1, keepdim=True) - g) / (count - 1)
        adv = (g - baseline).reshape(-1)
    else:
        adv = (g - torch.nanmean(g, 1, keepdim=True)).reshape(-1)
        if scale == "group":
            adv = adv / (std.repeat_interleave(g.shape[1]) + 1e-4)
        elif scale == "batch":
            adv = adv / ((batch_std if batch_std is not None else nanstd(rewards)) + 1e-4)
    return torch.nan_to_num(adv, nan=0.0), zero_std


# -- the loss ---------------------------------------------------------------------------------------
class RLLoss(torch.nn.Module):
    """forward(batch of completions) -> (loss sum, units, figures). The units are what the step's loss
    is divided by, as TRL's loss_type: grpo the completions (each a mean over its tokens), dr_grpo the
    completions x max_new_tokens, dapo the completion tokens, rloo the completions (a sequence-level
    ratio). Figures are aggregated the same way."""

    def __init__(self, model, cfg: Config, reference: torch.nn.Module | None):
        super().__init__()
        self.model, self.rl = model, cfg.rl
        self._reference = [reference]  # kept out of the module tree: DDP and the optimizer must not see it

    def forward(self, **batch):
        rl = self.rl
        n = int(batch["n_sequences"])
        ent: list = []
        logps, rows = token_logps(self.model, batch, temperature=rl.temperature, entropy=ent)
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        eps_low, eps_high = rl.epsilon, rl.epsilon if rl.epsilon_high is None else rl.epsilon_high
        adv = batch["advantages"].to(logps.dtype)
        counts = torch.zeros(n, device=logps.device).index_add(0, rows, torch.ones_like(logps))
        figures: dict[str, torch.Tensor] = {}
        entropy = torch.cat(ent) if ent else logps.new_zeros(0)
        if rl.loss == "rloo":  # the ratio of whole sequences
            seq = torch.zeros(n, device=logps.device).index_add(0, rows, logps)
            seq_old = torch.zeros(n, device=logps.device).index_add(0, rows, old.to(logps.dtype))
            ratio = torch.exp(seq - seq_old)
            clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
            loss = -torch.min(ratio * adv, clipped * adv)
            figures["clip_ratio/low"] = ((ratio < 1 - eps_low) & (adv < 0)).float().sum().detach()
            figures["clip_ratio/high"] = ((ratio > 1 + eps_high) & (adv > 0)).float().sum().detach()
            # each completion's mean token entropy, summed (the units are completions)
            figures["entropy"] = (torch.zeros(n, device=logps.device).index_add(0, rows, entropy) / counts.clamp(min=1)).sum()
            return loss.sum(), torch.tensor(float(n)), figures
        a = adv[rows]
        ratio = torch.exp(logps - old.to(logps.dtype))
        clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        per_token = -torch.min(ratio * a, clipped * a)
        if rl.beta:
            ref = batch["ref_logps"].to(logps.dtype)
            # k3 (unbiased, >= 0) on completions sampled from the old policy, weighted by the ratio so it
            # estimates the KL of the current one (TRL's use_bias_correction_kl, its default)
            kl = (torch.exp(ref - logps) - (ref - logps) - 1) * ratio
            per_token = per_token + rl.beta * kl
            figures["kl"] = self._aggregate(kl.detach(), rows, counts, n)
        figures["entropy"] = self._aggregate(entropy, rows, counts, n)
        figures["clip_ratio/low"] = self._aggregate(((ratio < 1 - eps_low) & (a < 0)).float().detach(), rows, counts, n)
        figures["clip_ratio/high"] = self._aggregate(((ratio > 1 + eps_high) & (a > 0)).float().detach(), rows, counts, n)
        units = {"grpo": float(n), "dr_grpo": float(n * rl.max_new_tokens), "dapo": float(len(logps))}[rl.loss]
        return self._aggregate(per_token, rows, counts, n), torch.tensor(units), figures

    def _aggregate(self, per_token: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor, n: int) -> torch.Tensor:
        if self.rl.loss == "grpo":  # each completion's mean over its tokens, summed over completions
            sums = torch.zeros(n, device=per_token.device, dtype=per_token.dtype).index_add(0, rows, per_token)
            return (sums / counts.clamp(min=1)).sum()
        return per_token.sum()

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> torch.Tensor:
        if self._reference[0] is not None:
            return token_logps(self._reference[0], batch, temperature=self.rl.temperature)[0]
        peft_model = getattr(self.model, "module", self.model)
        with peft_model.disable_adapter():
            return token_logps(peft_model, batch, temperature=self.rl.temperature)[0]


# -- rollouts: the batcher --------------------------------------------------------------------------
@dataclass
class Rollout:
    index: int  # generation batch
    rows: list[int]  # prompt rows of this process, in order
    prompt_ids: list[list[int]]
    completions: list[list[int]]  # group-major: rows x num_generations
    ended: list[bool]  # stopped at the end-of-turn token (else cut at max_new_tokens)
    advantages: list[float]
    old: list[list[float]] | None  # the old policy's token log-probs (num_iterations > 1, rloo)
    ref: list[list[float]] | None  # the reference's (beta > 0)
    figures: dict

    def to_state(self) -> dict:
        return dict(self.__dict__)


class Rollouts:
    """The RL task's batcher: a step's micro-batches are its completions, generated when the step
    (or, with num_iterations > 1, the first step on a generation batch) asks for them."""

    def __init__(self, cfg: Config, job_model, loss: RLLoss, renderer, rows: list[PromptRow], rewards: list[Reward],
                 scorers: dict, run: Run, share: bool, state: dict):
        self.cfg, self.rl, self.model, self.loss, self.renderer = cfg, cfg.rl, job_model, loss, renderer
        self.rows, self.rewards, self.scorers, self.run, self.share, self.state = rows, rewards, scorers, run, share, state
        self.per_process = cfg.train.batch_size * cfg.train.grad_accum
        self.current: Rollout | None = None
        self.last_step = 0
        self.prompt_ids = [renderer.prompt_ids(r.messages) for r in rows]
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    # the prompts of a generation batch: the same seeded order over epochs as every task's batches
    def prompt_rows(self, index: int) -> list[int]:
        per_step, n = self.per_process * self.run.world, len(self.rows)
        rows = step_slice(index, per_step, n, self._order)
        return rows[self.run.rank * self.per_process : (self.run.rank + 1) * self.per_process]

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order([1] * len(self.rows), self.cfg.train.seed, epoch,
                                               self.per_process * self.run.world, False)}
        return self._orders[epoch]

    def rollout_for(self, step: int) -> Rollout:
        index = step // self.rl.num_iterations
        if self.current is not None and self.current.index == index:
            return self.current
        saved = self.state.get("rollout")
        if saved and saved.get("index") == index:  # resumed inside a generation batch: the one it used
            self.current = Rollout(**saved)
            return self.current
        self.current = self.generate(index)
        if self.rl.num_iterations > 1 and self.run.world == 1:
            self.state["rollout"] = self.current.to_state()
        return self.current

    def generate(self, index: int) -> Rollout:
        rl, G = self.rl, self.rl.num_generations
        rows = self.prompt_rows(index)
        prompts = [self.rows[i].messages for i in rows for _ in range(G)]
        t0 = time.time()
        # Each completion's own seed, from train.seed, the generation batch and its place in the step's
        # global batch: what one process samples, two sample between them.
        base = (self.cfg.train.seed * 1_000_003 + index) * 1_000_003 + self.run.rank * self.per_process * G
        with torch.random.fork_rng(devices=[self.run.device] if self.run.device.type == "cuda" else []):
            completions = generate_ids(self.model, self.renderer, prompts, rl.max_new_tokens, batch_size=len(prompts),
                                       temperature=rl.temperature, top_p=rl.top_p,
                                       row_seeds=[base + k for k in range(len(prompts))])
        gen_seconds = time.time() - t0
        ends = self.renderer.end_ids
        ended = [bool(c) and c[-1] in ends for c in completions]
        scores, per_func = self.score([self.rows[i] for i in rows for _ in range(G)], completions, G)
        batch_std = None
        if rl.scale_rewards == "batch":
            batch_std = nanstd(torch.cat(self.gather(scores)))
        rewards_for_adv = scores
        old = ref = None
        if rl.num_iterations > 1 or rl.loss == "rloo" or rl.beta:
            old_l, ref_l = self.logps_of(rows, completions, ended)
            old = old_l if (rl.num_iterations > 1 or rl.loss == "rloo") else None
            ref = ref_l if rl.beta and rl.loss != "rloo" else None
            if rl.beta and rl.loss == "rloo":  # RLOO: the KL (first order, summed) is a penalty on the reward
                kl = torch.tensor([sum(o) - sum(r) for o, r in zip(old_l, ref_l)])
                rewards_for_adv = scores - rl.beta * kl
        adv, zero_std = advantages(rewards_for_adv, len(rows), rl.loss, rl.scale_rewards, batch_std)
        lengths = [len(c) for c in completions]
        figures = self.step_figures(scores, per_func, zero_std, lengths, ended, gen_seconds)
        return Rollout(index, rows, [self.prompt_ids[i] for i in rows], completions, ended, adv.tolist(),
                       old, ref, figures)

    def score(self, prompt_rows: list[PromptRow], completions: list[list[int]], G: int) -> tuple[torch.Tensor, torch.Tensor]:
        return score_completions(self.rewards, self.scorers, self.renderer.tok, prompt_rows, completions, G)

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if self.run.world == 1:
            return [t]
        import torch.distributed as dist

        out: list = [None] * self.run.world
        dist.all_gather_object(out, t.tolist())
        return [torch.tensor(x) for x in out]

    def step_figures(self, scores, per_func, zero_std, lengths, ended, gen_seconds) -> dict:
        """The step's reward and completion figures over every process's completions."""
        everything = [scores, per_func.reshape(-1), zero_std.float(), torch.tensor(lengths, dtype=torch.float32),
                      torch.tensor(ended, dtype=torch.float32)]
        if self.run.world > 1:
            everything = [torch.cat(self.gather(x)) for x in everything]
            per_func_all = everything[1].view(-1, len(self.rewards))
        else:
            per_func_all = per_func
        scores, _, zero_std, lengths, ended = everything
        out = {"reward": float(torch.nanmean(scores)), "reward_std": float(nanstd(scores)),
               "frac_reward_zero_std": float(zero_std.mean()), "completion_length": float(lengths.mean()),
               "completion_length/min": float(lengths.min()), "completion_length/max": float(lengths.max()),
               "truncated": float(1 - ended.mean()), "generated_tokens": int(lengths.sum()),
               "generate_seconds": round(gen_seconds, 3)}
        for k, r in enumerate(self.rewards):
            out[f"rewards/{r.name}/mean"] = float(torch.nanmean(per_func_all[:, k]))
            out[f"rewards/{r.name}/std"] = float(nanstd(per_func_all[:, k]))
        return out

    # the passes
    def sequences(self, rows: list[int], completions: list[list[int]], ended: list[bool]) -> list[tuple[int, dict]]:
        """(index of its first completion, batch) per pass of train.batch_size prompts: each prompt once
        and its completions after it (packed), or each completion after its own copy of the prompt
        (padded). Truncated completions carry no label when rl.mask_truncated is set, but still count."""
        G, per_pass = self.rl.num_generations, self.cfg.train.batch_size
        masked = [self.rl.mask_truncated and not e for e in ended]
        out = []
        for start in range(0, len(rows), per_pass):
            part = range(start, min(start + per_pass, len(rows)))
            ks = [k for j in part for k in range(j * G, (j + 1) * G)]
            if self.share:
                segments, owners = [], []
                for j in part:
                    p = self.prompt_ids[rows[j]]
                    root = -1
                    if len(p) > 1:  # the prompt but its last token, once; each completion goes on from it
                        segments.append((p[:-1], [IGNORE] * (len(p) - 1), -1))
                        owners.append(-1)
                        root = len(segments) - 1
                    head = p[-1:] if root >= 0 else p
                    for k in range(j * G, (j + 1) * G):
                        c = completions[k]
                        segments.append((head + c, [IGNORE] * len(head) + ([IGNORE] * len(c) if masked[k] else c), root))
                        owners.append(k - ks[0])
                real = sum(len(self.prompt_ids[rows[j]]) * G for j in part) + sum(len(completions[k]) for k in ks)
                batch = packed_row(segments, real)
                batch["sequence_ids"] = torch.cat([torch.full((len(ids),), o) for (ids, _, _), o in zip(segments, owners)])[None]
            else:
                exs = []
                for k in ks:
                    p, c = self.prompt_ids[rows[k // G]], completions[k]
                    exs.append(Example(p + c, [IGNORE] * len(p) + ([IGNORE] * len(c) if masked[k] else c)))
                batch = pad_collate(exs, self.renderer.tok.pad_token_id)
            batch["n_sequences"] = len(ks)
            out.append((ks[0], batch))
        return out

    def micro_batches(self, step: int) -> list[dict]:
        self.last_step = step + 1  # the step an eval after this one reports (samples.jsonl)
        r = self.rollout_for(step)
        masked = [self.rl.mask_truncated and not e for e in r.ended]
        batches = []
        for first, b in self.sequences(r.rows, r.completions, r.ended):
            ks = range(first, first + b["n_sequences"])
            b["advantages"] = torch.tensor([r.advantages[k] for k in ks], dtype=torch.float32)
            if r.old is not None:
                b["old_logps"] = torch.tensor([x for k in ks if not masked[k] for x in r.old[k]], dtype=torch.float32)
            if r.ref is not None:
                b["ref_logps"] = torch.tensor([x for k in ks if not masked[k] for x in r.ref[k]], dtype=torch.float32)
            batches.append(b)
        return batches

    @torch.no_grad()
    def logps_of(self, rows, completions, ended) -> tuple[list[list[float]], list[list[float]] | None]:
        """The policy's token log-probs of each completion as it is now (the old policy) and the
        reference's, computed once per generation batch."""
        device = self.run.device
        was = self.model.training
        self.model.eval()
        old: list[list[float]] = [[] for _ in completions]
        ref: list[list[float]] | None = [[] for _ in completions] if self.rl.beta else None
        for first, batch in self.sequences(rows, completions, ended):
            on = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            lp, owner = token_logps(self.model, on, temperature=self.rl.temperature)
            rp = self.loss.reference_logps(on) if ref is not None else None
            for local in sorted(set(owner.tolist())):
                sel = owner == local
                old[first + local] = lp[sel].tolist()
                if ref is not None:
                    ref[first + local] = rp[sel].tolist()
        self.model.train(was)
        return old, ref


def check(cfg: Config) -> None:
    rl = cfg.rl
    if rl.loss not in LOSSES:
        raise ConfigError(f"rl.loss: {rl.loss!r} is not one of {', '.join(LOSSES)}")
    if rl.scale_rewards not in SCALES:
        raise ConfigError(f"rl.scale_rewards: {rl.scale_rewards!r} is not one of {', '.join(SCALES)}")
    if rl.num_generations < 2:
        raise ConfigError(f"rl.num_generations: must be at least 2 (a group compares its completions), got {rl.num_generations}")
    if rl.max_new_tokens < 1 or rl.num_iterations < 1:
        raise ConfigError("rl.max_new_tokens and rl.num_iterations must be at least 1")
    if not rl.temperature > 0:
        raise ConfigError(f"rl.temperature: must be > 0 (the completions are sampled), got {rl.temperature}")
    if not 0 < rl.top_p <= 1:
        raise ConfigError(f"rl.top_p: must be in (0, 1], got {rl.top_p}")
    if rl.beta < 0 or rl.epsilon <= 0 or (rl.epsilon_high is not None and rl.epsilon_high <= 0):
        raise ConfigError("rl.beta must be >= 0, rl.epsilon and rl.epsilon_high > 0")
    for key in ("data.pack", "train.kl_to_base", "train.neftune_alpha", "eval.generate"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name):
            raise ConfigError(f"task: rl does not use {key}; remove it from the config")
    if cfg.train.distill.teacher is not None or cfg.data.replay:
        raise ConfigError("task: rl does not use train.distill or data.replay")
    parse_rewards(rl.rewards)  # names and options, before anything is written


# -- held out ---------------------------------------------------------------------------------------
def score_completions(rewards: list[Reward], scorers: dict, tok, prompt_rows: list[PromptRow], completions: list[list[int]],
                      G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted total per completion, NaN where no function applied; each function's values);
    `prompt_rows` has one row per completion, G completions of each prompt in a row."""
    texts = [tok.decode(c, skip_special_tokens=True) for c in completions]
    prompts = [r.prompt for r in prompt_rows]
    shown = [[{"role": "assistant", "content": t}] if r.chat else t for r, t in zip(prompt_rows, texts)]
    names = sorted({k for r in prompt_rows for k in r.columns})
    columns = {k: [r.columns.get(k) for r in prompt_rows] for k in names}
    columns["completion_ids"] = completions
    values = []
    for reward in rewards:
        if reward.model is not None:
            items = [(r.messages, [{"role": "assistant", "content": t}]) for r, t in zip(prompt_rows, texts)]
            values.append(scorers[reward.model].score(items, batch_size=16))
        else:
            values.append(call(reward, prompts, shown, columns, where=lambda i: f"{prompt_rows[i].where} (completion "
                                                                                f"{i % G + 1} of {G})"))
    per_func = torch.tensor(values, dtype=torch.float32).T  # completions x functions
    weights = torch.tensor([r.weight for r in rewards])
    total = torch.nansum(per_func * weights, 1)
    total[torch.isnan(per_func).all(1)] = float("nan")
    return total, per_func


def reward_scorers(rewards: list[Reward], device: str) -> dict:
    """One Scorer per reward run among the rewards."""
    return {r.model: Scorer(r.model, device=device) for r in rewards if r.model is not None}


@dataclass
class HeldOut:
    """Greedy replies to held-out prompts and their rewards."""
    metrics: dict  # eval_reward (mean weighted reward, unscorable = 0), eval_pass_rate, eval_rewards/NAME
    completions: list[list[int]]
    scores: list[float]
    per_func: list[list[float]]


@torch.no_grad()
def held_out(model, renderer, rows: list[PromptRow], rewards: list[Reward], scorers: dict, max_new_tokens: int,
             pass_at: float, batch_size: int) -> HeldOut:
    """The held-out figures of task: rl (its evals, and `sftkit compare` on an RL run): greedy replies
    scored by the run's rewards; a reply passes when its weighted reward is at least `pass_at`."""
    completions = generate_ids(model, renderer, [r.messages for r in rows], max_new_tokens, batch_size=batch_size)
    total, per_func = score_completions(rewards, scorers, renderer.tok, rows, completions, 1)
    scores = torch.nan_to_num(total, nan=0.0)
    metrics = {"eval_reward": float(scores.mean()), "eval_pass_rate": float((scores >= pass_at).float().mean())}
    if len(rewards) > 1:
        for k, r in enumerate(rewards):
            metrics[f"eval_rewards/{r.name}"] = float(torch.nanmean(per_func[:, k]))
    return HeldOut(metrics, completions, scores.tolist(), per_func.tolist())


class Evaluation:
    """Greedy replies to the held-out prompts: mean weighted reward and pass rate (reward >= rl.pass_at);
    each eval's prompts, replies and rewards go to samples.jsonl."""

    def __init__(self, cfg: Config, rollouts: Rollouts, rows: list[PromptRow], run_dir: Path | None):
        self.cfg, self.rollouts, self.rows, self.run_dir = cfg, rollouts, rows, run_dir

    @torch.no_grad()
    def __call__(self, scorer, state: dict | None = None, label: str = "eval") -> dict:
        ro, rl = self.rollouts, self.cfg.rl
        h = held_out(ro.model, ro.renderer, self.rows, ro.rewards, ro.scorers, rl.max_new_tokens, rl.pass_at,
                     self.cfg.eval.batch_size)
        if self.run_dir is not None and ro.run.main:
            tok = ro.renderer.tok
            with open(self.run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
                step = (state or {}).get("step", ro.last_step)
                for r, c, s, pf in zip(self.rows, h.completions, h.scores, h.per_func):
                    f.write(json.dumps({"label": label, "step": step, "prompt": r.prompt,
                                        "completion": tok.decode(c, skip_special_tokens=True), "reward": s,
                                        "rewards": {w.name: (None if math.isnan(v) else v) for w, v in
                                                    zip(ro.rewards, pf)}}, ensure_ascii=False) + "\n")
        return h.metrics


class Finish:
    def __init__(self, cfg, tok, evaluation: Evaluation | None, trainable: int, total: int):
        self.cfg, self.tok, self.evaluation, self.trainable, self.total = cfg, tok, evaluation, trainable, total

    def __call__(self, model, run: Run, sharded_module, result: RunResult, state: dict) -> dict:
        tuned = self.evaluation(None, {"step": "final"}, label="tuned") if self.evaluation else None
        model = save_final(model, self.tok, self.cfg, run.dir, run.main, sharded_module)
        result.model = model
        base = state.get("base_score")
        result.scores = {k: v["eval_pass_rate"] for k, v in (("base", base), ("tuned", tuned)) if v}
        result.metric = "pass_rate"
        if base and tuned and run.main:
            log(f"held-out greedy replies: mean reward {base['eval_reward']:.3f} -> {tuned['eval_reward']:.3f}, pass rate "
                f"{base['eval_pass_rate']:.3f} -> {tuned['eval_pass_rate']:.3f}")
        return {"metric": "pass_rate", "scores": result.scores, "rewards": {"base": base, "tuned": tuned},
                "method": self.cfg.peft.method, "trainable_parameters": self.trainable, "total_parameters": self.total}

    @staticmethod
    def after_summary(run_dir: Path) -> None:
        """report.md: the held-out greedy reward and pass rate of the starting and the tuned model."""
        summary = json.loads((run_dir / "summary.json").read_text())
        held = summary.get("rewards") or {}
        lines = [f"# {run_dir.name}: reinforcement learning", "",
                 f"{summary['steps']} steps, method {summary['method']}; stopped: {summary['stopped']}; "
                 f"final weights: {summary['final_weights']}.", ""]
        if held.get("base") and held.get("tuned"):
            lines += ["Held-out prompts, greedy replies scored by the run's rewards (a reply passes when its "
                      "weighted reward reaches rl.pass_at):", "", "| model | mean reward | pass rate |", "|---|---|---|",
                      *[f"| {'starting model' if k == 'base' else 'tuned'} | {v['eval_reward']:.3f} | "
                        f"{v['eval_pass_rate']:.3f} |" for k, v in held.items() if v], "",
                      "Every eval's prompts, replies and rewards: samples.jsonl.", ""]
        lines.append("Curves: plots/; every step's reward, KL, clip ratios, lengths and entropy: metrics.jsonl.")
        (run_dir / "report.md").write_text("\n".join(lines) + "\n")
        write_card(run_dir)


def prepare(cfg: Config, run: Run) -> Job:
    rewards = parse_rewards(cfg.rl.rewards)
    if not isinstance(cfg.data.train, str):
        raise ConfigError("task: rl takes one data.train source of prompt rows")
    train_rows, skipped = read_prompt_rows(cfg.data.train, cfg.data.columns, cfg.data.on_error)
    if cfg.data.eval:
        eval_rows, more = read_prompt_rows(cfg.data.eval, cfg.data.columns, cfg.data.on_error)
        skipped += more
    elif cfg.data.eval_fraction > 0:
        train_rows, eval_rows = split_rows(train_rows, cfg.data.eval_fraction, cfg.train.seed)
    else:
        eval_rows = []
    if not train_rows:
        raise ConfigError(f"{cfg.data.train}: no prompt left to train on (all held out)")
    log(f"{len(train_rows)} training prompts, {len(eval_rows)} held out" + (f"; skipped {skipped} bad rows" if skipped else "")
        + f"; {cfg.rl.num_generations} completions each, rewards: " + ", ".join(f"{r.name} x{r.weight:g}" for r in rewards))
    log(f"loading model {cfg.model.name}")
    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.revision, cfg.peft.method == "qlora")
    cap_max_length(cfg, model)
    renderer = renderer_for(cfg.data, tok)
    train_rows = fitting(train_rows, renderer, cfg, "training")
    eval_rows = fitting(eval_rows, renderer, cfg, "held-out")
    if cfg.peft.method != "qlora":
        model.to(run.device)
    reference = None
    if cfg.rl.beta and cfg.rl.reference not in (None, "", "base"):
        reference = load_reference(cfg.rl.reference, cfg.model.dtype, tok).to(run.device)
    elif cfg.rl.beta and cfg.peft.method not in ("lora", "qlora"):
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    scorers = reward_scorers(rewards, str(run.device))
    share = completion_sharing(cfg, [m for m in (model, reference) if m is not None], renderer, train_rows)
    torch.manual_seed(cfg.train.seed)
    model = apply_method(model, cfg.peft)
    if cfg.train.checkpointing:
        enable_checkpointing(model)
    trainable, total = count_parameters(model)
    log(f"method {cfg.peft.method}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")
    loss = RLLoss(model, cfg, reference)
    state = {"base_score": None, "rollout": None}
    rollouts = Rollouts(cfg, model, loss, renderer, train_rows, rewards, scorers, run, share, state)
    evaluation = Evaluation(cfg, rollouts, eval_rows, run.dir) if eval_rows else None
    if evaluation is not None and run.start_ckpt is None:
        state["base_score"] = evaluation(None, {"step": 0}, label="base")
        if run.main:
            log(f"held-out greedy replies of the starting model: mean reward {state['base_score']['eval_reward']:.3f}, "
                f"pass rate {state['base_score']['eval_pass_rate']:.3f}")
    return Job(model=model, loss=loss, batcher=rollouts, evaluate=evaluation, finish=Finish(cfg, tok, evaluation, trainable, total),
               select="eval_reward", maximize=True, units_name="units", state=state,
               progress=("reward", "eval_reward", "eval_pass_rate"),
               step_figures=lambda step: rollouts.rollout_for(step).figures)


def fitting(rows: list[PromptRow], renderer, cfg: Config, what: str) -> list[PromptRow]:
    """The prompts that leave room for rl.max_new_tokens within data.max_length. A longer one stops
    the run with data.truncation=error, else it is dropped and counted (cutting a prompt would change
    the question its reward checks)."""
    room = cfg.data.max_length - cfg.rl.max_new_tokens
    kept = []
    for r in rows:
        n = len(renderer.prompt_ids(r.messages))
        if n <= room:
            kept.append(r)
        elif cfg.data.truncation == "error":
            raise DataError(f"{r.where}: the prompt is {n} tokens; with rl.max_new_tokens={cfg.rl.max_new_tokens} it does "
                            f"not fit data.max_length={cfg.data.max_length} (data.truncation=error)", "too long")
    if len(kept) < len(rows):
        log(f"dropped {len(rows) - len(kept)} {what} prompts longer than data.max_length - rl.max_new_tokens = {room} tokens")
    if rows and not kept:
        raise ConfigError(f"no {what} prompt fits data.max_length={cfg.data.max_length} with rl.max_new_tokens="
                          f"{cfg.rl.max_new_tokens}: raise data.max_length or lower rl.max_new_tokens")
    return kept


def completion_sharing(cfg: Config, models: list, renderer, rows: list[PromptRow]) -> bool:
    """Each prompt computed once for its whole group, where that is exact for the policy (and the
    reference) on this model (checked numerically); padded rows otherwise. Logged either way."""
    if not cfg.data.share_prefix:
        return False
    eos = sorted(renderer.end_ids)[0]
    sides = [Example(ids + [eos, eos], [IGNORE] * len(ids) + [eos, eos])
             for ids in (renderer.prompt_ids(r.messages) for r in rows[:8])]
    why_not = shared_layout_problem(models, sides)
    if why_not:
        log(f"shared prompts: off, {why_not}")
        return False
    log("shared prompts: each prompt is computed once for its whole group of completions")
    return True
