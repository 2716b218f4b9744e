"""`sftkit eval` and `sftkit compare`: one model, or base vs tuned (vs base + few-shot), on the same rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

from .config import Config, ConfigError, DataConfig, load_config, with_overrides
from .data import read, renderer_for
from .data.sources import Row, load_rows
from .evaluate import EvalResult, evaluate_model
from .export import write_card
from .generate import load_for_inference
from .job import log
from .report import read_metrics
from .retrieve import LAYOUT_NOTE, InContext, Rag
from .rewards import parse_rewards
from .tasks import rl


def run_eval(target: str, data: str, metrics: list[str], *, adapter: str | None = None, data_cfg: DataConfig | None = None,
             data_overrides: dict | None = None, context: InContext | None = None, limit: int = 0,
             max_new_tokens: int = 64, batch_size: int = 16, generate: bool = True, sampling: dict | None = None,
             label: str = "model", loaded: tuple | None = None, known_loss: dict | None = None,
             rows: list[Row] | None = None, costs: bool = False):
    """One model on held-out rows (of the file `data`, or `rows` already read), with `context`
    (shots, retrieval) in each prompt if given. `loaded` is (model, tokenizer, data config) already
    in memory; `known_loss` the loss metrics already measured on exactly these rows and weights
    (not measured again)."""
    model, tok, run_data = loaded or load_for_inference(target, adapter)
    data_cfg = data_cfg or run_data
    if data_overrides:  # on top of the run's own settings (template, system message, mask), not the defaults
        data_cfg = with_overrides(Config(data=data_cfg), data_overrides).data
    if rows is None:
        rows = load_rows(data, data_cfg.format, data_cfg.columns, data_cfg.system)
    rows = rows[:limit] if limit > 0 else rows
    if context is not None and context.few_shot and not context.shots_from and isinstance(run_data.train, str):
        context.shots_from = run_data.train  # a run's own training rows
    extra = context is not None and context.active
    # With shots or documents in the prompt the loss would be of other sequences than the plain rows': left out.
    result = evaluate_model(model, renderer_for(data_cfg, tok), rows, metrics, loss=not extra and not known_loss,
                            generate_replies=generate, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            context=context, data_cfg=data_cfg, sampling=sampling, label=label, costs=costs)
    if known_loss and not extra:
        result.metrics = {**known_loss, **result.metrics}
    del model
    return result, data_cfg


def final_eval_of_run(run_dir: Path, data: str, limit: int) -> dict | None:
    """The run's own last eval (loss, perplexity, token accuracy) when it is the one `compare` would
    measure: the same held-out file, unchanged since the run started, scored with the final weights."""
    cfg = load_config(run_dir / "config.yaml")
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        started = json.loads((run_dir / "status.json").read_text()).get("started")
        same_file = isinstance(cfg.data.eval, str) and os.path.samefile(cfg.data.eval, data)
    except (OSError, ValueError):
        return None
    if limit or not same_file or not started or os.path.getmtime(data) >= started:
        return None
    if not str(summary.get("final_weights", "")).startswith("last"):
        return None
    last = next((r for r in reversed(read_metrics(run_dir)) if "eval_loss" in r), None)
    if last is None or last.get("step") != summary.get("steps") or "eval_accuracy" not in last:
        return None
    return {"eval_loss": last["eval_loss"], "perplexity": last["eval_ppl"], "token_accuracy": last["eval_accuracy"]}


def table(results: dict[str, EvalResult]) -> str:
    names = list(results)
    keys: list[str] = []
    for r in results.values():
        keys += [k for k in r.metrics if k not in keys]
    width = max(14, *(len(n) + 2 for n in names))
    first = max(16, *(len(k) + 2 for k in keys))
    lines = [f"{'metric':<{first}}" + "".join(f"{n:>{width}}" for n in names)]
    for k in keys:
        cells = "".join(f"{results[n].metrics[k]:>{width}.4f}" if k in results[n].metrics else f"{'-':>{width}}"
                        for n in names)
        lines.append(f"{k:<{first}}{cells}")
    return "\n".join(lines)


def plot(results: dict[str, EvalResult], out: Path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in next(iter(results.values())).metrics
            if k.rpartition("/")[2] not in ("eval_loss", "perplexity", *COSTS)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys)), 4))
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        xs = [j + i * width for j in range(len(keys))]
        values = [r.metrics.get(k, float("nan")) for k in keys]  # a metric a model was not scored on: no bar
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, labels=[f"{v:.2f}" if v == v else "" for v in values], fontsize=8)
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(keys))], keys)
    shown = [v for r in results.values() for v in (r.metrics.get(k, float("nan")) for k in keys) if v == v]
    ax.set_ylim(min([0.0, *shown]), max([1.1, *(1.1 * v for v in shown)]))  # rewards may leave [0, 1]
    ax.set_ylabel("score (higher is better)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def differing_rows(base: EvalResult, tuned: EvalResult, metric: str, n: int = 5) -> list[tuple[float, dict, dict]]:
    pairs = [(t["scores"][metric] - b["scores"][metric], b, t) for b, t in zip(base.predictions, tuned.predictions)]
    pairs = [p for p in pairs if p[0] != 0 or p[1]["prediction"] != p[2]["prediction"]]
    return sorted(pairs, key=lambda p: -abs(p[0]))[:n]


def report_md(results: dict[str, EvalResult], data: str, metric: str, base_name: str, run: Path,
              sets: list[str] | None = None, notes: list[str] | None = None) -> str:
    title = f"# Base vs tuned on {len(sets)} held-out sets" if sets else f"# Base vs tuned on `{data}`"
    lines = [title, "", f"Base: `{base_name}`; tuned: `{run}`.", ""]
    if sets:
        lines += [f"Sets: {data}. Each metric is given per set (`NAME/metric`) and as their mean (`mean/metric`).", ""]
    lines += ["```", table(results), "```", ""]
    if len(results) > 2 or any(k in r.metrics for r in results.values() for k in COSTS):
        lines += [verdict(results, metric), ""]
    if notes:
        lines += ["The rows beside base and tuned:", "", *(f"- {n}" for n in notes), "",
                  f"Retrieval prompt layout: {LAYOUT_NOTE}", ""]
    lines += ["![compare](compare.png)", ""]
    summary = run / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        if s.get("forgetting") is not None:
            gain = {m: results["tuned"].metrics[m] - results["base"].metrics[m] for m in results["tuned"].metrics
                    if m in results["base"].metrics and m.rpartition("/")[2] not in ("eval_loss", "perplexity")}
            lines += ["## Task gain next to forgetting", "",
                      "Task gain (tuned - base): " + ", ".join(f"{m} {v:+.3f}" for m, v in gain.items()) + ".  ",
                      f"Forgetting: perplexity on the reference text (`eval.reference`) {s['base_ref_ppl']:.3f} -> "
                      f"{s['base_ref_ppl'] * (1 + s['forgetting']):.3f} ({s['forgetting']:+.1%}).", ""]
    base, tuned = results["base"], results["tuned"]
    rows = differing_rows(base, tuned, metric)
    if rows:
        lines += [f"## Rows where they differ most ({metric})", ""]
        for _, b, t in rows:
            lines += [f"**{b['source']}**{' (' + b['eval_set'] + ')' if b.get('eval_set') else ''} ({metric} {b['scores'][metric]:.2f} -> {t['scores'][metric]:.2f})", "",
                      f"- prompt: {b['prompt'][:300]!r}", f"- reference: {b['reference'][:300]!r}",
                      f"- base: {b['prediction'][:300]!r}", f"- tuned: {t['prediction'][:300]!r}", ""]
    return "\n".join(lines)


def rl_eval(target: str, cfg: Config, rows: list, scorers: dict, label: str, max_new_tokens: int,
            batch_size: int) -> EvalResult:
    """One model on held-out prompt rows as an RL run scores them: greedy replies, the run's rewards."""
    model, tok, _ = load_for_inference(target)
    renderer = renderer_for(cfg.data, tok)
    rewards = parse_rewards(cfg.rl.rewards)
    log(f"{label}: greedy replies to {len(rows)} prompts")
    h = rl.held_out(model, renderer, rows, rewards, scorers, max_new_tokens, cfg.rl.pass_at, batch_size)
    del model
    metrics = {"pass_rate": h.metrics["eval_pass_rate"], "reward": h.metrics["eval_reward"],
               **{k.removeprefix("eval_"): v for k, v in h.metrics.items() if k.startswith("eval_rewards/")}}
    predictions = [{"source": r.where, "prompt": r.prompt if isinstance(r.prompt, str) else r.messages[-1]["content"],
                    "reference": str(r.columns.get("answer", "")), "prediction": tok.decode(c, skip_special_tokens=True),
                    "scores": {"reward": score, "pass_rate": float(score >= cfg.rl.pass_at)},
                    "rewards": {w.name: (None if v != v else v) for w, v in zip(rewards, pf)}}
                   for r, c, score, pf in zip(rows, h.completions, h.scores, h.per_func)]
    return EvalResult(metrics=metrics, predictions=predictions)


