"""`sftkit SUBCOMMAND ...`: a plain mapping from subcommand to function."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config, valid_keys
from .data.sources import DataError


def cmd_train(args: argparse.Namespace) -> int:
    from .trainer import train

    cfg = load_config(args.config, args.overrides)
    if args.overwrite and args.resume:
        raise ConfigError("--overwrite and --resume contradict each other: pick one")
    result = train(cfg, overwrite=args.overwrite, resume=args.resume)
    print(f"done: {result.steps} steps in {result.seconds:.0f}s, final loss {result.final_loss:.4f}"
          + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""))
    if result.scores:
        metric = cfg.eval.metric
        print(f"\n{'model':<8} {metric:>12}   (on {cfg.data.eval})")
        for name, value in result.scores.items():
            print(f"{name:<8} {value:>12.3f}")
    print(f"\nrun directory: {result.run_dir}  (merged model in {result.run_dir / 'final' / 'model'})")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from .data import prepare, renderer_for
    from .data.quality import export_examples, report
    from .models import load_tokenizer

    cfg = load_config(args.config, args.overrides)
    tok = load_tokenizer(cfg.model.name)
    prepared = prepare(cfg.data, cfg.train.seed, renderer_for(cfg.data, tok))
    color = sys.stdout.isatty() and not args.no_color
    print(report(prepared, tok, n_samples=args.n, color=color))
    if args.export:
        export_examples(prepared.train, args.export)
        print(f"\nwrote {len(prepared.train)} training examples (input_ids, labels) to {args.export}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import cache_dir, cached_models

    print(f"aliases (cache: {cache_dir() / 'models'}):")
    for name, description, status in cached_models():
        print(f"  {name:<14} {description}\n  {'':<14} {status}")
    print("any local Hugging Face model directory or hub id works as model.name too")
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    from .config import Config

    cfg = Config()
    for key in valid_keys():
        obj = cfg
        *path, last = key.split(".")
        for part in path:
            obj = getattr(obj, part)
        print(f"{key} = {getattr(obj, last)!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sftkit", description="Supervised fine-tuning of language models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune a model: sftkit train CONFIG [section.key=value ...]")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_steps=200 peft.r=32")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    t.add_argument("--resume", action="store_true", help="continue the run in output_dir from its latest checkpoint")
    t.set_defaults(fn=cmd_train)

    d = sub.add_parser("data", help="look at the data as training will see it")
    dsub = d.add_subparsers(dest="data_command", required=True)
    di = dsub.add_parser("inspect", help="counts, lengths, trained fraction, duplicates and rendered samples")
    di.add_argument("config", help="YAML config file (its data and model sections are used)")
    di.add_argument("overrides", nargs="*", help="config overrides, e.g. data.max_length=512")
    di.add_argument("--n", type=int, default=3, help="samples to render with trained tokens marked")
    di.add_argument("--export", metavar="FILE.jsonl", help="write every kept training example's input_ids and labels")
    di.add_argument("--no-color", action="store_true", help="mark trained tokens with [[...]] even on a terminal")
    di.set_defaults(fn=cmd_data_inspect)

    m = sub.add_parser("models", help="list model aliases and what is cached")
    m.set_defaults(fn=cmd_models)

    k = sub.add_parser("config-keys", help="list every config key with its default")
    k.set_defaults(fn=cmd_config_keys)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, DataError) as e:
        print(f"sftkit: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from .trainer import TrainingError

        if not isinstance(e, TrainingError):
            raise
        print(f"sftkit: training stopped: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
