"""task: reward — a reward model: a scalar head on a causal LM or an encoder, trained on preference
pairs with the Bradley-Terry loss, -log sigmoid(r(chosen) - r(rejected) - margin), with an optional
per-pair margin column. Saved as a plain AutoModelForSequenceClassification with num_labels=1, which
transformers (and TRL's trainers) load as is; `sftkit score` and `sftkit generate --best-of N
--reward RUN` use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ..classifier import load_classifier, select_trainable
from ..config import Config, ConfigError, DataConfig, load_config
from ..data import renderer_for
from ..data.packing import Batcher, pad_collate
from ..data.pairs import check_training_pairs, normalise_pair, read_pairs
from ..data.render import Example
from ..data.sources import DataError, Normaliser, ReadStats, Row, read_source
from ..export import write_card
from ..job import Job, Run, RunResult, cap_max_length, log
from ..models import count_parameters, pick_dtype, resolve
from ..reviews import graded_replies, held_out_prompts, is_review_file, review_pairs
from ..rundir import final_model
from .preference import check_pair_keys, enable_checkpointing

LABELS = ["reward"]  # one output: the score
OBJECTIVES = ("pairs", "grades")  # reward.objective, for a review file as data.train


@dataclass
class ScoredPair:
    chosen: Example
    rejected: Example
    margin: float

    @property
    def input_ids(self) -> list[int]:
        return max(self.chosen.input_ids, self.rejected.input_ids, key=len)


def render_reply(renderer, prompt: list[dict], reply: list[dict], source: str = "", line: int = 0) -> Example | None:
    """The conversation as the model reads it (template, system message); truncation keeps the prompt."""
    ex, _, _ = renderer.fit(Row(prompt + reply, source, line, "prompt_completion", n_prompt=len(prompt)))
    return ex


def render_whole(renderer, prompt: list[dict], reply: list[dict]) -> Example:
    """The conversation as the model reads it (template, system message), not truncated."""
    return renderer.render(Row(prompt + reply, "", 0, "prompt_completion", n_prompt=len(prompt)))


def collate(bins: list[list[ScoredPair]], pad_id: int) -> dict:
    pairs = [b[0] for b in bins]
    batch = pad_collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "margin": torch.tensor([p.margin for p in pairs]), "real_tokens": batch["real_tokens"]}


@dataclass
class GradedReply:
    example: Example
    grade: float  # the overall grade (mean over reviewers), 1-5

    @property
    def input_ids(self) -> list[int]:
        return self.example.input_ids

    @property
    def target(self) -> float:
        """The reward the grade asks for: centred and scaled to [-1, 1], so the scores keep the scale
        a Bradley-Terry reward model has (differences of a few units)."""
        return (self.grade - 3.0) / 2.0


def collate_graded(bins: list[list[GradedReply]], pad_id: int) -> dict:
    items = [b[0] for b in bins]
    batch = pad_collate([g.example for g in items], pad_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "target": torch.tensor([g.target for g in items]), "real_tokens": batch["real_tokens"]}


class GradeLoss(torch.nn.Module):
    """Regression of the reward on each reply's grade (squared error): (loss sum, replies, metric sums).
    Regression rather than an ordinal loss: one scalar output, as every reward model here has, whose
    scale follows the grades; an ordinal (cumulative-link) loss would add a threshold per grade level
    that `sftkit score` and the RL loop have no use for, and people's 1-5 grades are close to interval."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, target):
        rewards = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
        loss = ((rewards - target.float()) ** 2).sum()
        return loss, torch.tensor(float(len(rewards))), {"rewards/mean": rewards.detach().sum()}


