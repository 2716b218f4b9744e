"""task: preference — learn from comparisons: DPO (sigmoid, Rafailov et al.), IPO, SimPO, ORPO.

Rows are TRL's preference formats: `prompt` + `chosen` + `rejected` (each a string or a message
list), or `chosen` and `rejected` as whole chats that share their prompt (the implicit-prompt form).
Each reply is rendered after its prompt as SFT renders a completion (template, system message,
truncation that keeps the prompt), so its log-probability is summed over exactly the tokens SFT
would train. A pair's two sequences go through the model in one forward, and the log-probs are taken
only at reply positions, from the hidden states there: never the tokens x vocab logits of the row.

The reference model (dpo, ipo) is the starting model: for LoRA the same model with its adapter
switched off (no second copy), else a frozen copy; `preference.precompute_reference` computes its
log-probs once before training and keeps them with the pairs.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from ..attention import shared_layout_problem
from ..config import Config, ConfigError
from ..data import renderer_for
from ..data.packing import Batcher, packed_row, pad_collate, shared_prefix_length
from ..data.pairs import Pair, check_training_pairs, read_pairs
from ..data.render import IGNORE, Example
from ..data.sources import ReadStats, Row
from ..distill import tokenizer_difference
from ..export import write_card
from ..job import Job, Run, RunResult, cap_max_length, log
from ..loss import token_logps
from ..models import (
    apply_method,
    count_parameters,
    hub_error,
    load_model,
    load_tokenizer,
    pick_dtype,
    resolve,
)
from ..rundir import final_model
from .sft import forward_tokens, save_final

LOSSES = ("dpo", "ipo", "simpo", "orpo")


# -- examples --------------------------------------------------------------------------------------
@dataclass
class PairExample:
    chosen: Example
    rejected: Example
    ref: tuple[float, float] | None = None  # precomputed reference log-probs

    @property
    def input_ids(self) -> list[int]:  # for the batcher's lengths
        return self.chosen.input_ids if len(self.chosen.input_ids) >= len(self.rejected.input_ids) else self.rejected.input_ids


def build_pairs(pairs: list[Pair], renderer) -> tuple[list[PairExample], dict]:
    """Render both replies after the prompt, as SFT renders a completion; a pair one of whose sides
    keeps no trained token (or whose prompt cannot fit) is dropped and counted."""
    out, dropped = [], {}
    for p in pairs:
        sides = []
        for reply in (p.chosen, p.rejected):
            row = Row(p.prompt + reply, p.source, p.line, "prompt_completion", n_prompt=len(p.prompt))
            ex, reason, _ = renderer.fit(row)
            if ex is None or ex.n_trained == 0:
                reason = reason or "no trained token left after truncation"
                dropped[reason] = dropped.get(reason, 0) + 1
                break
            sides.append(ex)
        else:
            out.append(PairExample(*sides))
    return out, dropped


def collate_pairs(bins: list[list[PairExample]], pad_id: int, share_prompt: bool = False) -> dict:
    """Chosen rows first, then rejected, padded into one batch: one forward for both sides of every pair.

    With `share_prompt`, one flat row instead, with no padding: each pair's prompt once, its chosen
    and rejected replies both continuing from it (`sftkit_prefix_of`, see sftkit.attention), so the
    prompt is computed once per pair, not twice; `sequence_ids` says whose reply each token is
    (pair i's chosen: i, its rejected: n + i, as the padded batch orders its rows)."""
    pairs = [b[0] for b in bins]
    n = len(pairs)
    if share_prompt:
        batch = _pack_pairs(pairs)
    else:
        batch = pad_collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch["n_sequences"] = 2 * n
    if all(p.ref is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref[0] for p in pairs] + [p.ref[1] for p in pairs], dtype=torch.float64)
    return batch


def _pack_pairs(pairs: list[PairExample]) -> dict:
    n = len(pairs)
    segments, seqs = [], []  # (ids, labels, parent segment) and whose reply each segment is (-1: a prompt)
    for i, pair in enumerate(pairs):
        p = shared_prefix_length([pair.chosen, pair.rejected])  # 0: a prompt too short to be worth it
        if p:
            segments.append((pair.chosen.input_ids[:p], [IGNORE] * p, -1))
            seqs.append(-1)
        root = len(segments) - 1 if p else -1
        for seq, ex in ((i, pair.chosen), (n + i, pair.rejected)):
            segments.append((ex.input_ids[p:], ex.labels[p:], root))
            seqs.append(seq)
    batch = packed_row(segments, sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs))
    batch["sequence_ids"] = torch.cat([torch.full((len(ids),), seq) for (ids, _, _), seq in zip(segments, seqs)])[None]
    return batch


