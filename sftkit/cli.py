"""`sftkit SUBCOMMAND ...`: a plain mapping from subcommand to function (COMMANDS, at the bottom).

Each command reads its arguments, calls the module that does the work, and prints what it did;
no pipeline lives here. The modules are imported inside the commands on purpose: `sftkit --help`,
a typo in a flag or a bad config answer at once, without loading torch and transformers first.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config, ConfigError, load_config, parse_overrides, valid_keys, with_overrides
from .data.quality import CLEAN_DEFAULT
from .data.sources import DataError


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _metrics(arg: str) -> list[str]:
    return [m.strip() for m in arg.split(",") if m.strip()]


def _data_overrides(items: list[str]) -> dict | None:
    """`--set data.KEY=VALUE` items as a dict, checked; they are laid over the run's own data settings."""
    if not items:
        return None
    bad = [i for i in items if not i.startswith("data.")]
    if bad:
        raise ConfigError(f"--set takes data.* keys only here, got {bad[0]!r}")
    overrides = parse_overrides(items)
    with_overrides(load_config(None), overrides)  # unknown keys and bad values stop here, before any model loads
    return overrides


def check_inputs(models: dict[str, str | None], files: dict[str, str | None] | None = None,
                 metrics: list[str] = ()) -> None:
    """What a command was given, checked before any model loads or any row is generated: files that
    must exist, model names that are paths (a mistyped path is never tried as a hub id), metric names
    (a user's module:function is imported here). Each failure is a ConfigError naming the flag."""
    from .metrics import metric_fn
    from .rundir import check_file, looks_like_path, near_path

    for what, path in (files or {}).items():
        if path:
            check_file(path, what)
    for what, name in models.items():
        if name and looks_like_path(name) and not Path(name).expanduser().exists():
            raise ConfigError(f"{what} {name}: no such directory{near_path(Path(name).expanduser())}")
    for m in metrics:
        metric_fn(m)


# -- the commands ------------------------------------------------------------------------------------
def config_file(path: str) -> str:
    """A config file as given; a folder (a run, say) is told apart before anything is read."""
    p = Path(path)
    if p.is_dir():
        from .rundir import is_run_dir

        if is_run_dir(p):
            raise ConfigError(f"{p} is a run directory, not a config file; to continue that run: "
                              f"sftkit train {p / 'config.yaml'} --resume (or look at it: sftkit ui {p.parent})")
        raise ConfigError(f"{p} is a folder, not a config file (a YAML file such as configs/quickstart.yaml)")
    return path


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(config_file(args.config), args.overrides)  # a bad config answers before torch loads
    from .trainer import launch_processes, train

    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return launch_processes(args.nproc, args.accelerate_config, args.argv)
    if args.overwrite and args.resume:
        raise ConfigError("--overwrite and --resume contradict each other: pick one")
    result = train(cfg, overwrite=args.overwrite, resume=args.resume)
    if not _rank0():
        return 0  # the summary is rank 0's to print
    if cfg.task == "classification":
        from .classifier import format_report

        print(f"done: {result.steps} steps in {result.seconds:.0f}s")
        if result.report:
            print(format_report(result.metrics, result.report))
        print(f"\nrun directory: {result.run_dir}  (model in {result.run_dir / 'final' / 'model'}, confusion.png)")
        return 0
    print(f"done: {result.steps} steps in {result.seconds:.0f}s, final loss {result.final_loss:.4f}"
          + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
          + (f"; forgetting (reference-text perplexity rise) {result.forgetting:+.1%}" if result.forgetting is not None else ""))
    if result.scores:
        held_out = cfg.data.eval or f"the held-out {cfg.data.eval_fraction:.0%} of data.train"
        print(f"\n{'model':<8} {result.metric or cfg.eval.metric:>12}   (on {held_out})")
        for name, value in result.scores.items():
            print(f"{name:<8} {value:>12.3f}")
    print(f"\nrun directory: {result.run_dir}  (merged model in {result.run_dir / 'final' / 'model'})")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from .data import prepare, renderer_for
    from .data.quality import analyse, export_examples, quality_summary, report, write_report
    from .models import load_tokenizer

    cfg = load_config(args.config, args.overrides)
    tok = load_tokenizer(cfg.model.name, cfg.model.revision)
    if cfg.task == "classification":
        from .tasks.classification import inspect

        print(inspect(cfg, tok, embeddings=not args.no_embeddings))
        return 0
    renderer = renderer_for(cfg.data, tok)
    augment = None
    if cfg.data.rag:
        from .tasks.sft import rag_augment

        augment = rag_augment(cfg, renderer)
    prepared = prepare(cfg.data, cfg.train.seed, renderer, augment)
    print(report(prepared, tok, n_samples=args.n, color=sys.stdout.isatty() and not args.no_color))
    if args.report or args.quality:
        q = analyse(prepared.train_rows, prepared.eval_rows, tok, cfg.data.max_length, diversity=not args.no_embeddings)
        print("\n" + quality_summary(q, prepared.train_rows, prepared.eval_rows))
        if args.report:
            path = write_report(q, prepared.train_rows, prepared.train, prepared.eval_rows, Path(args.report))
            print(f"\nwrote {path} with plots")
    if args.export:
        export_examples(prepared.train, args.export)
        print(f"\nwrote {len(prepared.train)} training examples (input_ids, labels) to {args.export}")
    return 0


