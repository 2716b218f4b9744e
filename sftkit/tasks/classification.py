"""task: classification — text + label rows, a classifier head on a decoder or an encoder; loss is
the (class-weighted) cross-entropy summed over rows; the best eval by classify.metric is the final
model, saved as a plain AutoModelForSequenceClassification with its label names (the model side:
sftkit/classifier.py; here, the rows and the training job).

With `peft.method: head` the backbone is frozen and gives the same features every epoch: they are
computed once, and the batches carry them instead of token ids.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..classifier import (
    cache_features,
    classify,
    collate,
    features,
    head_logits,
    load_classifier,
    plot_confusion,
    select_trainable,
)
from ..config import Config, ConfigError, flatten_all
from ..data.packing import Batcher
from ..data.quality import analyse, percentile, quality_summary
from ..data.render import TRUNCATION
from ..data.sources import DataError, Row, read_source, source_files
from ..export import write_card
from ..job import Job, Run, RunResult, cap_max_length, log
from ..metrics import classification_report
from ..models import count_parameters, pick_dtype


# -- rows ------------------------------------------------------------------------------------------
@dataclass
class LabelledText:
    text: str
    label: str
    source: str
    line: int


def read_labelled(source: str, columns: dict[str, str], on_error: str = "error") -> tuple[list[LabelledText], Counter]:
    files = source_files(source)
    if files != [source]:  # a folder of data files: each read on its own, so messages name the file
        parts = [read_labelled(f, columns, on_error) for f in files]
        return [r for rows, _ in parts for r in rows], sum((c for _, c in parts), Counter())
    text_col, label_col = columns.get("text", "text"), columns.get("label", "label")
    rows, skipped = [], Counter()
    for line, obj in read_source(source):
        try:
            if isinstance(obj, DataError):
                raise obj
            for col in (text_col, label_col):
                if col not in obj:
                    raise DataError(f"{source}:{line}: {col}: missing field (the row has {', '.join(sorted(obj))})",
                                    "missing field")
            text, label = obj[text_col], obj[label_col]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{source}:{line}: {text_col}: expected non-empty text", "empty text")
            if isinstance(label, bool) or not isinstance(label, (str, int)) or (isinstance(label, str) and not label.strip()):
                raise DataError(f"{source}:{line}: {label_col}: expected a string or integer label, got {label!r}",
                                "bad label")
            rows.append(LabelledText(text, str(label).strip(), source, line))
        except DataError as e:
            if on_error != "skip":
                raise
            skipped[e.reason] += 1
    if not rows:
        raise DataError(f"{source}: no rows")
    return rows, skipped


def label_names(rows: list[LabelledText]) -> list[str]:
    names = sorted({r.label for r in rows})
    return sorted(names, key=int) if all(n.lstrip("-").isdigit() for n in names) else names


def stratified_split(rows: list[LabelledText], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out `fraction` of each class (at least one where a class has two or more rows)."""
    rng = random.Random(seed)
    by_class: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_class.setdefault(r.label, []).append(i)
    held: set[int] = set()
    for idx in by_class.values():
        rng.shuffle(idx)
        n = round(fraction * len(idx)) or (1 if len(idx) > 1 else 0)
        held.update(idx[:n])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def encode(tok, rows: list[LabelledText], max_length: int, truncation: str = "truncate") -> tuple[list, list, int]:
    """Token ids of the rows within max_length by data.truncation: (kept rows, their ids, rows dropped)."""
    if truncation not in TRUNCATION:
        raise DataError(f"data.truncation: {truncation!r} is not one of {', '.join(TRUNCATION)}")
    kept, ids, dropped = [], [], 0
    for r in rows:
        full = tok(r.text)["input_ids"]
        if len(full) > max_length and truncation == "error":
            raise DataError(f"{r.source}:{r.line}: text: {len(full)} tokens, longer than data.max_length={max_length} "
                            "(data.truncation=error)", "longer than max_length")
        if len(full) > max_length and truncation == "drop":
            dropped += 1
            continue
        kept.append(r)
        ids.append(full if len(full) <= max_length else tok(r.text, truncation=True, max_length=max_length)["input_ids"])
    return kept, ids, dropped


# Keys that mean nothing for a classifier: setting one stops the run rather than being ignored.
UNUSED = ("data.format", "data.pack", "data.mask", "data.template", "data.system", "data.replay", "peft.rslora",
          "peft.dora", "train.max_forward_tokens", "train.kl_to_base", "train.distill.teacher", "train.checkpointing",
          "train.neftune_alpha",
          "eval.generate",
          "eval.metric", "eval.compare_base", "eval.max_new_tokens", "eval.limit")