def _on(batch: dict, device, drop: tuple[str, ...] = ()) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k not in drop}


# -- the loss --------------------------------------------------------------------------------------
def sequence_logps(model, batch: dict, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's trained tokens, their count), from the hidden states at those
    positions only: the LM head runs on trained positions, in chunks."""
    logps, rows = token_logps(model, batch, chunk)
    n = int(batch.get("n_sequences", batch["labels"].shape[0]))
    sums = torch.zeros(n, device=logps.device, dtype=torch.float32).index_add(0, rows, logps)
    counts = torch.zeros(n, device=logps.device, dtype=torch.float32).index_add(0, rows, torch.ones_like(logps))
    return sums, counts


def preference_losses(kind: str, beta: float, pc, pr, rc, rr, nc, nr, label_smoothing: float = 0.0,
                      gamma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss and the implicit rewards of chosen and rejected. pc/pr: policy log-probs (summed
    over the reply), rc/rr: the reference's, nc/nr: the replies' token counts."""
    if kind == "dpo":  # the sigmoid loss; label smoothing as conservative DPO
        d = beta * ((pc - rc) - (pr - rr))
        loss = -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)
        return loss, beta * (pc - rc), beta * (pr - rr)
    if kind == "ipo":  # on log-ratios averaged per reply token, as TRL (confirmed with the IPO authors)
        d = (pc - rc) / nc - (pr - rr) / nr
        return (d - 1 / (2 * beta)) ** 2, beta * (pc - rc), beta * (pr - rr)
    ac, ar = pc / nc, pr / nr  # average log-probs: SimPO and ORPO need no reference
    if kind == "simpo":
        return -F.logsigmoid(beta * (ac - ar) - gamma), beta * ac, beta * ar
    if kind == "orpo":  # odds ratio of the average token probabilities; the NLL term comes from sft_weight
        log_odds = (ac - ar) - (torch.log1p(-torch.exp(ac).clamp(max=1 - 1e-7)) - torch.log1p(-torch.exp(ar).clamp(max=1 - 1e-7)))
        return -beta * F.logsigmoid(log_odds), beta * ac, beta * ar
    raise ConfigError(f"preference.loss: {kind!r} is not one of {', '.join(LOSSES)}")


class PreferenceLoss(torch.nn.Module):
    """forward(batch of [chosen..., rejected...]) -> (loss summed over pairs, pairs, metric sums)."""

    def __init__(self, model, cfg: Config, frozen: torch.nn.Module | None):
        super().__init__()
        self.model, self.p = model, cfg.preference
        self._frozen = [frozen]  # kept out of the module tree: DDP and the optimizer must not see it

    def reference_logps(self, batch: dict) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"].to(torch.float32)
        with torch.no_grad():
            if self._frozen[0] is not None:
                return sequence_logps(self._frozen[0], batch)[0]
            peft_model = getattr(self.model, "module", self.model)
            with peft_model.disable_adapter():
                return sequence_logps(peft_model, batch)[0]

    def forward(self, **batch):
        p = self.p
        logps, counts = sequence_logps(self.model, batch)
        pc, pr = logps.chunk(2)
        nc, nr = counts.chunk(2)
        needs_ref = p.loss in ("dpo", "ipo")
        rc, rr = self.reference_logps(batch).chunk(2) if needs_ref else (torch.zeros_like(pc), torch.zeros_like(pr))
        loss, r_chosen, r_rejected = preference_losses(p.loss, p.beta, pc, pr, rc.detach(), rr.detach(), nc, nr,
                                                       p.label_smoothing, p.simpo_gamma)
        loss = loss.sum()
        if self.sft_weight:
            loss = loss + self.sft_weight * (-pc / nc).sum()  # the chosen reply's NLL per token (RPO / ORPO)
        metrics = {"rewards/chosen": r_chosen.detach().sum(), "rewards/rejected": r_rejected.detach().sum(),
                   "rewards/margin": (r_chosen - r_rejected).detach().sum(),
                   "rewards/accuracy": (r_chosen > r_rejected).float().sum(),
                   "logps/chosen": pc.detach().sum(), "logps/rejected": pr.detach().sum()}
        return loss, torch.tensor(float(len(pc))), metrics

    @property
    def sft_weight(self) -> float:
        w = self.p.sft_weight
        return (1.0 if self.p.loss == "orpo" else 0.0) if w is None else w