def cmd_data_clean(args: argparse.Namespace) -> int:
    from .data.quality import clean

    kinds = {k.strip() for k in args.drop.split(",") if k.strip()}
    print(clean(load_config(args.config, args.overrides), kinds, args.near_threshold, Path(args.out)))
    return 0


def in_context(args: argparse.Namespace, shots: str | None = None):
    """The shots and retrieval the flags ask for (eval, generate, chat; compare per row)."""
    from .retrieve import InContext, Rag

    rag = Rag(args.rag, args.k, args.rag_layout) if args.rag else None
    if args.few_shot and not args.shots_from and not Path(getattr(args, "model", "") or "", "config.yaml").is_file():
        raise ConfigError("--few-shot needs --shots-from FILE (rows to take the examples from)")
    return InContext(args.few_shot, shots or args.shots, args.shots_from, args.embedder or "minilm-l6", rag, args.seed)


def check_in_context(args: argparse.Namespace) -> None:
    check_inputs({"--embedder": args.embedder, "--rag": args.rag}, {"--shots-from": args.shots_from})
    if args.rag and not (Path(args.rag) / "sftkit-index.json").is_file():
        raise ConfigError(f"--rag {args.rag}: not an sftkit index (no sftkit-index.json); make one: "
                          f"sftkit index build DOCS... --out {args.rag}")
    if args.k < 1:
        raise ConfigError(f"--k {args.k}: expected at least 1")


def cmd_data_pairs(args: argparse.Namespace) -> int:
    check_inputs({}, {"reviews": args.reviews})
    from .reviews import write_pairs

    stats = write_pairs(args.reviews, args.out)
    print(f"{args.out}: {stats.line()}; train on them with task: preference or task: reward (data.train={args.out})")
    return 0


