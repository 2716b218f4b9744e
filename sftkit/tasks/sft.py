"""task: sft — a causal LM learns replies: rows rendered with the chat template and masked, (packed)
batches, loss summed over trained tokens; forgetting measured on general text; the final model
saved merged (and as an adapter for LoRA), scored by generation."""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from pathlib import Path

import torch

from .. import checkpoint
from ..attention import packing_problem, prefix_sharing_problem, use_packed_attention
from ..config import Config, ConfigError
from ..data import prepare as prepare_data
from ..data import renderer_for, text_source
from ..data.packing import Batcher, pad_multiple
from ..data.quality import analyse
from ..data.render import Renderer, build_examples
from ..data.sources import Row, eval_sources, load_rows, named_sources
from ..distill import check_distill, load_teacher
from ..evaluate import check_references, evaluate_model, loss_metrics
from ..export import merge_adapter, write_card
from ..job import MODEL_PREFIX, Job, Run, RunResult, cap_max_length, log
from ..loss import NEFTune, TokenLoss
from ..metrics import metric_fn
from ..models import apply_method, count_parameters, load_model
from ..retrieve import Index, Rag, rag_rows


def forward_tokens(cfg: Config) -> int:
    """Token budget of one forward pass. On CPU, small passes are as fast as big ones (measured:
    benchmarks/throughput.py) and hold a fraction of the activations; GPUs want big ones."""
    if cfg.train.max_forward_tokens >= 0:
        return cfg.train.max_forward_tokens
    return 16384 if torch.cuda.is_available() else 512


def generation_scores(model, renderer: Renderer, rows: list[Row], cfg: Config, label: str,
                      metrics: list[str] | None = None) -> dict[str, float]:
    """Generate a reply to each held-out prompt (all turns before the last reply) and score it:
    {metric: mean score} for eval.metric (or `metrics`)."""
    rows = rows[: cfg.eval.limit] if cfg.eval.limit > 0 else rows
    metrics = metrics or [cfg.eval.metric]
    result = evaluate_model(model, renderer, rows, metrics, loss=False, max_new_tokens=cfg.eval.max_new_tokens,
                            batch_size=cfg.eval.batch_size, label=label)
    return {m: result.metrics[m] for m in metrics}


def scored_sets(model, renderer: Renderer, rows: list[Row], sets: dict, cfg: Config, label: str,
                metrics: list[str] | None = None) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """generation_scores over the held-out rows, or with named eval sets, on each set (eval.limit rows
    of each) and their mean: (scores, {set: scores})."""
    if not sets:
        return generation_scores(model, renderer, rows, cfg, label, metrics), {}
    per = {name: generation_scores(model, renderer, set_rows, cfg, f"{label}, {name}", metrics)
           for name, (_, set_rows) in sets.items()}
    mean = {m: sum(s[m] for s in per.values()) / len(per) for m in next(iter(per.values()))}
    return mean, per


LOSS_SELECT = {"eval_loss": False, "eval_ppl": False, "eval_accuracy": True}  # name -> higher is better


def set_names(cfg: Config) -> list[str]:
    """The named eval sets: data.eval's names, or the named data.train sources' (with data.eval_fraction)."""
    if cfg.data.eval:
        return [n for _, n in eval_sources(cfg.data.eval) if n]
    if cfg.data.eval_fraction > 0:
        named = [n for _, _, n in named_sources(cfg.data.train) if n]
        if named and len(named) < len(named_sources(cfg.data.train)):
            named.append("other")
        return named
    return []


def split_select(cfg: Config) -> tuple[str | None, str]:
    """eval.select as (eval set or None for the mean over sets, metric)."""
    name = cfg.eval.select
    first, _, rest = name.partition("/")
    if first in set_names(cfg):
        return first, rest or "eval_loss"
    return None, name


def selection(cfg: Config) -> tuple[str, bool]:
    """eval.select as (the record key that picks the best eval, whether higher is better)."""
    which, metric = split_select(cfg)
    key = f"eval/{which}/{metric}" if which else metric
    return key, LOSS_SELECT.get(metric, True)  # a generation metric: a score per reply, higher is better