def compare_rl(base: str, run_dir: Path, cfg: Config, data: str, limit: int, max_new_tokens: int | None,
               batch_size: int) -> dict[str, EvalResult]:
    """An RL run: base and tuned greedy replies to the prompt rows of `data`, scored with the run's
    rewards (mean reward and pass rate), as the run's own held-out evals are."""
    rows, skipped = rl.read_prompt_rows(data, cfg.data.columns, cfg.data.on_error)
    if skipped:
        log(f"{data}: skipped {skipped} bad rows (data.on_error=skip)")
    rows = rows[:limit] if limit > 0 else rows
    if not rows:
        raise ConfigError(f"{data}: no prompt rows to compare on")
    scorers = rl.reward_scorers(parse_rewards(cfg.rl.rewards), "cpu")
    new_tokens = max_new_tokens or cfg.rl.max_new_tokens
    return {name: rl_eval(target, cfg, rows, scorers, name, new_tokens, batch_size)
            for name, target in (("base", base), ("tuned", str(run_dir)))}


def held_out_sets(run_cfg: Config, data: list[str]) -> dict[str, tuple[str, list[Row]]]:
    """The rows `compare` scores, by set: name -> (where they come from, rows). `data` holds the files
    given (`--data FILE` or `--data NAME=FILE`, more than once); none given: the run's own held-out
    rows, split exactly as training split them, one set per named set (`data.eval` as a mapping,
    named `data.train` sources) or one set."""
    cfg = run_cfg.data
    if data:
        sets = {}
        for spec in data:
            name, _, path = spec.rpartition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
            name = name or (Path(path).stem if len(data) > 1 else "")
            if name in sets:
                raise ConfigError(f"compare: --data {spec}: the set name {name!r} is given twice (name them: --data NAME=FILE)")
            sets[name] = (path, load_rows(path, cfg.format, cfg.columns, cfg.system))
        return sets
    if not cfg.eval and not cfg.eval_fraction:
        raise ConfigError("compare: the run has no held-out rows (no data.eval, data.eval_fraction 0): give --data FILE")
    _, held, _ = read(cfg, run_cfg.train.seed)
    names = list(dict.fromkeys(r.eval_set for r in held if r.eval_set))
    if not names:
        return {"": (str(cfg.eval or f"the run's held-out {cfg.eval_fraction:g} of data.train"), held)}
    if any(r.eval_set is None for r in held):
        names.append("other")  # held-out rows of unnamed sources, as training names them
    return {n: (f"the run's held-out set {n!r}", [r for r in held if (r.eval_set or "other") == n]) for n in names}