class RewardLoss(torch.nn.Module):
    """Bradley-Terry over the pairs of a batch (chosen rows first): (loss sum, pairs, metric sums)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, margin):
        rewards = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
        rc, rr = rewards.chunk(2)
        loss = -F.logsigmoid(rc - rr - margin.float()).sum()
        metrics = {"accuracy": (rc > rr).float().sum(), "rewards/chosen": rc.detach().sum(),
                   "rewards/rejected": rr.detach().sum(), "rewards/margin": (rc - rr).detach().sum()}
        return loss, torch.tensor(float(len(rc))), metrics


def check(cfg: Config) -> None:
    if cfg.reward.objective not in OBJECTIVES:
        raise ConfigError(f"reward.objective: expected one of {', '.join(OBJECTIVES)}, got {cfg.reward.objective!r}")
    if is_review_file(cfg.data.train):
        if cfg.data.eval:
            raise ConfigError("data.train is a review file: its prompts are held out by data.eval_fraction "
                              "(a prompt's replies stay together); remove data.eval")
    elif cfg.reward.objective == "grades":
        raise ConfigError("reward.objective: grades learns from people's grades: data.train must be a review file "
                          "(reviews.jsonl, written by the dashboard's Review page)")
    if cfg.peft.method == "qlora":
        raise ConfigError("task: reward does not take peft.method=qlora; use lora, head, freeze or full")
    if cfg.train.checkpointing and cfg.peft.method == "head":
        raise ConfigError("train.checkpointing with peft.method=head: only the head trains, there are no backbone "
                          "activations to recompute; remove train.checkpointing")
    check_pair_keys(cfg, "reward")


def prepare(cfg: Config, run: Run) -> Job:
    log(f"loading model {cfg.model.name} with a one-output score head")
    model, tok, new_keys = load_classifier(cfg.model.name, LABELS, pick_dtype(cfg.model.dtype), cfg.model.revision)
    cap_max_length(cfg, model)
    renderer = renderer_for(cfg.data, tok)
    graded_train: list[GradedReply] = []
    graded_eval: list[GradedReply] = []
    if is_review_file(cfg.data.train):
        train_ex, eval_ex, graded_train, graded_eval = from_reviews(cfg, renderer)
    else:
        stats = ReadStats()
        train_pairs, eval_pairs = read_pairs(cfg, stats)
        check_training_pairs(cfg, train_pairs, eval_pairs)
        train_ex, eval_ex = build(train_pairs, renderer), build(eval_pairs, renderer)
        log(f"{len(train_pairs)} training pairs, {len(train_ex)} kept; {len(eval_ex)} held out"
            + (f"; skipped while reading: {dict(stats.skipped)}" if stats.skipped else ""))
    grades = cfg.reward.objective == "grades"
    if not (graded_train if grades else train_ex):
        raise ConfigError(f"{cfg.data.train}: no {'graded reply' if grades else 'pair'} left within data.max_length")
    model.to(run.device)
    torch.manual_seed(cfg.train.seed)
    model = select_trainable(model, cfg.peft.method, new_keys, cfg.peft.trainable, cfg.peft)
    if cfg.train.checkpointing:
        enable_checkpointing(model)
    trainable, total = count_parameters(model)
    log(f"method {cfg.peft.method}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")
    pad = tok.pad_token_id
    if grades:
        batcher = Batcher(graded_train, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seed, pad, rank=run.rank,
                          world=run.world, collate=lambda bins: collate_graded(bins, pad))
        loss = GradeLoss(model)
    else:
        batcher = Batcher(train_ex, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seed, pad, rank=run.rank,
                          world=run.world, collate=lambda bins: collate(bins, pad))
        loss = RewardLoss(model)
    evaluation = (Evaluation(cfg, RewardLoss(model), eval_ex, pad, graded_eval, GradeLoss(model) if grades else None)
                  if eval_ex or graded_eval else None)
    base = evaluation(None).get("eval_accuracy") if evaluation is not None and run.start_ckpt is None else None
    return Job(model=model, loss=loss, batcher=batcher, evaluate=evaluation,
               finish=Finish(cfg, tok, evaluation, trainable, total, len(graded_train if grades else train_ex)),
               units_name="replies" if grades else "pairs",
               state={"base_accuracy": base}, select="eval_loss")


def build(pairs, renderer) -> list[ScoredPair]:
    out = []
    for p in pairs:
        c = render_reply(renderer, p.prompt, p.chosen, p.source, p.line)
        r = render_reply(renderer, p.prompt, p.rejected, p.source, p.line)
        if c is not None and r is not None:
            out.append(ScoredPair(c, r, p.margin))
    return out


def from_reviews(cfg: Config, renderer) -> tuple[list[ScoredPair], list[ScoredPair], list[GradedReply], list[GradedReply]]:
    """A review file as training and held-out data: its pairs (every ordered pair of each judgement,
    margins from grades; see sftkit.reviews) and its graded replies, split by prompt
    (data.eval_fraction), so a prompt's replies are on one side only."""
    path = cfg.data.train
    rows, stats = review_pairs(path)
    log(f"{path}: {stats.line()}")
    graded = graded_replies(path)
    held = held_out_prompts([r["prompt_id"] for r in rows] + [g["prompt_id"] for g in graded],
                            cfg.data.eval_fraction, cfg.train.seed)
    pairs = [(r["prompt_id"], normalise_pair(r, path, i + 1, {}, cfg.data.system)) for i, r in enumerate(rows)]
    train_ex = build([p for pid, p in pairs if pid not in held], renderer)
    eval_ex = build([p for pid, p in pairs if pid in held], renderer)
    replies: tuple[list[GradedReply], list[GradedReply]] = ([], [])
    for g in graded:
        prompt = [{"role": "user", "content": g["prompt"]}] if isinstance(g["prompt"], str) else g["prompt"]
        ex = render_reply(renderer, renderer.with_system(prompt), [{"role": "assistant", "content": g["reply"]}],
                          str(path), 0)
        if ex is not None:
            replies[g["prompt_id"] in held].append(GradedReply(ex, g["grade"]))
    log(f"review file: {len(train_ex)} training pairs and {len(replies[0])} graded replies; held out ({len(held)} "
        f"prompts): {len(eval_ex)} pairs, {len(replies[1])} graded replies; objective {cfg.reward.objective}")
    return train_ex, eval_ex, replies[0], replies[1]


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank)."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic) if len(x) > 1 and len(set(y)) > 1 and len(set(x)) > 1 else 0.0


