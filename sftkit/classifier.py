"""The classifier's model side (`task: classification`, `task: reward`): loading a model with a new
head, which parameters train for each method, the features a frozen backbone gives the head, and a
trained classifier used on new rows (predict), with its report and plots.

Methods:
  head    backbone frozen, only the new head trains. The backbone's features are computed once
          and cached, so every epoch after the first costs almost nothing.
  freeze  the head plus what peft.trainable selects (last:N layers, name globs)
  lora    LoRA adapters on the backbone, the head trained in full (merged at the end)
  full    every weight
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib
import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .config import ConfigError
from .data.sources import DataError, read_source
from .job import log
from .models import hub_error, resolve, select_parameters
from .rundir import final_model

POOLINGS = ("auto", "model", "mean")


def sentence_pooling(path: str) -> str | None:
    """How a sentence-transformers folder says its encoder was trained to pool (1_Pooling/config.json):
    "mean", or None where it says nothing or pools another way (its CLS token: the model's own class)."""
    try:
        modes = json.loads((Path(path) / "1_Pooling" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return "mean" if modes.get("pooling_mode_mean_tokens") else None


def load_classifier(name: str, labels: list[str], dtype: torch.dtype = torch.float32, revision: str | None = None,
                    pooling: str = "model"):
    """A model with a new head for `labels`. `pooling`: "model" pools as its transformers class does
    (a decoder's last real token, BERT's pooler over [CLS]); "mean" averages the last hidden states over
    the real tokens; "auto" is "mean" for a sentence encoder trained that way, else "model". A mean-pooled
    classifier says so in its config.json (`sftkit_pooling`), which sftkit's predict, eval and export read."""
    if pooling not in POOLINGS:
        raise ConfigError(f"classify.pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
    path = resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)}, dtype=dtype, revision=revision, output_loading_info=True)
    except OSError as e:
        raise hub_error(name, e) from None
    except ValueError as e:  # a model type without a sequence-classification class
        raise ConfigError(f"model.name {name!r} cannot be a classifier: {str(e).splitlines()[0][:300]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id  # decoders pool at the last token that is not padding
    if pooling == "auto":
        pooling = sentence_pooling(path) or "model"
        if pooling == "mean":
            log(f"{name}: a sentence encoder trained with mean pooling (its 1_Pooling/config.json): the head reads the "
                "mean of the last hidden states (classify.pooling=model for its class's own pooling)")
    if pooling == "mean":
        split_head(model)  # a model whose head sftkit cannot feed is refused here
        model.config.sftkit_pooling = "mean"
    return model, tok, set(info["missing_keys"])


def split_head(model) -> tuple[torch.nn.Module, str]:
    """The model's new head and how its features are pooled: `mean` (the config says so), else the
    model class's own: `last` token (decoders) or `pooler` (BERT-like)."""
    mean = getattr(model.config, "sftkit_pooling", None) == "mean"
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: its layers live inside
    if hasattr(model, "score"):
        return model.score, "mean" if mean else "last"
    if hasattr(model, "classifier") and getattr(model.base_model, "pooler", None) is not None:
        return model.classifier, "mean" if mean else "pooler"
    raise ConfigError(f"peft.method=head and classify.pooling=mean support decoder (score head) and BERT-like "
                      f"(pooler + classifier) models, not {type(model).__name__}; use freeze, lora or full with "
                      "classify.pooling=model")


def features(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the head sees, computed by the backbone alone."""
    _, pooling = split_head(model)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if pooling == "pooler":
        return out.pooler_output
    if pooling == "mean":
        mask = batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
        return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)
    last = batch["attention_mask"].sum(-1) - 1  # right padding: the last real token
    return out.last_hidden_state[torch.arange(last.shape[0]), last]


def head_logits(model, feats: torch.Tensor) -> torch.Tensor:
    head, _ = split_head(model)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(model, "classifier"):
        return head(model.dropout(feats))  # as BertForSequenceClassification does
    return head(feats)


def classify(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits: the model's own forward where it pools as trained, else its head on sftkit's features."""
    if getattr(model.config, "sftkit_pooling", None) == "mean":
        return head_logits(model, features(model, {"input_ids": input_ids, "attention_mask": attention_mask}))
    return model(input_ids=input_ids, attention_mask=attention_mask).logits


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
        return get_peft_model(model, LoraConfig(r=peft_cfg.r, lora_alpha=peft_cfg.alpha, lora_dropout=peft_cfg.dropout,
                                                target_modules=peft_cfg.target_modules, task_type="SEQ_CLS"))
    raise ConfigError(f"peft.method: {method!r} is not one of head, freeze, lora, full (task: classification)")


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


def plot_confusion(report: dict, out: Path) -> None:
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
    path = final_model(run_or_model)
    path = path if Path(path).is_dir() else resolve(run_or_model)
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
            probs = classify(model, **collate(ids, tok.pad_token_id or 0)).float().softmax(-1)
            for r, pr in zip(chunk, probs):
                f.write(json.dumps({**r, "predicted": names[int(pr.argmax())],
                                    "probabilities": {n: round(float(x), 6) for n, x in zip(names, pr)}}) + "\n")
    return len(rows)