def merged(per_set: dict[str, EvalResult]) -> EvalResult:
    """Results on several sets as one: metrics `NAME/metric` and their mean `mean/metric`, the
    predictions of every set in order, each with its set."""
    if list(per_set) == [""]:
        return per_set[""]
    metrics: dict[str, float] = {}
    for name, r in per_set.items():
        metrics.update({f"{name}/{k}": v for k, v in r.metrics.items()})
    keys = [k for k in next(iter(per_set.values())).metrics if all(k in r.metrics for r in per_set.values())]
    metrics.update({f"mean/{k}": sum(r.metrics[k] for r in per_set.values()) / len(per_set) for k in keys})
    predictions = [{**p, "eval_set": name} for name, r in per_set.items() for p in r.predictions]
    return EvalResult(metrics=metrics, predictions=predictions)


COSTS = ("prompt_tokens", "seconds_per_answer")


def verdict(results: dict[str, EvalResult], metric: str) -> str:
    """One sentence: which row wins on `metric`, at what cost, and the best that needs no fine-tuning."""
    key = f"mean/{metric}" if f"mean/{metric}" in results["base"].metrics else metric
    scored = {n: r for n, r in results.items() if key in r.metrics}
    if not scored:
        return ""

    def cost(r: EvalResult) -> str:
        tokens = r.metrics.get("prompt_tokens", r.metrics.get(next((k for k in r.metrics if k.endswith("/prompt_tokens")), ""), 0))
        secs = r.metrics.get("seconds_per_answer", r.metrics.get(next((k for k in r.metrics if k.endswith("/seconds_per_answer")), ""), 0))
        return f"{tokens:.0f} prompt tokens and {secs:.2f} s per answer"

    best = max(scored, key=lambda n: (scored[n].metrics[key], -scored[n].metrics.get("prompt_tokens", 0)))
    line = f"{best} wins on {key} ({scored[best].metrics[key]:.3f}; base {scored['base'].metrics[key]:.3f}) at {cost(scored[best])}"
    untuned = {n: r for n, r in scored.items() if not n.startswith("tuned")}
    if best.startswith("tuned") and untuned:
        alt = max(untuned, key=lambda n: untuned[n].metrics[key])
        line += f"; the best without fine-tuning is {alt} ({untuned[alt].metrics[key]:.3f}, {cost(untuned[alt])})"
    elif not best.startswith("tuned") and "tuned" in scored:
        line += f"; tuned scores {scored['tuned'].metrics[key]:.3f} at {cost(scored['tuned'])}"
    return line + "."


