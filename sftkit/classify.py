"""Classification fine-tuning: a classifier head on a language model or an encoder (`task: classification`).

Rows are `text` + `label`; the label set is read from the training data and saved in the model's
config (id2label), so plain `AutoModelForSequenceClassification` loads the result. Methods:
  head    backbone frozen, only the new head trains. The backbone's features are computed once
          and cached, so every epoch after the first costs almost nothing.
  freeze  the head plus what peft.trainable selects (last:N layers, name globs)
  lora    LoRA adapters on the backbone, the head trained in full (merged at the end)
  full    every weight
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import Config, ConfigError, save_config
from .data.sources import DataError, read_source
from .evaluate import classification_report
from .models import count_parameters, resolve, select_parameters


@dataclass
class LabelledText:
    text: str
    label: str
    source: str
    line: int


@dataclass
class ClassifyResult:
    run_dir: Path
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    report: dict | None = None
    model: torch.nn.Module | None = None
    seconds: float = 0.0


# -- data -----------------------------------------------------------------------------------------
def read_labelled(source: str, columns: dict[str, str], on_error: str = "error") -> tuple[list[LabelledText], Counter]:
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


# -- model ----------------------------------------------------------------------------------------
def load_classifier(name: str, labels: list[str], dtype: torch.dtype = torch.float32, revision: str | None = None):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .models import _hub_error

    path = resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)}, dtype=dtype, revision=revision, output_loading_info=True)
    except OSError as e:
        raise _hub_error(name, e) from None
    except ValueError as e:  # a model type without a sequence-classification class
        raise ConfigError(f"model.name {name!r} cannot be a classifier: {str(e).splitlines()[0][:300]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id  # decoders pool at the last token that is not padding
    return model, tok, set(info["missing_keys"])


def split_head(model) -> tuple[torch.nn.Module, str]:
    """The model's new head and how its features are pooled: `last` token (decoders) or `pooler` (BERT-like)."""
    if hasattr(model, "score"):
        return model.score, "last"
    if hasattr(model, "classifier") and getattr(model.base_model, "pooler", None) is not None:
        return model.classifier, "pooler"
    raise ConfigError(f"peft.method=head supports decoder (score head) and BERT-like (pooler + classifier) models, "
                      f"not {type(model).__name__}; use freeze, lora or full")