def cmd_data_agreement(args: argparse.Namespace) -> int:
    check_inputs({}, {"reviews": args.reviews})
    from .reviews import agreement

    print("\n".join(agreement(args.reviews).lines(args.top)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    check_inputs({"model": args.model, "--adapter": args.adapter}, {"--data": args.data}, _metrics(args.metrics))
    check_in_context(args)
    from .compare import run_eval

    sampling = {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    result, _ = run_eval(args.model, args.data, _metrics(args.metrics), adapter=args.adapter,
                         data_overrides=_data_overrides(args.set), context=in_context(args),
                         limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         generate=not args.no_generate, sampling=sampling, costs=True)
    out = Path(args.out) if args.out else (Path(args.model) / "eval" if (Path(args.model) / "final").is_dir()
                                           else Path("eval-" + Path(args.model).name))
    result.write(out)
    for k, v in result.metrics.items():
        print(f"{k:<16} {v:.4f}")
    if result.classification:
        c = result.classification
        print("\nper class: " + ", ".join(f"{k} P {v['precision']:.2f} R {v['recall']:.2f} F1 {v['f1']:.2f}"
                                          for k, v in c["per_class"].items()))
        print("confusion (rows = reference, columns = prediction): " + ", ".join(c["labels"]))
        for label, row in zip(c["per_class"], c["confusion"]):
            print(f"  {label:<14} " + " ".join(f"{x:>5}" for x in row))
    print(f"\nwrote {out / 'eval.json'} and {out / 'predictions.jsonl'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    for d in args.data:  # FILE or NAME=FILE
        check_inputs({}, {"--data": d.rpartition("=")[2] if "=" in d and not Path(d).exists() else d})
    check_inputs({"base": args.base, "run": args.run}, {}, _metrics(args.metrics))
    check_in_context(args)
    modes = tuple(m.strip() for m in args.shots.split(",") if m.strip())
    from .retrieve import SHOT_MODES, Rag

    bad = [m for m in modes if m not in SHOT_MODES]
    if bad or not modes:
        raise ConfigError(f"--shots {args.shots}: expected a comma-separated list of {', '.join(SHOT_MODES)}")
    from .compare import compare, table, verdict

    results, run_dir = compare(args.base, args.run, args.data, _metrics(args.metrics), few_shot=args.few_shot,
                               shots=modes, shots_from=args.shots_from, embedder=args.embedder,
                               rag=Rag(args.rag, args.k, args.rag_layout) if args.rag else None, limit=args.limit,
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(f"\non {', '.join(args.data) or 'the held-out rows of the run'}:")
    print(table(results))
    if len(results) > 2:
        print("\n" + verdict(results, "reward" if "reward" in results["base"].metrics else _metrics(args.metrics)[0]))
    print(f"\nwrote {run_dir / 'report.md'} and {run_dir / 'compare.png'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if (args.best_of > 1 or args.reward) and (args.best_of < 2 or not args.reward):
        raise ConfigError("--best-of N needs N >= 2 and --reward REWARD_RUN (the reward model that picks)")
    check_inputs({"model": args.model, "--adapter": args.adapter, "--reward": args.reward}, {"--input": args.input})
    check_in_context(args)
    context = in_context(args)
    for r in args.runs:
        check_inputs({"--runs": r})
    if args.n > 1 or args.runs:
        if args.reward or context.active or args.tools:
            raise ConfigError("--n / --runs write candidates for people to judge: not with --reward, --tools, "
                              "--few-shot or --rag")
        from .generate import load_for_inference, read_prompts, write_candidates

        rows = read_prompts(args.input)
        names = [args.model, *args.runs]
        if len(set(names)) < len(names):
            raise ConfigError(f"--runs: a model is given twice ({', '.join(names)})")
        sources = [(m, lambda m=m: load_for_inference(m, args.adapter if m == args.model else None)) for m in names]
        made = write_candidates(sources, rows, args.output, args.n, args.max_new_tokens, args.batch_size,
                                args.temperature, args.top_p, args.seed)
        print(f"wrote {made} candidates ({args.n} per prompt from each of {len(names)} models, shuffled) for "
              f"{len(rows)} prompts to {args.output}; judge them on the dashboard's Review page")
        return 0
    if context.active and args.reward:
        raise ConfigError("--best-of with --few-shot or --rag is not offered: the reward model scores the plain prompt")
    from .data import renderer_for
    from .generate import best_of_n, generate_file, load_for_inference, read_prompts, read_tools

    rows = read_prompts(args.input)  # a bad row stops here, before the model loads
    tools = read_tools(args.tools) if args.tools else None
    model, tok, data_cfg = load_for_inference(args.model, args.adapter)
    renderer = renderer_for(data_cfg, tok)
    gen = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, temperature=args.temperature,
               top_p=args.top_p, seed=args.seed)
    if not args.reward:
        n = generate_file(model, renderer, rows, args.output, tools=tools, context=context, data_cfg=data_cfg, **gen)
        print(f"wrote {n} replies to {args.output}")
        return 0
    from .tasks.reward import Scorer

    pairs = best_of_n(model, renderer, rows, Scorer(args.reward).score, args.best_of, args.output, args.pairs_out, **gen)
    print(f"wrote the best of {args.best_of} replies for {len(rows)} prompts to {args.output}"
          + (f"; {pairs} preference pairs (best vs worst) to {args.pairs_out}" if args.pairs_out else ""))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """A reward model's score for each prompt + reply row."""
    import json

    check_inputs({"run": args.run}, {"--input": args.input})
    from .tasks.reward import Scorer, read_scored

    rows, items = read_scored(args.input)
    scores = Scorer(args.run).score(items, args.batch_size)
    with open(args.output, "w", encoding="utf-8") as f:
        for obj, s in zip(rows, scores):
            f.write(json.dumps({**obj, "score": s}, ensure_ascii=False) + "\n")
    print(f"wrote {len(scores)} scores to {args.output}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    check_inputs({"model": args.model, "--adapter": args.adapter})
    check_in_context(args)
    context = in_context(args)
    from .generate import chat, load_for_inference, read_tools

    tools = read_tools(args.tools) if args.tools else None
    model, tok, data_cfg = load_for_inference(args.model, args.adapter)
    if args.system:
        data_cfg.system = args.system
    chat(model, tok, data_cfg, args.max_new_tokens, args.temperature, args.top_p, tools=tools, context=context)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A run's model as a Hugging Face folder (--merge: the adapter merged in) and/or a GGUF file,
    each checked by loading it back and comparing logits with the run's model."""
    from .export import export_run

    export_run(Path(args.run), Path(args.out) if args.out else None, args.merge, Path(args.gguf) if args.gguf else None,
               args.gguf_type, args.push_to_hub, args.overwrite)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import sweep

    cfg = load_config(args.config, args.overrides)
    out = sweep(cfg, args.space, args.trials, args.sampler, args.metric, args.direction, args.out, args.pruner)
    print(f"results: {out / 'trials.csv'}, {out / 'best.yaml'}, {out / 'history.png'}, {out / 'importance.png'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .classifier import predict

    n = predict(args.run, args.input, args.output, batch_size=args.batch_size)
    print(f"wrote {n} predictions (label + probabilities) to {args.output}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .prune import prune

    info = prune(args.model, args.keep_layers, Path(args.out), args.data, args.overwrite)
    print(f"kept {len(info['kept'])} of {info['layers_before']} layers {info['kept']} -> {args.out} "
          f"(removed {info['removed']}, the ones that changed their input least; pruning.json says so)")
    return 0


def cmd_distill_cache(args: argparse.Namespace) -> int:
    from .distill import build

    cfg = load_config(args.config, args.overrides)
    meta = build(cfg, Path(args.out), args.overwrite, args.batch_size)
    print(f"cached the teacher's top {meta['k']} log-probs for {meta['tokens']:,} trained tokens of {meta['examples']:,} "
          f"examples ({meta['bytes'] / 2**20:.1f} MiB) -> {args.out}; train with train.distill.teacher={args.out}")
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    check_inputs({"--embedder": args.embedder})
    from .retrieve import build_index

    stats = build_index(args.docs, args.out, args.embedder, args.chunk_tokens, args.overlap)
    print(f"{args.out}: {stats.line()}")
    return 0


def cmd_index_search(args: argparse.Namespace) -> int:
    if not (Path(args.index) / "sftkit-index.json").is_file():
        raise ConfigError(f"{args.index}: not an sftkit index (no sftkit-index.json); make one: "
                          f"sftkit index build DOCS... --out {args.index}")
    from .retrieve import Index

    for rank, h in enumerate(Index(args.index).search([args.query], args.k)[0], 1):
        text = " ".join(h.text.split())
        print(f"{rank}. {h.score:.3f}  {h.id}  {h.source}" + (f"  {h.title}" if h.title else ""))
        print(f"   {text[:300]}{'...' if len(text) > 300 else ''}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import SynthSettings, synth

    settings = SynthSettings(
        seeds=args.seeds, model=args.model, n=args.n, out=Path(args.out), answer_model=args.answer_model, eval=args.eval,
        reward=args.reward, best_of=args.best_of, shots=args.shots, temperature=args.temperature, top_p=args.top_p,
        answer_temperature=args.answer_temperature, max_new_tokens=args.max_new_tokens, answer_tokens=args.answer_tokens,
        batch_size=args.batch_size, seed=args.seed, max_candidates=args.max_candidates)
    done = synth(settings)
    why = ", ".join(f"{n} {r}" for r, n in sorted(done["rejected_now"].items(), key=lambda x: -x[1])) or "none"
    print(f"{done['kept']} rows in {done['out']} ({done['candidates']} candidates in all); rejected this time: {why} "
          f"(each with its reason in {done['rejected']})")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from .ui import serve

    serve(args.runs_dir, args.host, args.port, token=not args.no_token)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import cache_dir, cached_models

    print(f"aliases (cache: {cache_dir() / 'models'}):")
    for name, description, status in cached_models():
        print(f"  {name:<14} {description}\n  {'':<14} {status}")
    print("any local Hugging Face model directory or hub id works as model.name too")
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    cfg = Config()
    for key in valid_keys():
        obj = cfg
        *path, last = key.split(".")
        for part in path:
            obj = getattr(obj, part)
        print(f"{key} = {getattr(obj, last)!r}")
    return 0


# -- the mapping ---------------------------------------------------------------------------------------
class A:
    """One argument: add_argument's own arguments."""

    def __init__(self, *flags, **options):
        self.flags, self.options = flags, options


@dataclass
class Command:
    fn: object  # (args) -> exit status; None for a group of subcommands
    help: str
    args: list = field(default_factory=list)


GENERATION = [A("--max-new-tokens", type=int, default=64, help="most tokens a reply may have (default 64)"),
              A("--batch-size", type=int, default=16, help="prompts generated together (default 16)"),
              A("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)"),
              A("--top-p", type=float, default=1.0, help="nucleus sampling: keep the likeliest tokens up to this mass"),
              A("--seed", type=int, default=0, help="sampling seed (default 0)")]

def in_context_flags(shots_default: str = "first", compare: bool = False) -> list:
    return [
        A("--few-shot", type=int, default=0, metavar="K",
          help="also score the base with K solved examples in each prompt" if compare else
          "put K solved examples (from --shots-from) in each prompt"),
        A("--shots", default=shots_default,
          help=("comma-separated, a base row each: " if compare else "") + "first (the first K rows), random (K drawn "
          "by --seed), nearest (the K whose prompts are closest by embedding; never the row itself or its near "
          f"duplicate); default {shots_default}"),
        A("--shots-from", help="rows to take the examples from (default: the run's data.train)"),
        A("--embedder", help="sentence encoder for nearest shots (default minilm-l6, the bundled MiniLM); an "
                             "index searches with the embedder it was built with"),
        A("--rag", metavar="INDEX", help=("also score base and tuned with " if compare else "give each prompt ")
          + "the top --k chunks of INDEX (sftkit index build)"),
        A("--k", type=int, default=3, help="chunks retrieved per prompt (default 3)"),
        A("--rag-layout", default="system", choices=["system", "context"],
          help="where the chunks go: a system message (default) or a block before the question in the user turn"),
    ]


COMMANDS: dict[tuple[str, ...], Command] = {
    ('train',): Command(cmd_train, "fine-tune a model: sftkit train CONFIG [section.key=value ...]", [
        A("config", help="YAML config file"),
        A("overrides", nargs="*", help="config overrides, e.g. train.max_steps=200 peft.r=32"),
        A("--overwrite", action="store_true", help="replace an existing run in output_dir"),
        A("--resume", action="store_true", help="continue the run in output_dir from its latest checkpoint"),
        A("--nproc", type=int, default=1, help="train in N processes (data parallel, through accelerate)"),
        A("--accelerate-config", help="an accelerate config file (configs/accelerate/: DDP, FSDP, DeepSpeed)"),
    ]),
    ('data',): Command(None, "look at the data as training will see it", [
    ]),
    ('data', 'inspect'): Command(cmd_data_inspect, "counts, lengths, trained fraction, duplicates and rendered samples", [
        A("config", help="YAML config file (its data and model sections are used)"),
        A("overrides", nargs="*", help="config overrides, e.g. data.max_length=512"),
        A("--n", type=int, default=3, help="samples to render with trained tokens marked"),
        A("--export", metavar="FILE.jsonl", help="write every kept training example's input_ids and labels"),
        A("--no-color", action="store_true", help="mark trained tokens with [[...]] even on a terminal"),
        A("--quality", action="store_true", help="also: near duplicates, contamination, lint, diversity"),
        A("--report", metavar="DIR", help="write data_report.md with plots to DIR (implies --quality)"),
        A("--no-embeddings", action="store_true", help="skip the embedding-based diversity (faster)"),
    ]),
    ('data', 'pairs'): Command(cmd_data_pairs, "preference pairs from people's rankings and grades (a review file)", [
        A("reviews", help="reviews.jsonl: one judgement per line, beside its candidates file"),
        A("--out", required=True, help="JSONL of prompt, chosen, rejected, margin (task: preference / reward)"),
    ]),
    ('data', 'agreement'): Command(cmd_data_agreement, "inter-rater agreement of a review file (Krippendorff's alpha, ordinal)", [
        A("reviews", help="reviews.jsonl"),
        A("--top", type=int, default=5, help="prompts with the most disagreement to show (default 5)"),
    ]),
    ('data', 'clean'): Command(cmd_data_clean, "write the training rows without the flagged ones, and removed.jsonl with reasons", [
        A("config", help="YAML config file"),
        A("overrides", nargs="*", help="config overrides, e.g. data.max_length=512"),
        A("--out", required=True, help="cleaned rows (JSONL); removed.jsonl is written beside it"),
        A("--drop", default=CLEAN_DEFAULT, help="comma-separated: exact-dup, near-dup, contaminated, empty, echo, refusal, template-token, "
                         "debris, too-long, outlier"),
        A("--near-threshold", type=float, default=0.8, help="MinHash Jaccard threshold for near duplicates"),
    ]),
    ('eval',): Command(cmd_eval, "score a model on held-out rows: loss metrics and generation metrics", [
        A("model", help="alias, model directory, run directory, or base model with --adapter"),
        A("--data", required=True, help="held-out rows (any format training reads)"),
        A("--metrics", default="exact_match,token_f1,rouge_l", help="comma-separated: exact_match, exact_match_strict, exact_match_loose, token_f1, rouge_l, contains, tool_call, module:function"),
        A("--adapter", help="a PEFT adapter directory to apply to MODEL"),
        *in_context_flags(),
        A("--limit", type=int, default=0, help="only the first N rows"),
        A("--no-generate", action="store_true", help="loss metrics only"),
        A("--out", help="directory for eval.json and predictions.jsonl"),
        A("--set", action="append", default=[], metavar="data.KEY=VALUE", help="rendering settings, e.g. data.template=plain"),
        *GENERATION,
    ]),
    ('compare',): Command(cmd_compare, "base vs tuned (vs base with few-shot) on the same rows; writes report.md", [
        A("base", help="the model the run started from (alias or directory)"),
        A("run", help="run directory"),
        A("--data", action="append", default=[], metavar="[NAME=]FILE",
          help="held-out rows; more than once for several sets (NAME=FILE names one); "
               "none: the run's own held-out rows, by its named sets"),
        A("--metrics", default="exact_match,token_f1,rouge_l",
          help="comma-separated metrics (as eval); an RL run is scored with its own rewards"),
        *in_context_flags("first,nearest", compare=True),
        A("--limit", type=int, default=0, help="only the first N rows (0 = all)"),
        A("--max-new-tokens", type=int, default=None,
          help="most tokens a reply may have (default 64; an RL run: its rl.max_new_tokens)"),
        A("--batch-size", type=int, default=16, help="prompts generated together (default 16)"),
    ]),
    ('generate',): Command(cmd_generate, "batched replies for a JSONL of prompts", [
        A("model", help="alias, model directory, run directory, or base model with --adapter"),
        A("--input", required=True, help="JSONL rows with messages (ending in a user turn) or prompt"),
        A("--output", required=True, help="JSONL: each input row plus `generated`"),
        A("--adapter", help="a PEFT adapter directory to apply to MODEL"),
        A("--best-of", type=int, default=1, metavar="N", help="sample N replies per prompt, keep the best by --reward"),
        A("--reward", metavar="REWARD_RUN", help="a reward model (task: reward run) that scores the N replies"),
        A("--pairs-out", metavar="FILE.jsonl", help="with --best-of: write best vs worst as preference pairs"),
        A("--n", type=int, default=1, help="candidates for review: N sampled replies per prompt (with --temperature), "
                                           "one line per prompt with `candidates`"),
        A("--runs", nargs="+", default=[], metavar="RUN", help="with --n: also N replies from each of these runs or "
                                                               "models, shuffled in with MODEL's (the source kept in the file)"),
        A("--tools", metavar="TOOLS.json", help="function definitions (a JSON list) the template is given for rows "
                                                 "without a `tools` column; the calls in each reply are parsed into "
                                                 "`tool_calls`"),
        *in_context_flags(),
        *GENERATION,
    ]),
    ('score',): Command(cmd_score, "a reward model's score for each prompt + reply", [
        A("run", help="a task: reward run directory (or a reward model directory)"),
        A("--input", required=True, help="rows: prompt/completion, or messages ending with the reply"),
        A("--output", required=True, help="JSONL: each row plus `score`"),
        A("--batch-size", type=int, default=16, help="rows scored together (default 16)"),
    ]),
    ('chat',): Command(cmd_chat, "interactive chat in the terminal, streaming tokens", [
        A("model", help="alias, model directory, run directory, or base model with --adapter"),
        A("--adapter", help="a PEFT adapter directory to apply to MODEL"),
        A("--system", help="system message"),
        A("--tools", metavar="TOOLS.json", help="function definitions (a JSON list) the template is given; tool "
                                                 "calls in replies are printed parsed"),
        A("--max-new-tokens", type=int, default=256, help="most tokens a reply may have (default 256)"),
        A("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)"),
        A("--top-p", type=float, default=1.0, help="nucleus sampling: keep the likeliest tokens up to this mass"),
        A("--seed", type=int, default=0, help="seed of --shots random (default 0)"),
        *in_context_flags(),
    ]),
    ('export',): Command(cmd_export, "a run's model as a Hugging Face folder (--merge) or GGUF file, checked by reloading", [
        A("run", help="run directory"),
        A("--out", help="Hugging Face model folder to write"),
        A("--merge", action="store_true", help="merge the LoRA adapter into the base weights"),
        A("--gguf", metavar="OUT.gguf", help="also (or only) write a GGUF file, with an Ollama Modelfile beside it"),
        A("--gguf-type", default="f32", choices=["f32", "f16", "q8_0"], help="GGUF weight type"),
        A("--push-to-hub", metavar="REPO", help="upload the exported folder with its model card"),
        A("--overwrite", action="store_true", help="replace what --out or --gguf holds"),
    ]),
    ('sweep',): Command(cmd_sweep, "hyperparameter search on optuna; re-run the same command to continue it", [
        A("config", help="YAML config file: the base every trial starts from"),
        A("overrides", nargs="*", help="config overrides for every trial"),
        A("--space", required=True, help="YAML: config key -> {loguniform|uniform|int: [lo, hi]} or {choice: [...]}"),
        A("--trials", type=int, default=10, help="trials to finish (grid: at most the grid's size)"),
        A("--sampler", default="tpe", choices=["tpe", "random", "grid"], help="how trials pick their values (default tpe)"),
        A("--metric", default="eval_loss", help="eval_loss, final_loss, or eval.metric (with eval.generate)"),
        A("--direction", default="minimize", choices=["minimize", "maximize"], help="whether --metric is to be made small or large"),
        A("--pruner", default="median", choices=["median", "halving", "none"], help="stops unpromising trials early (default median)"),
        A("--out", help="sweep directory (default: <output_dir>/sweep)"),
    ]),
    ('predict',): Command(cmd_predict, "classification: label and probabilities for each row of a file", [
        A("run", help="run directory of a task: classification run, or a classifier model directory"),
        A("--input", required=True, help="rows with a `text` field"),
        A("--output", required=True, help="JSONL: each row plus `predicted` and `probabilities`"),
        A("--batch-size", type=int, default=32, help="rows classified together (default 32)"),
    ]),
    ('prune',): Command(cmd_prune, "a smaller student: drop the decoder layers that change their input least", [
        A("model", help="alias, model directory, or a run's final/model"),
        A("--keep-layers", type=int, required=True, metavar="N", help="decoder layers to keep"),
        A("--out", required=True, help="folder for the pruned model (plain transformers)"),
        A("--data", metavar="CONFIG", help="score layers on this config's training rows (default: bundled general text)"),
        A("--overwrite", action="store_true", help="replace what --out holds"),
    ]),
    ('index',): Command(None, "retrieval: a vector index (LanceDB) of document chunks, for --rag and data.rag", [
    ]),
    ('index', 'build'): Command(cmd_index_build, "chunk and embed documents into an index; run again after they change: "
                                                 "only new or changed documents are embedded", [
        A("docs", nargs="+", metavar="DOCS", help="JSONL files (`text`, optional `title`), .txt / .md files, folders"),
        A("--out", required=True, metavar="INDEX", help="the index folder"),
        A("--chunk-tokens", type=int, default=128, help="chunk size in the embedder's tokens (default 128)"),
        A("--overlap", type=int, default=16, help="tokens a chunk repeats of the one before (default 16)"),
        A("--embedder", default="minilm-l6", help="sentence encoder (default minilm-l6, the bundled MiniLM)"),
    ]),
    ('index', 'search'): Command(cmd_index_search, "the chunks of an index closest to a query, with their scores", [
        A("index", metavar="INDEX", help="an index folder (sftkit index build)"),
        A("query", help="the text to look up"),
        A("--k", type=int, default=5, help="hits to show (default 5)"),
    ]),
    ('distill',): Command(None, "distillation helpers: an offline cache of the teacher's top-k log-probs", [
    ]),
    ('distill', 'cache'): Command(cmd_distill_cache, "run train.distill.teacher once over the training data; keep its top-k per "
                                        "trained token (train.distill.top_k); then train.distill.teacher=DIR", [
        A("config", help="YAML config file (its train.distill section names the teacher)"),
        A("overrides", nargs="*", help="config overrides, e.g. train.distill.top_k=32"),
        A("--out", required=True, help="folder for the cache"),
        A("--batch-size", type=int, default=16, help="rows per teacher pass"),
        A("--overwrite", action="store_true", help="replace a cache this command wrote in --out"),
    ]),
    ('synth',): Command(cmd_synth, "self-instruct: a model writes new tasks from seed tasks and answers them; "
                                      "filtered (ROUGE-L, lint, eval overlap); re-run to continue", [
        A("--seeds", required=True, help="seed tasks (JSONL: alpaca instruction/input/output, prompt/completion "
                                                   "or messages; an `id` field names a seed)"),
        A("--model", default="smollm2-135m", help="writes the new tasks: alias, model directory or run"),
        A("--n", type=int, required=True, help="rows to end with in --out (counting what it holds)"),
        A("--out", required=True, help="JSONL of kept rows; rejected.jsonl is written beside it"),
        A("--answer-model", help="answers the tasks (default: --model)"),
        A("--eval", metavar="FILE", help="held-out rows no synthetic row may nearly duplicate or share a 13-gram with"),
        A("--reward", metavar="REWARD_RUN", help="with --best-of N: the reward model that picks the answer"),
        A("--best-of", type=int, default=1, metavar="N", help="sampled answers per task (needs --reward)"),
        A("--shots", type=int, default=3, help="example tasks in each prompt (one from those kept, once there are some)"),
        A("--temperature", type=float, default=0.8, help="sampling temperature for new tasks"),
        A("--top-p", type=float, default=0.95, help="nucleus sampling for new tasks (default 0.95)"),
        A("--answer-temperature", type=float, default=0.0, help="0 = greedy answers; > 0 with --best-of"),
        A("--max-new-tokens", type=int, default=64, help="tokens for a new task"),
        A("--answer-tokens", type=int, default=256, help="tokens for an answer"),
        A("--batch-size", type=int, default=16, help="candidates per batch (work is saved after each)"),
        A("--seed", type=int, default=0, help="sampling seed (default 0)"),
        A("--max-candidates", type=int, default=0, help="give up after this many candidates (0 = 20 x --n)"),
    ]),
    ('ui',): Command(cmd_ui, "a local web dashboard: runs, live curves, compare, data masks, chat", [
        A("runs_dir", nargs="?", default="runs", help="the runs folder (default runs/)"),
        A("--port", type=int, default=7860, help="the port to listen on (default 7860)"),
        A("--host", default="127.0.0.1", help="127.0.0.1 (default) keeps it on this machine"),
        A("--no-token", action="store_true", help="ask no launch token: any program or page on this machine that "
                                                  "reaches the port can read the runs and chat (not advised)"),
    ]),
    ('models',): Command(cmd_models, "list model aliases and what is cached", [
    ]),
    ('config-keys',): Command(cmd_config_keys, "list every config key with its default", [
    ]),
}


def build_parser() -> argparse.ArgumentParser:
    """argparse from COMMANDS: a group's subcommands under it, each with its arguments and function."""
    # No abbreviated flags: `--o` must not silently mean `--overwrite`.
    p = argparse.ArgumentParser(prog="sftkit", description="Supervised fine-tuning of language models.", allow_abbrev=False)
    groups = {(): p.add_subparsers(dest="command", required=True)}
    for path, command in COMMANDS.items():
        sub = groups[path[:-1]].add_parser(path[-1], help=command.help, allow_abbrev=False)
        for a in command.args:
            sub.add_argument(*a.flags, **a.options)
        if command.fn is None:
            groups[path] = sub.add_subparsers(dest="_".join(path) + "_command", required=True)
        else:
            sub.set_defaults(fn=command.fn)
    return p


def quiet_library_warnings() -> None:
    """Library notices a user cannot act on stay off the terminal: peft reads transformers'
    renamed `is_gradient_checkpointing` (a FutureWarning on every LoRA run)."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    quiet_library_warnings()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    # Overrides may also come after options (`sftkit sweep CFG --trials 4 train.lr=1e-4`).
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except (ConfigError, DataError) as e:
        print(f"sftkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading, data, evaluation): nothing to save
        print("sftkit: interrupted (Ctrl-C) before training started or after it ended; no checkpoint was written "
              "by this step", file=sys.stderr)
        return 130
    except RuntimeError as e:
        from .export import ExportMismatch
        from .job import TrainingError

        if isinstance(e, ExportMismatch):
            print(f"sftkit: export check failed: {e}", file=sys.stderr)
            return 1
        if not isinstance(e, TrainingError):
            raise
        print(f"sftkit: training stopped: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