class Evaluation:
    """Held-out Bradley-Terry loss, pairwise accuracy, and the rewards' mean and spread; with graded
    replies (a review file), the Spearman correlation of the rewards with the held-out grades, and
    with reward.objective grades, the squared error as the eval loss."""

    def __init__(self, cfg, loss, examples, pad, graded: list[GradedReply] | None = None,
                 grade_loss: GradeLoss | None = None):
        self.cfg, self.loss, self.examples, self.pad = cfg, loss, examples, pad
        self.graded, self.grade_loss = graded or [], grade_loss

    @torch.no_grad()
    def __call__(self, scorer, state: dict | None = None) -> dict:
        out = self.pairs() if self.examples else {}
        if self.graded:
            was = self.loss.training
            self.loss.eval()
            device = next(self.loss.model.parameters()).device
            rewards: list[float] = []
            bs = self.cfg.eval.batch_size
            for b in range(0, len(self.graded), bs):
                batch = collate_graded([[g] for g in self.graded[b : b + bs]], self.pad)
                rewards += self.loss.model(input_ids=batch["input_ids"].to(device),
                                           attention_mask=batch["attention_mask"].to(device)).logits[:, 0].float().tolist()
            self.loss.train(was)
            out["eval_spearman"] = spearman(rewards, [g.grade for g in self.graded])
            if self.grade_loss is not None:
                out["eval_loss"] = sum((r - g.target) ** 2 for r, g in zip(rewards, self.graded)) / len(rewards)
            if not self.examples:
                r = torch.tensor(rewards)
                out.update({"eval_reward_mean": float(r.mean()), "eval_reward_std": float(r.std()) if len(r) > 1 else 0.0})
        return out

    def pairs(self) -> dict:
        was = self.loss.training
        self.loss.eval()
        device = next(self.loss.model.parameters()).device
        total, right, rewards = 0.0, 0.0, []
        bs = self.cfg.eval.batch_size
        for b in range(0, len(self.examples), bs):
            batch = {k: v.to(device) for k, v in collate([[p] for p in self.examples[b : b + bs]], self.pad).items()
                     if k != "real_tokens"}
            loss, _, metrics = self.loss(**batch)
            total, right = total + float(loss), right + float(metrics["accuracy"])
            rewards += self.loss.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].tolist()
        self.loss.train(was)
        r = torch.tensor(rewards)
        n = len(self.examples)
        return {"eval_loss": total / n, "eval_accuracy": right / n, "eval_reward_mean": float(r.mean()),
                "eval_reward_std": float(r.std()) if len(r) > 1 else 0.0}


