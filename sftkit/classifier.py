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
from .models import hub_error, resolve, select_parameters
from .rundir import final_model


def load_classifier(name: str, labels: list[str], dtype: torch.dtype = torch.float32, revision: str | None = None):
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
            probs = model(**collate(ids, tok.pad_token_id or 0)).logits.float().softmax(-1)
            for r, pr in zip(chunk, probs):
                f.write(json.dumps({**r, "predicted": names[int(pr.argmax())],
                                    "probabilities": {n: round(float(x), 6) for n, x in zip(names, pr)}}) + "\n")
    return len(rows)