def generation_metrics(cfg: Config) -> list[str]:
    """The metrics scored on generated replies: eval.metric, and eval.select's where it is another one."""
    metric = split_select(cfg)[1]
    return [cfg.eval.metric] + ([metric] if metric not in LOSS_SELECT and metric != cfg.eval.metric else [])


def rag_augment(cfg: Config, renderer: Renderer):
    """data.rag: each training and held-out prompt with its retrieved chunks (never trained), built by
    the function --rag uses at inference. None without data.rag."""
    rag = Rag.of(cfg.data.rag)
    if rag is None:
        return None
    index = Index(rag.index)
    log(f"data.rag: each prompt gets retrieved context ({rag.describe()}; {index.meta['chunks']} chunks, embedder "
        f"{index.meta['embedder']}); the context is prompt, never trained")
    return lambda rows: rag_rows(rows, rag, renderer, index)


def check(cfg: Config) -> None:
    check_distill(cfg)
    rag = Rag.of(cfg.data.rag)
    if rag is not None and not (Path(rag.index) / "sftkit-index.json").is_file():
        raise ConfigError(f"data.rag.index {rag.index}: not an sftkit index (no sftkit-index.json); make one: "
                          f"sftkit index build DOCS... --out {rag.index}")
    name = split_select(cfg)[1]
    if name not in LOSS_SELECT:
        try:
            metric_fn(name)
        except ConfigError as e:
            sets = set_names(cfg)
            named = f", an eval set ({', '.join(sets)}) or SET/METRIC" if sets else ""
            raise ConfigError(f"eval.select: {name!r} is not {', '.join(LOSS_SELECT)}{named} nor a generation "
                              f"metric ({e})") from None
        if not cfg.eval.generate:
            raise ConfigError(f"eval.select: {name} is scored on generated replies; set eval.generate: true "
                              "(it then generates at every eval, on eval.limit rows)")
    if cfg.train.neftune_alpha < 0:
        raise ConfigError(f"train.neftune_alpha: must be >= 0 (0 = off), got {cfg.train.neftune_alpha}")
    if cfg.train.neftune_alpha and cfg.train.kl_to_base:
        raise ConfigError("train.neftune_alpha with train.kl_to_base: the base model's pass would see other noise "
                          "than the tuned one's, so the KL would measure the noise; use one of them")


def check_packing(model, examples: list, share: bool, who: str = "") -> bool:
    """Packed rows for `model` (the student, or a teacher beside it that sees the same rows): the
    packing-aware attention, refused where packing would change its results; returns whether the
    rows may share their opening (only where that gives the examples' own logits too). Logged."""
    log(f"{who}packed rows: attention {use_packed_attention(model)}")
    problem = packing_problem(model, examples)
    if problem:
        raise ConfigError(who + problem)
    if not share:
        return False
    why_not = prefix_sharing_problem(model, examples)
    log(f"{who}shared prefixes: each pass computes the untrained opening its examples share once" if why_not is None
        else f"{who}shared prefixes: off, {why_not}")
    return why_not is None