class Finish:
    def __init__(self, cfg, tok, evaluation, trainable, total, n_train):
        self.cfg, self.tok, self.evaluation = cfg, tok, evaluation
        self.trainable, self.total, self.n_train = trainable, total, n_train

    def __call__(self, model, run: Run, sharded_module, result: RunResult, state: dict) -> dict:
        if self.evaluation is not None:
            result.metrics = self.evaluation(None)
        if self.cfg.peft.method == "lora":
            model = model.merge_and_unload()
        model.eval()
        result.model = model
        base = state.get("base_accuracy")
        tuned = result.metrics.get("eval_accuracy")
        result.scores = {k: v for k, v in (("base", base), ("tuned", tuned)) if v is not None}
        result.metric = "pairwise_accuracy"
        if run.main:
            model.config.pad_token_id = self.tok.pad_token_id  # decoders score the last token that is not padding
            model.save_pretrained(run.dir / "final" / "model")
            tok = self.tok
            tok.chat_template = renderer_for(self.cfg.data, tok).trained_template(self.cfg.data.system)
            tok.save_pretrained(run.dir / "final" / "model")
            log(f"saved {run.dir / 'final' / 'model'} (AutoModelForSequenceClassification, num_labels=1)"
                + (f"; held-out pairwise accuracy: base head {base:.3f}, tuned {tuned:.3f}" if base is not None
                   and tuned is not None else ""))
        return {"metric": "pairwise_accuracy", "scores": result.scores, "metrics": result.metrics,
                "method": self.cfg.peft.method, "trainable_parameters": self.trainable, "total_parameters": self.total,
                "train_pairs": self.n_train}

    def after_summary(self, run_dir: Path) -> None:
        """The final model's card, from summary.json."""
        write_card(run_dir)


# -- using a reward model ------------------------------------------------------------------------
class Scorer:
    """A trained reward model with the template it was trained with: score(prompt, reply) -> float."""

    def __init__(self, run_or_model: str, device: str | None = None):
        p = Path(run_or_model)
        data_cfg = load_config(p / "config.yaml").data if (p / "config.yaml").is_file() else DataConfig()
        path = final_model(p)
        path = path if Path(path).is_dir() else resolve(run_or_model)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        if self.model.config.num_labels != 1:
            raise ConfigError(f"{run_or_model}: not a reward model (num_labels={self.model.config.num_labels}, expected 1)")
        if device:
            self.model.to(device)
        tok = AutoTokenizer.from_pretrained(path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.renderer = renderer_for(data_cfg, tok)

    @torch.no_grad()
    def score(self, items: list[tuple[list[dict], list[dict]]], batch_size: int = 16) -> list[float]:
        """Rewards of (prompt messages, reply messages) pairs. A pair longer than data.max_length is
        scored on its last max_length tokens: the reply whole, the prompt cut from its start (and a
        reply longer than that on its end), said in one line."""
        exs, cut, reply_cut = [], 0, 0
        limit = self.renderer.max_length
        for prompt, reply in items:
            prompt = self.renderer.with_system(prompt)  # data.system, as in training
            ex = render_whole(self.renderer, prompt, reply)
            if len(ex.input_ids) > limit:
                cut += 1
                reply_cut += len(ex.input_ids) - len(self.renderer.prompt_ids(prompt)) > limit
                ex = Example(ex.input_ids[-limit:], ex.labels[-limit:])
            exs.append(ex)
        if cut:
            log(f"score: {cut} of {len(items)} prompt + reply pairs are longer than data.max_length={limit}: each is "
                f"scored on its last {limit} tokens, the reply whole and the prompt cut from its start"
                + (f" ({reply_cut} replies are longer than that by themselves: their end)" if reply_cut else ""))
        out: list[float] = []
        device = next(self.model.parameters()).device
        for b in range(0, len(exs), batch_size):
            batch = pad_collate(exs[b : b + batch_size], self.renderer.tok.pad_token_id)
            logits = self.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
            out += logits[:, 0].float().tolist()
        return out


def read_scored(path: str) -> tuple[list[dict], list[tuple[list[dict], list[dict]]]]:
    """Rows to score (`sftkit score`): each a prompt and its reply, in any format SFT reads
    (prompt/completion, or messages ending with the assistant's reply). Returns the rows as read and
    their (prompt messages, reply messages); a row without a reply stops, naming file and line."""
    norm = Normaliser(path)
    rows, items = [], []
    for line, obj in read_source(path):
        if isinstance(obj, DataError):
            raise obj
        row = norm(obj, line)
        if row.text is not None or row.messages[-1]["role"] != "assistant":
            raise DataError(f"{path}:{line}: a row to score is a prompt and its reply (prompt/completion, or "
                            "messages ending with the assistant's reply)", "no reply")
        cut = max(i for i, m in enumerate(row.messages) if m["role"] == "user") + 1
        rows.append(obj)
        items.append((row.messages[:cut], row.messages[cut:]))
    return rows, items