# -- the task --------------------------------------------------------------------------------------
def check(cfg: Config) -> None:
    p = cfg.preference
    if p.loss not in LOSSES:
        raise ConfigError(f"preference.loss: {p.loss!r} is not one of {', '.join(LOSSES)}")
    if not p.beta > 0:
        raise ConfigError(f"preference.beta: must be > 0, got {p.beta}")
    if p.label_smoothing and p.loss != "dpo":
        raise ConfigError("preference.label_smoothing applies to loss dpo only")
    if not 0 <= p.label_smoothing < 0.5:
        raise ConfigError(f"preference.label_smoothing: must be in [0, 0.5), got {p.label_smoothing}")
    check_pair_keys(cfg, "preference")
    if "train.group_by_length" not in cfg.given:
        # Pairs in random order unless the config asks for grouping: a step of pairs of like length is a
        # step of like pairs (arithmetic pairs: grouped steps reached 0.785 held-out accuracy, random ones
        # 0.805, and ran faster, since a pass is one packed row and grouping saves no padding;
        # docs/dpo-vs-trl.md). Set here, so the run's config.yaml says what ran.
        cfg.train.group_by_length = False
    if "train.schedule" not in cfg.given:  # linear decay, as TRL's DPOTrainer: 0.815 there, cosine 0.805
        cfg.train.schedule = "linear"


# Masks that train only the reply after the prompt: the others would count assistant turns of the
# prompt as reply tokens.
PAIR_MASKS = ("auto", "completion", "last_assistant")


def check_pair_keys(cfg: Config, task: str) -> None:
    """Keys a task on preference pairs (preference, reward) does not use stop the run, naming them."""
    for key in ("data.pack", "train.kl_to_base", "train.neftune_alpha", "eval.generate"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name):
            raise ConfigError(f"task: {task} does not use {key}; remove it from the config")
    if cfg.train.distill.teacher is not None:
        raise ConfigError(f"task: {task} does not use train.distill (distillation is for task: sft)")
    if cfg.data.replay:
        raise ConfigError(f"task: {task} does not use data.replay (general text has no chosen and rejected replies); "
                          "remove it from the config")
    if cfg.data.mask not in PAIR_MASKS:
        raise ConfigError(f"data.mask={cfg.data.mask}: task: {task} scores the reply after its prompt; this mask would "
                          f"count assistant turns inside the prompt as reply tokens. Use one of {', '.join(PAIR_MASKS)}")