def check_keys(cfg: Config) -> None:
    """Each key set for a classification run is used as in SFT, or the run stops here, naming it."""
    now, default = flatten_all(cfg.to_dict()), flatten_all(Config().to_dict())
    unused = [k for k in UNUSED if now[k] != default[k]]
    if unused:
        raise ConfigError(f"task: classification does not use {', '.join(unused)} (set to "
                          f"{', '.join(repr(now[k]) for k in unused)}); remove them from the config")


def class_weights(spec, rows: list[LabelledText], labels: list[str]) -> torch.Tensor | None:
    if spec in (None, "none"):
        return None
    counts = Counter(r.label for r in rows)
    if spec == "auto":  # inverse frequency, mean weight 1
        return torch.tensor([len(rows) / (len(labels) * max(counts[n], 1)) for n in labels], dtype=torch.float32)
    if isinstance(spec, list) and len(spec) == len(labels):
        return torch.tensor([float(w) for w in spec], dtype=torch.float32)
    raise ConfigError(f"classify.class_weights: expected none, auto or a list of {len(labels)} numbers ({labels})")



def inspect(cfg: Config, tok, embeddings: bool = True) -> str:
    """`sftkit data inspect` for classification rows: counts per label, lengths, and the quality checks."""
    rows, skipped = read_labelled(cfg.data.train, cfg.data.columns, cfg.data.on_error)
    counts = Counter(r.label for r in rows)
    lengths = [len(x) for x in tok([r.text for r in rows], add_special_tokens=False)["input_ids"]]
    lines = [f"train: {len(rows)} rows" + (f", skipped {dict(skipped)}" if skipped else "") + "; labels: "
             + ", ".join(f"{k} {v} ({v / len(rows):.0%})" for k, v in counts.most_common()),
             f"tokens per text: p50 {percentile(lengths, 50)}, p90 {percentile(lengths, 90)}, max {max(lengths)}; "
             f"{sum(n > cfg.data.max_length for n in lengths)} longer than data.max_length={cfg.data.max_length}"]
    as_rows = [Row([], r.source, r.line, "text", text=r.text) for r in rows]
    tests = []
    if cfg.data.eval:
        tests = [Row([], r.source, r.line, "text", text=r.text) for r in read_labelled(cfg.data.eval, cfg.data.columns)[0]]
    q = analyse(as_rows, tests, tok, cfg.data.max_length, diversity=embeddings, labels=[r.label for r in rows])
    return "\n".join(lines) + "\n\n" + quality_summary(q, as_rows, tests)


# -- training --------------------------------------------------------------------------------------


@dataclass
class Item:
    """One training row as the batcher sees it: token ids (for lengths and batches), label, index."""

    input_ids: list[int]
    label: int
    index: int


class ClassifierLoss(torch.nn.Module):
    """The classifier and its loss as one module (DDP hooks `forward`): returns the class-weighted
    cross-entropy summed over the rows, the rows' total weight (the units the loop divides by: the
    step's loss is then the weighted mean, as F.cross_entropy(weight=...) gives it), and the rows
    predicted right."""

    def __init__(self, model: torch.nn.Module, weights: torch.Tensor | None, head_only: bool):
        super().__init__()
        self.model = model
        self.head_only = head_only
        self.register_buffer("weights", weights if weights is not None else None, persistent=False)

    def logits(self, input_ids=None, attention_mask=None, features=None) -> torch.Tensor:
        if features is not None:  # cached backbone features (peft.method: head)
            return head_logits(self.model, features)
        if self.head_only:
            with torch.no_grad():
                f = _features(self.model, input_ids, attention_mask)
            return head_logits(self.model, f)
        return classify(self.model, input_ids, attention_mask)

    def forward(self, labels, input_ids=None, attention_mask=None, features=None):
        logits = self.logits(input_ids, attention_mask, features).float()
        ce = F.cross_entropy(logits, labels, weight=self.weights, reduction="sum")
        units = self.weights[labels].sum() if self.weights is not None else torch.tensor(float(len(labels)))
        return ce, units, (logits.argmax(-1) == labels).sum()


def _features(model, input_ids, attention_mask):
    model.base_model.eval()  # frozen: no dropout, so features are what the cache would hold
    return features(model, {"input_ids": input_ids, "attention_mask": attention_mask})


# Each method's learning rate and epochs where the user set none: the SFT defaults (2e-4, one epoch)
# leave a new head on cached features far from converged (a 3-class topic set: 0.45 accuracy at the
# SFT defaults, 1.00 at these), and are too high for full fine-tuning of an encoder.
METHOD_DEFAULTS = {
    "head": ({"lr": 1e-2, "epochs": 20.0}, "the backbone's features are computed once, so an epoch costs almost nothing"),
    "lora": ({"lr": 5e-4, "epochs": 3.0}, "LoRA on the backbone, the new head in full"),
    "freeze": ({"lr": 1e-4, "epochs": 3.0}, "the selected layers and the head"),
    "full": ({"lr": 5e-5, "epochs": 3.0}, "every weight: the usual encoder fine-tuning rate"),
}