def prepare(cfg: Config, run: Run) -> Job:
    log(f"loading model {cfg.model.name}")
    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.revision, cfg.peft.method == "qlora")
    cap_max_length(cfg, model)
    renderer = renderer_for(cfg.data, tok)
    data = prepare_data(cfg.data, cfg.train.seed, renderer, rag_augment(cfg, renderer))
    for line in data.summary():
        log(line)
    train_ex, eval_ex, eval_rows = data.train, data.eval, data.eval_rows
    if run.main:
        write_data_quality(run.dir, data, tok, cfg.data.max_length)
    if not train_ex:
        raise ConfigError(f"{cfg.data.train}: no example has a trained token left; raise data.max_length")
    if cfg.eval.generate and not eval_rows:
        raise ConfigError("eval.generate=true needs held-out rows: set data.eval or data.eval_fraction")
    if cfg.eval.generate:
        check_references(eval_rows)
    if cfg.peft.method != "qlora":  # 4-bit weights are placed by bitsandbytes at load
        model.to(run.device)
    # NEFTune: each example draws its own noise, so examples cannot share one computed opening.
    share_prefix = cfg.data.share_prefix and not cfg.train.neftune_alpha
    if cfg.data.pack and cfg.data.share_prefix and cfg.train.neftune_alpha:
        log("shared prefixes: off, train.neftune_alpha gives each example's opening its own noise")
    share = check_packing(model, train_ex, share_prefix) if cfg.data.pack else False
    scores = {}
    if cfg.eval.generate and cfg.eval.compare_base and run.start_ckpt is None and run.main:
        mean, per = scored_sets(model, renderer, eval_rows, data.eval_sets, cfg, "base model")
        scores["base"] = mean[cfg.eval.metric]
        scores.update({f"base/{name}": s[cfg.eval.metric] for name, s in per.items()})
        log(f"base model {cfg.eval.metric} on the held-out rows: {scores['base']:.3f}")
    ref_ex, base_ref_ppl = reference_text(cfg, run, model, renderer, share)
    frozen = None
    if cfg.train.kl_to_base > 0 and cfg.peft.method in ("full", "freeze"):
        frozen = copy.deepcopy(model).eval().requires_grad_(False)  # the base, for the KL term

    # Seeding right before wrapping makes the LoRA init reproducible.
    torch.manual_seed(cfg.train.seed)
    model = apply_method(model, cfg.peft)
    if cfg.train.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    trainable, total = count_parameters(model)
    log(f"method {cfg.peft.method}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")
    distill = load_teacher(cfg, tok, run.device, model, train_ex)
    if distill is not None and distill.teacher is not None and cfg.data.pack:
        share = check_packing(distill.teacher, train_ex, share, "train.distill.teacher: ")
    batcher = Batcher(train_ex, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seed, tok.pad_token_id,
                      cfg.data.pack, cfg.data.max_length, cfg.train.group_by_length, rank=run.rank, world=run.world,
                      max_forward_tokens=forward_tokens(cfg), pad_multiple=pad_multiple(),
                      example_ids=distill is not None and distill.cache is not None, share_prefix=share)
    if cfg.data.pack:
        log(f"packed {len(train_ex)} examples into {len(batcher)} rows of up to {cfg.data.max_length} tokens "
            f"({sum(batcher.sizes) / (len(batcher) * cfg.data.max_length):.0%} full); train.batch_size counts rows")
    neftune = None
    if cfg.train.neftune_alpha:
        neftune = NEFTune(model, cfg.train.neftune_alpha)
        log(f"NEFTune: noise alpha {cfg.train.neftune_alpha:g} on the input embeddings while training")
    return Job(model=model, loss=TokenLoss(model, kl_coef=cfg.train.kl_to_base, frozen_base=frozen, distill=distill,
                                           neftune=neftune),
               batcher=batcher, state={"base_ref_ppl": base_ref_ppl},
               evaluate=Evaluation(cfg, eval_ex, ref_ex, tok.pad_token_id, share, model, renderer, eval_rows,
                                   data.eval_sets)
               if (eval_ex or ref_ex) else None, select=selection(cfg)[0], maximize=selection(cfg)[1],
               progress=("eval_loss", *(generation_metrics(cfg) if generates_at_evals(cfg) else [])),
               finish=Finish(cfg, tok, renderer, data, eval_rows, scores, trainable, total))


def reference_text(cfg: Config, run: Run, model, renderer, share: bool = False) -> tuple[list, float | None]:
    """Forgetting: the reference text's examples, and the base model's perplexity on them (measured now,
    before training; on --resume too when the run had no such figure or another text)."""
    if not cfg.eval.reference:
        return [], None
    ref_ex, _ = build_examples(load_rows(text_source(cfg.eval.reference), "text"), renderer)
    meta = checkpoint.read_meta(run.start_ckpt) if run.start_ckpt is not None else None
    saved = meta.get("task_state", meta["state"]).get("base_ref_ppl") if meta else None
    if meta is not None and saved is not None and meta["config"]["eval"].get("reference") == cfg.eval.reference:
        return ref_ex, None  # restored from the checkpoint
    ppl = loss_metrics(model, ref_ex, cfg.train.batch_size, renderer.tok.pad_token_id, desc="reference text (base)",
                       pack=cfg.data.pack, share_prefix=share,
                       pass_tokens=cfg.train.batch_size * cfg.data.max_length)["perplexity"]
    log(f"base model perplexity on the reference text ({cfg.eval.reference}): {ppl:.3f}")
    return ref_ex, ppl