def prepare(cfg: Config, run: Run) -> Job:
    log(f"loading model {cfg.model.name}")
    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.revision, cfg.peft.method == "qlora")
    cap_max_length(cfg, model)
    renderer = renderer_for(cfg.data, tok)
    stats = ReadStats()
    train_pairs, eval_pairs = read_pairs(cfg, stats)
    check_training_pairs(cfg, train_pairs, eval_pairs)
    train_ex, dropped = build_pairs(train_pairs, renderer)
    eval_ex, _ = build_pairs(eval_pairs, renderer)
    log(f"{len(train_pairs)} training pairs, {len(train_ex)} kept"
        + (f" (dropped: {', '.join(f'{n} {r}' for r, n in dropped.items())})" if dropped else "")
        + f"; {len(eval_ex)} held out" + (f"; skipped while reading: {dict(stats.skipped)}" if stats.skipped else ""))
    if not train_ex:
        raise ConfigError(f"{cfg.data.train}: no pair has a trained token left on both sides; raise data.max_length")
    if cfg.peft.method != "qlora":
        model.to(run.device)
    needs_ref = cfg.preference.loss in ("dpo", "ipo")  # simpo and orpo need no reference at all
    if needs_ref and cfg.preference.reference not in (None, "", "base"):
        frozen = load_reference(cfg.preference.reference, cfg.model.dtype, tok).to(run.device)
    elif needs_ref and cfg.peft.method not in ("lora", "qlora"):
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
    else:  # LoRA: the same model with its adapter switched off
        frozen = None
    share = prompt_sharing(cfg, [m for m in (model, frozen) if m is not None], train_ex)
    if needs_ref and cfg.preference.precompute_reference:
        precompute(frozen or model, train_ex + eval_ex, tok.pad_token_id, run.device, cfg.train.batch_size, share)
        frozen = None
    base_accuracy = preference_accuracy(model, eval_ex, tok.pad_token_id, run.device, cfg.train.batch_size, share) \
        if eval_ex and run.start_ckpt is None else None
    torch.manual_seed(cfg.train.seed)
    model = apply_method(model, cfg.peft)
    if cfg.train.checkpointing:
        enable_checkpointing(model)
    trainable, total = count_parameters(model)
    log(f"method {cfg.peft.method}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")
    # Passes of a few pairs (both sides of a pair always in the same pass): the loss is normalised by the
    # pairs of the whole step, so this changes nothing but the activation memory (as max_forward_tokens in SFT).
    batcher = Batcher(train_ex, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seed, tok.pad_token_id,
                      group_by_length=cfg.train.group_by_length, rank=run.rank, world=run.world, max_forward_tokens=forward_tokens(cfg) // 2,
                      collate=lambda bins: collate_pairs(bins, tok.pad_token_id, share))
    loss = PreferenceLoss(model, cfg, frozen)
    return Job(model=model, loss=loss, batcher=batcher,
               evaluate=Evaluation(cfg, loss, eval_ex, tok.pad_token_id, share) if eval_ex else None,
               finish=Finish(cfg, tok, eval_ex, base_accuracy, trainable, total, len(train_ex)),
               units_name="pairs", state={"base_accuracy": base_accuracy})


def prompt_sharing(cfg: Config, models: list, examples: list[PairExample]) -> bool:
    """data.share_prefix: each pair's prompt computed once for both replies, where that is exact for
    the policy and the reference (sftkit_sdpa on a CPU, checked numerically); logged either way."""
    if not cfg.data.share_prefix:
        return False
    sides = [e.chosen for e in examples[:32]] + [e.rejected for e in examples[:32]]
    why_not = shared_layout_problem(models, sides)
    if why_not:
        log(f"shared prompts: off, {why_not}")
        return False
    log("shared prompts: each pair's prompt is computed once for both replies (one packed row per pass)")
    return True


def load_reference(name: str, dtype: str, tok=None) -> torch.nn.Module:
    """preference.reference: a model name or directory, or a run directory (its final model); refused
    when its tokenizer is not the policy's `tok` (log-probs of one text must be of the same tokens)."""
    given, name = name, final_model(name)
    try:  # a model folder saved without its tokenizer is checked by its output width below
        ref_tok = load_tokenizer(name) if tok is not None else None
    except (OSError, ValueError, ConfigError):
        ref_tok = None
    if ref_tok is not None:
        difference = tokenizer_difference(tok, ref_tok)
        if difference:
            raise ConfigError(f"preference.reference {given}: its tokenizer is not the policy's: {difference}; the "
                              "reference must score the same tokens (use a model of the same family, or unset it "
                              "to use the starting model)")
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve(name), dtype=pick_dtype(dtype))
    except OSError as e:
        raise hub_error(name, e) from None
    head = model.get_output_embeddings()
    if tok is not None and head is not None and head.weight.shape[0] < len(tok):
        raise ConfigError(f"preference.reference {given}: it scores {head.weight.shape[0]} tokens, the policy's tokenizer "
                          f"has {len(tok)}; the reference must score the same tokens")
    return model.eval().requires_grad_(False)


def enable_checkpointing(model) -> None:
    """train.checkpointing: recompute each layer's activations in backward instead of keeping them."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    log("train.checkpointing: activations recomputed in backward (less memory, ~30% more compute)")


@torch.no_grad()
def precompute(model, examples: list[PairExample], pad_id: int, device, batch_size: int, share: bool = False) -> None:
    """The reference's log-probs of every pair, once: the step then runs one model pass, not two."""
    was = model.training
    model.eval()
    for b in range(0, len(examples), batch_size):
        part = examples[b : b + batch_size]
        logps = sequence_logps(model, _on(collate_pairs([[p] for p in part], pad_id, share), device))[0].double().cpu()
        for p, c, r in zip(part, logps[: len(part)].tolist(), logps[len(part):].tolist()):
            p.ref = (c, r)
    model.train(was)