def features(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the head sees, computed by the backbone alone."""
    _, pooling = split_head(model)
    out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if pooling == "pooler":
        return out.pooler_output
    last = batch["attention_mask"].sum(-1) - 1  # right padding: the last real token
    return out.last_hidden_state[torch.arange(last.shape[0]), last]


def head_logits(model, feats: torch.Tensor) -> torch.Tensor:
    head, pooling = split_head(model)
    if pooling == "pooler":
        return head(model.dropout(feats))  # as BertForSequenceClassification does
    return head(feats)


def select_trainable(model, method: str, new_keys: set[str], trainable: list[str], peft_cfg):
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method in ("head", "freeze"):
        head, _ = split_head(model) if method == "head" else (None, None)
        selected = {n for n, _ in model.named_parameters() if n in new_keys}
        if head is not None:
            selected |= {n for n, p in model.named_parameters() if any(p is q for q in head.parameters())}
        if method == "freeze":
            if not trainable:
                raise ConfigError("peft.method=freeze needs peft.trainable, e.g. [last:2] or ['*.layer.5.*']")
            selected |= select_parameters(model, trainable)
        for n, p in model.named_parameters():
            p.requires_grad_(n in selected)
        return model
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=peft_cfg.r, lora_alpha=peft_cfg.alpha, lora_dropout=peft_cfg.dropout,
                                                target_modules=peft_cfg.target_modules, task_type="SEQ_CLS"))
    raise ConfigError(f"peft.method: {method!r} is not one of head, freeze, lora, full (task: classification)")


# -- training -------------------------------------------------------------------------------------
def encode(tok, rows: list[LabelledText], max_length: int, truncation: str = "truncate") -> tuple[list, list, int]:
    """Token ids of the rows within max_length by data.truncation: (kept rows, their ids, rows dropped)."""
    from .data.render import TRUNCATION

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
          "peft.dora", "train.grad_accum", "train.save_every", "train.max_forward_tokens", "train.group_by_length",
          "train.kl_to_base", "train.checkpointing", "eval.generate", "eval.metric", "eval.compare_base",
          "eval.max_new_tokens", "eval.limit")


def check_keys(cfg: Config) -> None:
    """Each key set for a classification run is used as in SFT, or the run stops here, naming it."""
    import os

    from .config import _flatten_all

    now, default = _flatten_all(cfg.to_dict()), _flatten_all(Config().to_dict())
    unused = [k for k in UNUSED if now[k] != default[k]]
    if unused:
        raise ConfigError(f"task: classification does not use {', '.join(unused)} (set to "
                          f"{', '.join(repr(now[k]) for k in unused)}); remove them from the config"
                          + ("; checkpoints and --resume are not built for classification yet"
                             if "train.save_every" in unused else ""))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("task: classification runs in one process: --nproc / torchrun would train the same "
                          "model N times into one directory")


def collate(ids: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


@torch.no_grad()
def cache_features(model, ids: list[list[int]], pad_id: int, batch_size: int, desc: str) -> torch.Tensor:
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[torch.Tensor | None] = [None] * len(ids)
    for b in tqdm(range(0, len(order), batch_size), desc=desc, file=sys.stderr, leave=False):
        idx = order[b : b + batch_size]
        f = features(model, collate([ids[i] for i in idx], pad_id, next(model.parameters()).device))
        for j, i in enumerate(idx):
            out[i] = f[j]
    return torch.stack(out)


def class_weights(spec, rows: list[LabelledText], labels: list[str]) -> torch.Tensor | None:
    if spec in (None, "none"):
        return None
    counts = Counter(r.label for r in rows)
    if spec == "auto":  # inverse frequency, mean weight 1
        return torch.tensor([len(rows) / (len(labels) * max(counts[n], 1)) for n in labels], dtype=torch.float32)
    if isinstance(spec, list) and len(spec) == len(labels):
        return torch.tensor([float(w) for w in spec], dtype=torch.float32)
    raise ConfigError(f"classify.class_weights: expected none, auto or a list of {len(labels)} numbers ({labels})")


def train_classifier(cfg: Config, overwrite: bool = False, cache: bool = True) -> ClassifyResult:
    from .models import pick_dtype
    from .report import MetricsLog
    from .trainer import (
        TrainingError,
        cap_max_length,
        check_precision,
        log,
        lr_lambda,
        prepare_run_dir,
        require_loggers,
    )

    t0 = time.time()
    if not isinstance(cfg.data.train, str):
        raise ConfigError("task: classification takes one data.train source")
    check_keys(cfg)
    check_precision(cfg)
    require_loggers(cfg)
    run_dir = prepare_run_dir(cfg.output_dir, overwrite, resume=False)
    save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed)
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

    model, tok, new_keys = load_classifier(cfg.model.name, labels, pick_dtype(cfg.model.dtype), cfg.model.revision)
    cap_max_length(cfg, model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    method = cfg.peft.method
    model = select_trainable(model, method, new_keys, cfg.peft.trainable, cfg.peft)
    trainable, total = count_parameters(model)
    log(f"method {method}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")
    pad = tok.pad_token_id
    train_rows, train_ids, n_drop = encode(tok, train_rows, cfg.data.max_length, cfg.data.truncation)
    eval_rows, eval_ids, n_drop_eval = encode(tok, eval_rows, cfg.data.max_length, cfg.data.truncation)
    if n_drop or n_drop_eval:
        log(f"dropped {n_drop} training and {n_drop_eval} held-out rows longer than data.max_length="
            f"{cfg.data.max_length} (data.truncation=drop)")
    if not train_rows:
        raise DataError(f"{cfg.data.train}: no training row left (all longer than data.max_length)")
    y_train = torch.tensor([labels.index(r.label) for r in train_rows], device=device)
    y_eval = torch.tensor([labels.index(r.label) for r in eval_rows], device=device)
    weights = class_weights(cfg.classify.class_weights, train_rows, labels)
    weights = weights.to(device) if weights is not None else None

    use_cache = method == "head" and cache
    if use_cache:
        # The frozen backbone gives the same features every epoch: compute them once.
        train_feats = cache_features(model, train_ids, pad, cfg.eval.batch_size, "features (train)")
        eval_feats = cache_features(model, eval_ids, pad, cfg.eval.batch_size, "features (eval)") if eval_rows else None

    def logits_for(idx: list[int], ids, feats) -> torch.Tensor:
        if feats is not None:
            return head_logits(model, feats[idx])
        if method == "head":
            with torch.no_grad():
                model.base_model.eval()
                f = features(model, collate([ids[i] for i in idx], pad, device))
            return head_logits(model, f)
        return model(**collate([ids[i] for i in idx], pad, device)).logits

    def evaluate() -> tuple[dict, dict]:
        model.eval()
        preds, loss = [], 0.0
        with torch.no_grad():
            for b in range(0, len(eval_rows), cfg.eval.batch_size):
                idx = list(range(b, min(b + cfg.eval.batch_size, len(eval_rows))))
                lg = logits_for(idx, eval_ids, eval_feats if use_cache else None).float()
                loss += float(F.cross_entropy(lg, y_eval[idx], weight=weights, reduction="sum"))
                preds += lg.argmax(-1).tolist()
        model.train()
        if method == "head":
            model.base_model.eval()  # the frozen backbone stays without dropout
        rep = classification_report([labels[p] for p in preds], [r.label for r in eval_rows])
        return {"eval_loss": loss / len(eval_rows), "accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"]}, rep

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    bs = cfg.train.batch_size
    steps_per_epoch = math.ceil(len(train_rows) / bs)
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else math.ceil(cfg.train.epochs * steps_per_epoch)
    warmup = cfg.train.warmup_steps or round(cfg.train.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup, cfg.train.schedule,
                                                                        cfg.train.min_lr_ratio))
    better = (lambda a, b: a > b + cfg.train.min_delta) if cfg.classify.metric == "macro_f1" else \
        (lambda a, b: a < b - cfg.train.min_delta)
    if cfg.classify.metric not in ("macro_f1", "eval_loss"):
        raise ConfigError(f"classify.metric: {cfg.classify.metric!r} is not macro_f1 or eval_loss")
    best, best_state, bad, bad_steps = None, None, 0, 0
    metrics = MetricsLog(run_dir, cfg, 0)
    model.train()
    if method == "head":
        model.base_model.eval()  # frozen: no dropout, so features stay what the cache holds
    step = 0
    bar = tqdm(total=total_steps, desc="train", file=sys.stderr)
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(cfg.train.seed + epoch)).tolist()
        idx = order[offset * bs : (offset + 1) * bs]
        lg = logits_for(idx, train_ids, train_feats if use_cache else None).float()
        loss = F.cross_entropy(lg, y_train[idx], weight=weights)
        loss.backward()
        max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        record = {"step": step + 1, "loss": float(loss), "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm}
        if math.isfinite(record["loss"]) and math.isfinite(grad_norm):
            optimizer.step()
            scheduler.step()
            bad_steps = 0
        else:  # as in SFT: a NaN/inf never reaches the weights and is never reported as a number
            bad_steps += 1
            record.update(loss=None, grad_norm=None, skipped="non-finite loss or gradient")
            log(f"step {step + 1}: non-finite loss or gradient, update skipped ({bad_steps} in a row, limit "
                f"train.max_bad_steps={cfg.train.max_bad_steps})")
        optimizer.zero_grad(set_to_none=True)
        if bad_steps > cfg.train.max_bad_steps:
            metrics.write(record)
            metrics.close()
            raise TrainingError(f"{bad_steps} consecutive steps with a non-finite loss or gradient (last at step "
                                f"{step + 1}); lower train.lr, check the data, or keep train.max_grad_norm on")
        step += 1
        last = step == total_steps
        stop = False
        if eval_rows and ((cfg.train.eval_every and step % cfg.train.eval_every == 0) or last):
            ev, _ = evaluate()
            record.update(ev)
            value = ev[cfg.classify.metric]
            if best is None or better(value, best):
                best, bad = value, 0
                best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                record["best"] = True
            else:
                bad += 1
                stop = cfg.train.patience > 0 and bad >= cfg.train.patience
        metrics.write(record)
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k in ("loss", "eval_loss", "macro_f1") and v is not None},
                        refresh=False)
        bar.update(1)
        if stop:
            log(f"early stopping: {cfg.classify.metric} has not improved for {cfg.train.patience} evals")
            break
    bar.close()
    metrics.close()
    if best_state is not None:  # the final model is the best one by classify.metric
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in best_state:
                    p.copy_(best_state[n])
    result = ClassifyResult(run_dir=run_dir, steps=step)
    if eval_rows:
        result.metrics, result.report = evaluate()
        majority = max(Counter(r.label for r in eval_rows).values()) / len(eval_rows)
        result.metrics["majority_baseline_accuracy"] = majority
        maj_label = Counter(r.label for r in train_rows).most_common(1)[0][0]
        result.metrics["majority_baseline_macro_f1"] = classification_report(
            [maj_label] * len(eval_rows), [r.label for r in eval_rows])["macro_f1"]
        plot_confusion(result.report, run_dir / "confusion.png")
        (run_dir / "eval.json").write_text(json.dumps({"metrics": result.metrics, "classification": result.report}, indent=1))
    if method == "lora":
        model = model.merge_and_unload()
    model.eval()
    model.save_pretrained(run_dir / "final" / "model")
    tok.save_pretrained(run_dir / "final" / "model")
    result.model, result.seconds = model, time.time() - t0
    return result


def plot_confusion(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(report["per_class"])
    cols = report["labels"]
    m = report["confusion"]
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2, 1.0 * len(rows) + 1.5))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    top = max(max(r) for r in m) or 1
    for i, r in enumerate(m):
        for j, v in enumerate(r):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def format_report(metrics: dict, report: dict) -> str:
    lines = [f"{k:<28} {v:.4f}" for k, v in metrics.items()]
    lines.append("")
    lines.append(f"{'class':<16}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
    for name, v in report["per_class"].items():
        lines.append(f"{name:<16}{v['precision']:>10.3f}{v['recall']:>10.3f}{v['f1']:>10.3f}{v['support']:>9}")
    lines.append("\nconfusion (rows = reference, columns = predicted: " + ", ".join(report["labels"]) + ")")
    for name, row in zip(report["per_class"], report["confusion"]):
        lines.append(f"  {name:<14}" + "".join(f"{x:>7}" for x in row))
    return "\n".join(lines)


@torch.no_grad()
def predict(run_or_model: str, input_path: str, output_path: str, columns: dict[str, str] | None = None,
            batch_size: int = 32, max_length: int = 512) -> int:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    p = Path(run_or_model)
    path = p / "final" / "model" if (p / "final" / "model").is_dir() else Path(resolve(run_or_model))
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    text_col = (columns or {}).get("text", "text")
    rows = []
    for line, obj in read_source(input_path):
        if isinstance(obj, DataError):
            raise obj
        if not isinstance(obj.get(text_col), str):
            raise DataError(f"{input_path}:{line}: {text_col}: missing or not text")
        rows.append(obj)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    with open(output_path, "w", encoding="utf-8") as f:
        for b in range(0, len(rows), batch_size):
            chunk = rows[b : b + batch_size]
            ids = [tok(r[text_col], truncation=True, max_length=max_length)["input_ids"] for r in chunk]
            probs = model(**collate(ids, tok.pad_token_id or 0)).logits.float().softmax(-1)
            for r, pr in zip(chunk, probs):
                f.write(json.dumps({**r, "predicted": names[int(pr.argmax())],
                                    "probabilities": {n: round(float(x), 6) for n, x in zip(names, pr)}}) + "\n")
    return len(rows)