def apply_method_defaults(cfg: Config) -> None:
    """train.lr and train.epochs for peft.method where the config left them unset; said in the log."""
    defaults, why = METHOD_DEFAULTS.get(cfg.peft.method, ({}, ""))
    chosen = {k: v for k, v in defaults.items() if f"train.{k}" not in cfg.given
              and not (k == "epochs" and "train.max_steps" in cfg.given)}
    for k, v in chosen.items():
        setattr(cfg.train, k, v)
    if chosen:
        log(f"task: classification, peft.method={cfg.peft.method}: " + ", ".join(f"train.{k}={v:g}" for k, v in chosen.items())
            + f" ({why}; set them to choose others)")


def check(cfg: Config) -> None:
    """Before anything is written: keys this task does not use, and its own settings."""
    if not isinstance(cfg.data.train, str):
        raise ConfigError("task: classification takes one data.train source")
    check_keys(cfg)
    if cfg.classify.metric not in ("macro_f1", "eval_loss"):
        raise ConfigError(f"classify.metric: {cfg.classify.metric!r} is not macro_f1 or eval_loss")
    apply_method_defaults(cfg)


def prepare(cfg: Config, run: Run, cache: bool = True) -> Job:
    train_rows, skipped = read_labelled(cfg.data.train, cfg.data.columns, cfg.data.on_error)
    if cfg.data.eval:
        eval_rows, more = read_labelled(cfg.data.eval, cfg.data.columns, cfg.data.on_error)
        skipped += more
    elif cfg.data.eval_fraction > 0:
        train_rows, eval_rows = stratified_split(train_rows, cfg.data.eval_fraction, cfg.train.seed)
    else:
        eval_rows = []
    labels = label_names(train_rows)
    if len(labels) < 2:
        raise ConfigError(f"{cfg.data.train}: classification needs at least two labels, found {labels}")
    unknown = sorted({r.label for r in eval_rows} - set(labels))
    if unknown:
        raise DataError(f"eval data has labels never seen in training: {unknown}")
    counts = Counter(r.label for r in train_rows)
    log(f"{len(train_rows)} training rows, {len(eval_rows)} held out; labels: "
        + ", ".join(f"{n} ({counts[n]})" for n in labels) + (f"; skipped: {dict(skipped)}" if skipped else ""))

    log(f"loading model {cfg.model.name}")
    model, tok, new_keys = load_classifier(cfg.model.name, labels, pick_dtype(cfg.model.dtype), cfg.model.revision,
                                          cfg.classify.pooling)
    cap_max_length(cfg, model)
    model.to(run.device)
    torch.manual_seed(cfg.train.seed)  # a reproducible LoRA init
    model = select_trainable(model, cfg.peft.method, new_keys, cfg.peft.trainable, cfg.peft)
    trainable, total = count_parameters(model)
    log(f"method {cfg.peft.method}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")
    train_rows, train_ids, n_drop = encode(tok, train_rows, cfg.data.max_length, cfg.data.truncation)
    eval_rows, eval_ids, n_drop_eval = encode(tok, eval_rows, cfg.data.max_length, cfg.data.truncation)
    if n_drop or n_drop_eval:
        log(f"dropped {n_drop} training and {n_drop_eval} held-out rows longer than data.max_length="
            f"{cfg.data.max_length} (data.truncation=drop)")
    if not train_rows:
        raise DataError(f"{cfg.data.train}: no training row left (all longer than data.max_length)")
    weights = class_weights(cfg.classify.class_weights, train_rows, labels)
    head_only = cfg.peft.method == "head"
    pad = tok.pad_token_id
    # The frozen backbone gives the same features every epoch: compute them once (every process the same).
    train_feats = cache_features(model, train_ids, pad, cfg.eval.batch_size, "features (train)") \
        if head_only and cache else None
    eval_feats = cache_features(model, eval_ids, pad, cfg.eval.batch_size, "features (eval)") \
        if head_only and cache and eval_rows else None
    items = [Item(ids, labels.index(r.label), i) for i, (ids, r) in enumerate(zip(train_ids, train_rows))]

    def collate_rows(bins: list[list[Item]]) -> dict:
        rows = [b[0] for b in bins]
        y = torch.tensor([r.label for r in rows], device=run.device)
        if train_feats is not None:
            return {"features": train_feats[[r.index for r in rows]], "labels": y}
        batch = collate([r.input_ids for r in rows], pad, run.device)
        return {**batch, "labels": y, "real_tokens": batch["attention_mask"].sum().cpu()}

    batcher = Batcher(items, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seed, pad,
                      group_by_length=not head_only, rank=run.rank, world=run.world, collate=collate_rows)
    loss = ClassifierLoss(model, weights.to(run.device) if weights is not None else None, head_only)
    evaluation = Evaluation(cfg, loss, eval_rows, eval_ids, eval_feats, labels, pad, run.device) if eval_rows else None

    def train_mode() -> None:
        if head_only:
            model.base_model.eval()  # frozen: no dropout, so features stay what the cache holds

    return Job(model=model, loss=loss, batcher=batcher, evaluate=evaluation,
               finish=Finish(cfg, tok, evaluation, train_rows, eval_rows, labels, trainable, total),
               select=cfg.classify.metric, maximize=cfg.classify.metric == "macro_f1", final_is_best=True,
               train_mode=train_mode, units_name="rows", progress=("eval_loss", "macro_f1"))