@torch.no_grad()
def preference_accuracy(model, examples: list[PairExample], pad_id: int, device, batch_size: int,
                        share: bool = False) -> float:
    """Share of pairs whose chosen reply the model finds more likely (summed log-prob) than the rejected."""
    was = model.training
    model.eval()
    right = 0
    for b in range(0, len(examples), batch_size):
        part = examples[b : b + batch_size]
        batch = _on(collate_pairs([[p] for p in part], pad_id, share), device, drop=("ref_logps",))
        pc, pr = sequence_logps(model, batch)[0].chunk(2)
        right += int((pc > pr).sum())
    model.train(was)
    return right / max(len(examples), 1)


class Evaluation:
    """Held-out preference loss, rewards and accuracy, as in training."""

    def __init__(self, cfg, loss, examples, pad_id, share: bool = False):
        self.cfg, self.loss, self.examples, self.pad_id, self.share = cfg, loss, examples, pad_id, share

    @torch.no_grad()
    def __call__(self, scorer, state: dict | None = None) -> dict:
        was = self.loss.training
        self.loss.eval()
        device = next(self.loss.model.parameters()).device
        sums: dict[str, float] = {}
        bs = self.cfg.train.batch_size
        for b in range(0, len(self.examples), bs):
            batch = collate_pairs([[p] for p in self.examples[b : b + bs]], self.pad_id, self.share)
            loss, _, metrics = self.loss(**_on(batch, device))
            for k, v in {"eval_loss": loss, **{f"eval_{k}": m for k, m in metrics.items()}}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        self.loss.train(was)
        return {k: v / len(self.examples) for k, v in sums.items()}


class Finish:
    def __init__(self, cfg, tok, eval_ex, base_accuracy, trainable, total, n_train):
        self.cfg, self.tok, self.eval_ex, self.base_accuracy = cfg, tok, eval_ex, base_accuracy
        self.trainable, self.total, self.n_train = trainable, total, n_train

    def __call__(self, model, run: Run, sharded_module, result: RunResult, state: dict) -> dict:
        tuned = preference_accuracy(model, self.eval_ex, self.tok.pad_token_id, run.device, self.cfg.train.batch_size) \
            if self.eval_ex else None
        model = save_final(model, self.tok, self.cfg, run.dir, run.main, sharded_module)
        result.model = model
        base = state.get("base_accuracy")
        result.scores = {k: v for k, v in (("base", base), ("tuned", tuned)) if v is not None}
        result.metric = "preference_accuracy"
        if result.scores:
            log("held-out preference accuracy (chosen more likely than rejected): "
                + ", ".join(f"{k} {v:.3f}" for k, v in result.scores.items()))
        return {"metric": "preference_accuracy", "scores": result.scores, "method": self.cfg.peft.method,
                "loss": self.cfg.preference.loss, "beta": self.cfg.preference.beta,
                "trainable_parameters": self.trainable, "total_parameters": self.total, "train_pairs": self.n_train}

    @staticmethod
    def after_summary(run_dir: Path) -> None:
        """report.md: the held-out preference accuracy of the starting and the tuned model side by side."""
        summary = json.loads((run_dir / "summary.json").read_text())
        scores = summary.get("scores") or {}
        lines = [f"# {run_dir.name}: preference optimisation ({summary.get('loss')}, beta {summary.get('beta')})", "",
                 f"{summary['steps']} steps, {summary.get('train_pairs')} training pairs, method {summary['method']}; "
                 f"stopped: {summary['stopped']}; final weights: {summary['final_weights']}.", ""]
        if scores:
            lines += ["Held-out preference accuracy (the chosen reply more likely than the rejected one):", "",
                      "| model | preference accuracy |", "|---|---|",
                      *[f"| {'starting model' if k == 'base' else 'tuned'} | {v:.3f} |" for k, v in scores.items()], ""]
        if summary.get("eval_loss") is not None:
            lines.append(f"Held-out preference loss: {summary['eval_loss']:.4f}.")
        lines.append("Curves: plots/loss.png; every step's rewards/* and logps/*: metrics.jsonl.")
        (run_dir / "report.md").write_text("\n".join(lines) + "\n")
        write_card(run_dir)  # the final model's (and adapter's) card
