"""Metrics as plain functions, and the evaluation of one model on held-out rows.

Loss-based metrics use the same rendering and masks as training; generation-based metrics
score a greedy (or sampled) reply against the reference reply.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .attention import packed_layout
from .config import DataConfig
from .data.packing import pack_collate, pad_collate, pad_multiple
from .data.render import build_examples
from .data.sources import DataError
from .generate import generate
from .loss import TokenLoss, token_loss
from .metrics import calls_text, classification_report, is_label_set, metric_fn
from .retrieve import InContext, query_of


# -- a whole evaluation ---------------------------------------------------------------------------
@dataclass
class EvalResult:
    metrics: dict[str, float] = field(default_factory=dict)  # name -> value (loss, ppl, accuracy, metrics)
    classification: dict | None = None
    predictions: list[dict] = field(default_factory=list)  # per row: prompt, reference, prediction, scores

    def write(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        body = {"metrics": self.metrics}
        if self.classification:
            body["classification"] = self.classification
        (out_dir / "eval.json").write_text(json.dumps(body, indent=1))
        with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
            for p in self.predictions:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")


def loss_metrics(model, examples: list, batch_size: int, pad_id: int, desc: str | None = None, pack: bool = False,
                 share_prefix: bool = False, pass_tokens: int = 0) -> dict[str, float]:
    """Token-weighted loss, perplexity and next-token accuracy over trained tokens (as training renders them).

    `model` is a model, or the trainer's TokenLoss module (under FSDP the model's weights are shards
    that only the wrapped module's forward gathers). With `pack`, each pass's examples are one flat
    row with no padding (and with `share_prefix` their shared opening computed once): the same sums,
    for models where packing is exact (`sftkit.attention.packing_problem`). `pass_tokens` > 0 fills
    each packed pass with examples up to that many tokens instead of `batch_size` examples."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Similar lengths together: less padding, same result (the sums do not depend on batching).
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    passes = _passes(order, [len(e.input_ids) for e in examples], pass_tokens) if pack and pass_tokens else \
        [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    total, tokens, correct = 0.0, 0, 0

    bar = tqdm(total=len(order), desc=desc, file=sys.stderr, leave=False, disable=desc is None)
    with torch.no_grad():
        for part in passes:
            chunk = [examples[i] for i in part]
            batch = (pack_collate([[e] for e in chunk], pad_id, share_prefix) if pack
                     else pad_collate(chunk, pad_id, pad_multiple()))
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            if isinstance(model, TokenLoss):  # the training step's module: FSDP gathers its shards in its forward
                loss, n, ok = model(**batch)
            else:
                sums = token_loss(model, batch)
                loss, n, ok = sums.loss, sums.tokens, sums.correct
            total, tokens, correct = total + float(loss), tokens + int(n), correct + int(ok)
            bar.update(len(part))
    bar.close()
    model.train(was_training)
    mean = total / max(tokens, 1)
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50)), "token_accuracy": correct / max(tokens, 1)}


def _passes(order: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive runs of `order` whose lengths sum to at most `budget` (one example at least)."""
    out: list[list[int]] = []
    used = 0
    for i in order:
        if out and used + lengths[i] <= budget:
            out[-1].append(i)
            used += lengths[i]
        else:
            out.append([i])
            used = lengths[i]
    return out


def reference_reply(message: dict) -> str:
    """The text a generated reply is scored against: the reply's content, and its tool calls as the
    Hermes layout writes them (what the `tool_call` metric parses)."""
    if not message.get("tool_calls"):
        return message["content"]
    return "\n".join(x for x in (message["content"].strip(), calls_text(message["tool_calls"])) if x)


def check_references(rows: list) -> None:
    """Generation scores the model's reply against the row's last message, which must be a reply."""
    for r in rows:
        if r.text is None and r.messages[-1]["role"] != "assistant":
            raise DataError(f"{r.source}:{r.line}: messages[{len(r.messages) - 1}]: the row ends with a "
                            f"{r.messages[-1]['role']} turn; a held-out row must end with the reply to score "
                            "against (drop the trailing turn, or the row)", "no reference reply")


def evaluate_model(model, renderer, rows: list, metrics: list[str], *, loss: bool = True, generate_replies: bool = True,
                   max_new_tokens: int = 64, batch_size: int = 16, context: InContext | None = None,
                   data_cfg: DataConfig | None = None, sampling: dict | None = None, label: str = "model",
                   costs: bool = False) -> EvalResult:
    """Loss metrics on trained tokens and generation metrics on the final reply of each row. With
    `context` (shots, retrieval) each prompt is built by `InContext.apply`, and the cost of an answer
    is measured beside the scores (`costs`): `prompt_tokens` (mean tokens the model reads per answer) and
    `seconds_per_answer` (wall time of retrieval and generation, per answer, on this machine)."""
    result = EvalResult()
    if loss:
        examples, _ = build_examples(rows, renderer)
        pack, share = packed_layout(model, examples)
        result.metrics.update(loss_metrics(model, examples, batch_size, renderer.tok.pad_token_id,
                                           desc=f"eval loss ({label})", pack=pack, share_prefix=share))
    gen_rows = [r for r in rows if r.text is None]
    if generate_replies:
        check_references(gen_rows)
    if generate_replies and gen_rows:
        t0 = time.time()
        prompts = [r.messages[:-1] for r in gen_rows]
        info = [{} for _ in prompts]
        if context is not None and context.active:
            prompts, info = context.apply(prompts, renderer, data_cfg, held_rows=gen_rows)
        refs = [reference_reply(r.messages[-1]) for r in gen_rows]
        tools = [r.tools for r in gen_rows] if any(r.tools for r in gen_rows) else None
        with tqdm(total=len(prompts), desc=f"generate ({label})", file=sys.stderr, leave=False) as bar:
            preds = generate(model, renderer, prompts, max_new_tokens, batch_size, bar.update, tools=tools,
                             **(sampling or {}))
        seconds = time.time() - t0
        fns = {m: metric_fn(m) for m in metrics}
        for r, ref, pred, extra in zip(gen_rows, refs, preds, info):
            row_scores = {m: float(f(pred, ref)) for m, f in fns.items()}
            result.predictions.append({"source": f"{r.source}:{r.line}", "prompt": query_of(r.messages[:-1]),
                                       "reference": ref, "prediction": pred, "scores": row_scores, **extra})
        for m in metrics:
            result.metrics[m] = sum(p["scores"][m] for p in result.predictions) / len(result.predictions)
        if is_label_set(refs):
            result.classification = classification_report(preds, refs)
            result.metrics["class_accuracy"] = result.classification["accuracy"]
            result.metrics["macro_f1"] = result.classification["macro_f1"]
        if costs:
            lengths = [len(renderer.prompt_ids(p, tools[i] if tools else None)) for i, p in enumerate(prompts)]
            result.metrics["prompt_tokens"] = sum(lengths) / len(lengths)
            result.metrics["seconds_per_answer"] = seconds / len(prompts)
    return result