class Evaluation:
    """Held-out loss (class-weighted, as in training), accuracy and macro-F1, with the full report kept."""

    def __init__(self, cfg, loss, rows, ids, feats, labels, pad, device):
        self.cfg, self.loss, self.rows, self.ids, self.feats = cfg, loss, rows, ids, feats
        self.labels, self.pad, self.device = labels, pad, device
        self.report: dict | None = None

    @torch.no_grad()
    def __call__(self, scorer, state: dict | None = None) -> dict:
        loss_module = self.loss
        was = loss_module.training
        loss_module.eval()
        y = torch.tensor([self.labels.index(r.label) for r in self.rows], device=self.device)
        preds, total = [], 0.0
        bs = self.cfg.eval.batch_size
        for b in range(0, len(self.rows), bs):
            idx = list(range(b, min(b + bs, len(self.rows))))
            if self.feats is not None:
                lg = loss_module.logits(features=self.feats[idx])
            else:
                batch = collate([self.ids[i] for i in idx], self.pad, self.device)
                lg = loss_module.logits(batch["input_ids"], batch["attention_mask"])
            lg = lg.float()
            total += float(F.cross_entropy(lg, y[idx], weight=loss_module.weights, reduction="sum"))
            preds += lg.argmax(-1).tolist()
        loss_module.train(was)
        weight = float(loss_module.weights[y].sum()) if loss_module.weights is not None else len(self.rows)
        self.report = classification_report([self.labels[p] for p in preds], [r.label for r in self.rows])
        return {"eval_loss": total / weight, "accuracy": self.report["accuracy"], "macro_f1": self.report["macro_f1"]}


class Finish:
    """The final classifier (LoRA merged), saved with its tokenizer; the held-out report, majority
    baselines, confusion.png and eval.json."""

    def __init__(self, cfg, tok, evaluation, train_rows, eval_rows, labels, trainable, total):
        self.cfg, self.tok, self.evaluation = cfg, tok, evaluation
        self.train_rows, self.eval_rows, self.labels, self.trainable, self.total = train_rows, eval_rows, labels, trainable, total

    def __call__(self, model, run: Run, sharded_module, result: RunResult, state: dict) -> dict:
        if self.evaluation is not None:
            result.metrics = self.evaluation(None)  # the final (best) weights
            result.report = self.evaluation.report
            majority = max(Counter(r.label for r in self.eval_rows).values()) / len(self.eval_rows)
            result.metrics["majority_baseline_accuracy"] = majority
            top = Counter(r.label for r in self.train_rows).most_common(1)[0][0]
            result.metrics["majority_baseline_macro_f1"] = classification_report(
                [top] * len(self.eval_rows), [r.label for r in self.eval_rows])["macro_f1"]
        if self.cfg.peft.method == "lora":
            model = model.merge_and_unload()
        model.eval()
        result.model = model
        if run.main:
            if result.report is not None:
                plot_confusion(result.report, run.dir / "confusion.png")
                (run.dir / "eval.json").write_text(json.dumps({"metrics": result.metrics,
                                                               "classification": result.report}, indent=1))
            model.save_pretrained(run.dir / "final" / "model")
            self.tok.save_pretrained(run.dir / "final" / "model")
            log(f"saved {run.dir / 'final' / 'model'}")
        return {"method": self.cfg.peft.method, "labels": self.labels, "metrics": result.metrics,
                "trainable_parameters": self.trainable, "total_parameters": self.total,
                "train_examples": len(self.train_rows)}

    def after_summary(self, run_dir: Path) -> None:
        """The final model's card (eval.json and confusion.png are written with the model)."""
        write_card(run_dir)