def generates_at_evals(cfg: Config) -> bool:
    """eval.generate scores replies at every eval when there are evals during training, or when
    eval.select needs the score; otherwise once, on the final model."""
    return cfg.eval.generate and (cfg.train.eval_every > 0 or cfg.eval.select not in LOSS_SELECT)


class Evaluation:
    """Held-out loss, perplexity and token accuracy, the reference text's perplexity (forgetting), and
    with eval.generate during training, the generation metrics of replies to the held-out prompts."""

    def __init__(self, cfg: Config, eval_ex: list, ref_ex: list, pad_id: int, share_prefix: bool = False,
                 model=None, renderer: Renderer | None = None, eval_rows: list[Row] | None = None,
                 sets: dict | None = None):
        self.cfg, self.eval_ex, self.ref_ex, self.pad_id = cfg, eval_ex, ref_ex, pad_id
        self.model, self.renderer, self.eval_rows = model, renderer, eval_rows or []
        self.sets = sets or {}  # named eval sets: each scored on its own, the plain keys their mean
        # Packed as training is (no padding), the shared prefix computed once where training does so;
        # a packed pass holds what a training pass does (train.batch_size rows of data.max_length).
        self.layout = {"pack": cfg.data.pack, "share_prefix": share_prefix,
                       "pass_tokens": cfg.train.batch_size * cfg.data.max_length}

    def __call__(self, scorer, state: dict) -> dict:
        record, bs = {}, self.cfg.train.batch_size
        if self.ref_ex:
            record["ref_ppl"] = loss_metrics(scorer, self.ref_ex, bs, self.pad_id, desc="reference text",
                                             **self.layout)["perplexity"]
            if state.get("base_ref_ppl"):
                record["forgetting"] = record["ref_ppl"] / state["base_ref_ppl"] - 1
        parts = self.sets.items() if self.sets else [(None, (self.eval_ex, self.eval_rows))]
        per: dict[str, dict[str, float]] = {}
        for name, (exs, _) in parts:
            if exs:
                ev = loss_metrics(scorer, exs, bs, self.pad_id, desc=f"eval loss{f' ({name})' if name else ''}",
                                  **self.layout)
                per[name] = {"eval_loss": ev["eval_loss"], "eval_ppl": ev["perplexity"],
                             "eval_accuracy": ev["token_accuracy"]}
        if generates_at_evals(self.cfg) and self.eval_rows:
            t0 = time.time()
            scores, by_set = scored_sets(self.model, self.renderer, self.eval_rows, self.sets, self.cfg, "eval",
                                         generation_metrics(self.cfg))
            for name, s in (by_set.items() if self.sets else [(None, scores)]):
                per.setdefault(name, {}).update(s)
            limit = self.cfg.eval.limit
            n = sum(min(len(rows), limit) if limit > 0 else len(rows) for _, (_, rows) in parts)
            record["generate_seconds"] = round(time.time() - t0, 3)
            log(f"eval generation: {n} prompts in {time.time() - t0:.1f} s "
                f"({', '.join(f'{k} {v:.3f}' for k, v in scores.items())}); eval.limit sets how many")
        if not self.sets:
            record.update(per.get(None, {}))
            return record
        for name, figures in per.items():  # each set's figures, and their mean under the plain names
            record.update({f"eval/{name}/{k}": v for k, v in figures.items()})
        for key in dict.fromkeys(k for figures in per.values() for k in figures):
            values = [figures[key] for figures in per.values() if key in figures]
            record[key] = sum(values) / len(values)
        return record