def compare(base: str, run: str, data: str | list[str] | None, metrics: list[str], few_shot: int = 0,
            shots: tuple[str, ...] = ("first", "nearest"), shots_from: str | None = None, embedder: str | None = None,
            rag: Rag | None = None, limit: int = 0, max_new_tokens: int | None = None, batch_size: int = 16
            ) -> tuple[dict[str, EvalResult], Path]:
    """Base vs tuned on each held-out set (see `held_out_sets`; `limit` is per set), and the
    alternatives to fine-tuning on the same rows: base + K shots (each of `shots`), base + RAG,
    tuned + RAG. A run trained with `data.rag` is scored with its own retrieval, as trained."""
    run_dir = Path(run)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"compare: {run} is not a run directory (no config.yaml)")
    run_cfg = load_config(run_dir / "config.yaml")
    data = [data] if isinstance(data, str) else list(data or [])
    if run_cfg.task == "rl":
        if few_shot or rag:
            raise ConfigError("compare: --few-shot and --rag are not offered for an RL run (its prompts have no "
                              "solved replies; its rewards score the plain prompts)")
        if len(data) > 1 or (not data and not isinstance(run_cfg.data.eval, str)):
            raise ConfigError("compare: an RL run is compared on one file of prompts: give --data FILE")
        data = data[0] if data else run_cfg.data.eval
        results = compare_rl(base, run_dir, run_cfg, data, limit, max_new_tokens, batch_size)
        return write_comparison(results, data, "reward", base, run_dir), run_dir
    # Every model sees the rows rendered as the run was trained (template, system message).
    data_cfg = run_cfg.data
    src = shots_from or (data_cfg.train if isinstance(data_cfg.train, str) else None)
    if few_shot and not src:
        raise ConfigError("compare: --few-shot needs --shots-from FILE (the run's data.train is not one file)")
    emb = embedder or "minilm-l6"
    run_rag = Rag.of(data_cfg.rag)
    contexts = {f"base+{few_shot}{mode}": InContext(few_shot, mode, src, emb) for mode in (shots if few_shot else ())}
    if rag:
        contexts["base+rag"] = InContext(rag=rag, embedder=emb)
    tuned_ctx = {"tuned": InContext(rag=run_rag, embedder=emb) if run_rag else None}
    if rag and rag != run_rag:
        tuned_ctx["tuned+rag"] = InContext(rag=rag, embedder=emb)
    sets = held_out_sets(run_cfg, data)
    where = next(iter(sets.values()))[0] if len(sets) == 1 else ", ".join(f"{n}: {w}" for n, (w, _) in sets.items())
    kw = dict(limit=limit, max_new_tokens=max_new_tokens or 64, batch_size=batch_size, data_cfg=data_cfg, costs=True)
    per: dict[str, dict[str, EvalResult]] = {"base": {}, **{k: {} for k in contexts}, **{k: {} for k in tuned_ctx}}
    log(f"evaluating base model {base}")
    base_model = load_for_inference(base)  # once, for the plain rows and every alternative
    for name, (path, rows) in sets.items():
        tag = f" on {name}" if name else ""
        per["base"][name], _ = run_eval(base, path, metrics, label=f"base{tag}", loaded=base_model, rows=rows, **kw)
        for row_name, ctx in contexts.items():
            log(f"evaluating base model with {ctx.label()}{tag}")
            per[row_name][name], _ = run_eval(base, path, metrics, context=ctx, rows=rows, label=f"{row_name}{tag}",
                                              loaded=base_model, **kw)
    del base_model
    log(f"evaluating tuned model {run}" + (f" with its retrieval ({run_rag.describe()})" if run_rag else ""))
    tuned_model = load_for_inference(run)
    for name, (path, rows) in sets.items():
        tag = f" on {name}" if name else ""
        for row_name, ctx in tuned_ctx.items():
            known = (final_eval_of_run(run_dir, path, limit)
                     if ctx is None and len(sets) == 1 and (run_dir / "summary.json").is_file() else None)
            if known:
                log("tuned model's eval loss: the run's final eval on the same rows and weights (not measured again)")
            per[row_name][name], _ = run_eval(run, path, metrics, label=f"{row_name}{tag}", known_loss=known,
                                              loaded=tuned_model, rows=rows, context=ctx, **kw)
    del tuned_model
    results = {k: merged(v) for k, v in per.items()}
    order = ["base", *contexts, *tuned_ctx]
    results = {"base": results["base"], "tuned": results["tuned"], **{k: results[k] for k in order if k not in ("base", "tuned")}}
    notes = [f"{n}: {c.label()}" + (f" ({c.rag.describe()}, embedder {c.embedder})" if c.rag else
                                    f" from {c.shots_from} (embedder {c.embedder})" if c.shots == "nearest" else
                                    f" from {c.shots_from}") for n, c in {**contexts, **tuned_ctx}.items() if c]
    return write_comparison(results, where, metrics[0], base, run_dir, list(sets) if len(sets) > 1 else None, notes), run_dir


def write_comparison(results: dict[str, EvalResult], data: str, metric: str, base: str, run_dir: Path,
                     sets: list[str] | None = None, notes: list[str] | None = None) -> dict[str, EvalResult]:
    for name, r in results.items():
        r.write(run_dir / "compare" / name)
    plot(results, run_dir / "compare.png")
    (run_dir / "report.md").write_text(report_md(results, data, metric, base, run_dir, sets, notes))
    if (run_dir / "final").is_dir():  # the model card gains the comparison
        write_card(run_dir)
    return results