class Finish:
    """The final save (adapter and merged model, the tokenizer with the template trained), the tuned
    model's generation score, and what summary.json and the model card add for SFT."""

    def __init__(self, cfg, tok, renderer, data, eval_rows, scores, trainable, total):
        self.cfg, self.tok, self.renderer, self.data, self.eval_rows = cfg, tok, renderer, data, eval_rows
        self.scores, self.trainable, self.total = scores, trainable, total

    def __call__(self, model, run: Run, sharded_module, result: RunResult, state: dict) -> dict:
        cfg = self.cfg
        model = save_final(model, self.tok, cfg, run.dir, run.main, sharded_module)
        result.model = model
        if run.main and cfg.eval.generate:
            mean, per = scored_sets(model, self.renderer, self.eval_rows, self.data.eval_sets, cfg, "tuned model")
            self.scores["tuned"] = mean[cfg.eval.metric]
            self.scores.update({f"tuned/{name}": s[cfg.eval.metric] for name, s in per.items()})
            log(f"tuned model {cfg.eval.metric} on the held-out rows: {self.scores['tuned']:.3f}")
        result.scores = self.scores
        result.metric = cfg.eval.metric if cfg.eval.generate else None
        return {"metric": cfg.eval.metric if cfg.eval.generate else None, "scores": self.scores,
                "base_ref_ppl": state.get("base_ref_ppl"), "forgetting": result.forgetting,
                "method": cfg.peft.method, "trainable_parameters": self.trainable, "total_parameters": self.total,
                "train_examples": len(self.data.train), "data": data_summary(self.data)}

    @staticmethod
    def after_summary(run_dir: Path) -> None:
        write_card(run_dir)


def save_final(model, tok, cfg: Config, run_dir: Path, main_process: bool, sharded_module=None):
    """The adapter as peft saves it (LoRA), and a merged model plain transformers loads.

    With the weights sharded over processes (FSDP, `sharded_module` the wrapped loss module), every
    process takes part in gathering them whole onto rank 0, which writes them; the LoRA merge then
    starts from a fresh copy of the base model, as for QLoRA."""
    final = run_dir / "final"
    lora = cfg.peft.method in ("lora", "qlora")
    state = None
    if sharded_module is not None:
        state = checkpoint.gather_state(sharded_module, MODEL_PREFIX, trainable_only=lora)
    if not main_process:
        return model
    # The tokenizer saved with the model carries the template actually trained (data.template,
    # data.system), so whatever loads it renders prompts as training did.
    tok = copy.deepcopy(tok)
    tok.chat_template = renderer_for(cfg.data, tok).trained_template(cfg.data.system)
    if lora:
        model.save_pretrained(final / "adapter", state_dict=state)
        tok.save_pretrained(final / "adapter")
        if cfg.peft.method == "qlora" or state is not None:
            # QLoRA: merging into 4-bit weights would round the update away; FSDP: the weights in
            # memory are shards. Either way, merge into a fresh full-precision copy of the base.

            model = merge_adapter(cfg.model.name, final / "adapter", cfg.model.dtype, cfg.model.revision)
        else:
            model = model.merge_and_unload()
        state = None
    model.save_pretrained(final / "model", state_dict=state)
    tok.save_pretrained(final / "model")
    log(f"saved {final / 'model'}" + (f" and {final / 'adapter'}" if (final / "adapter").exists() else ""))
    return model


def data_summary(data) -> dict:
    """Rows per source, kept, dropped by reason, truncated and tokens: for summary.json and the model card."""
    out: dict = {"skipped": dict(data.read_stats.skipped)}
    for name, stats, rows in (("train", data.train_stats, data.train_rows), ("eval", data.eval_stats, data.eval_rows)):
        if stats is not None:
            out[name] = {"sources": dict(Counter(r.source for r in rows)), "rows": stats.rows, "kept": stats.kept,
                         "dropped": dict(stats.dropped), "truncated": stats.truncated, "tokens": stats.tokens,
                         "trained_tokens": stats.trained_tokens, "split_documents": stats.split, "blocks": stats.blocks}
    return out


def write_data_quality(run_dir: Path, data, tok, max_length: int, limit: int = 100_000) -> None:
    """The data-quality counts of `sftkit data inspect --quality` (duplicates, eval overlap, lint) for the
    model card; skipped above `limit` training rows, where `data inspect` is the tool to run."""
    if len(data.train_rows) > limit:
        return

    q = analyse(data.train_rows, data.eval_rows, tok, max_length, diversity=False)
    (run_dir / "data_quality.json").write_text(json.dumps({
        "rows": q.rows, "exact_duplicates": sum(len(g) - 1 for g in q.exact),
        "near_duplicates": sum(len(g) - 1 for g in q.near), "contaminated": len(q.contaminated),
        "lint": {k: len(v) for k, v in q.lint.items() if v}}, indent=1))
