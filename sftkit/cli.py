"""`sftkit SUBCOMMAND ...`: a plain mapping from subcommand to function."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config, valid_keys
from .data.sources import DataError


def launch_processes(args: argparse.Namespace, argv: list[str]) -> int:
    """Re-run this command in N processes through accelerate (torch.distributed; gloo on CPU)."""
    import os
    import socket
    import subprocess

    with socket.socket() as sock:  # a free port, so two runs on one machine never collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(args.nproc),
           "--main_process_port", str(port)]
    cmd += ["--config_file", args.accelerate_config] if args.accelerate_config else ["--multi_gpu"]
    rest, skip = [], False
    for a in argv:  # the same command without --nproc / --accelerate-config
        if skip:
            skip = False
        elif a in ("--nproc", "--accelerate-config"):
            skip = True
        elif not a.startswith(("--nproc=", "--accelerate-config=")):
            rest.append(a)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))}
    print(f"[sftkit] launching {args.nproc} processes: {' '.join(cmd[1:])} -m sftkit {' '.join(rest)}", file=sys.stderr, flush=True)
    rc = subprocess.call(cmd + ["-m", "sftkit", *rest], env=env)
    if rc != 0:
        print(f"sftkit: error: a training process failed (exit {rc}; the launcher's report above names the rank); "
              "the other processes were stopped", file=sys.stderr)
    return rc


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from .trainer import train

    cfg = load_config(args.config, args.overrides)
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return launch_processes(args, args.argv)
    if args.overwrite and args.resume:
        raise ConfigError("--overwrite and --resume contradict each other: pick one")
    if cfg.task == "classification":
        from .classify import format_report

        res = train(cfg, overwrite=args.overwrite, resume=args.resume)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0  # the summary is rank 0's to print
        print(f"done: {res.steps} steps in {res.seconds:.0f}s")
        if res.report:
            print(format_report(res.metrics, res.report))
        print(f"\nrun directory: {res.run_dir}  (model in {res.run_dir / 'final' / 'model'}, confusion.png)")
        return 0
    result = train(cfg, overwrite=args.overwrite, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # the summary is rank 0's to print
    print(f"done: {result.steps} steps in {result.seconds:.0f}s, final loss {result.final_loss:.4f}"
          + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
          + (f"; forgetting (reference-text perplexity rise) {result.forgetting:+.1%}" if result.forgetting is not None else ""))
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
    tok = load_tokenizer(cfg.model.name, cfg.model.revision)
    if cfg.task == "classification":
        return inspect_classification(cfg, tok, args)
    prepared = prepare(cfg.data, cfg.train.seed, renderer_for(cfg.data, tok))
    color = sys.stdout.isatty() and not args.no_color
    print(report(prepared, tok, n_samples=args.n, color=color))
    if args.report or args.quality:
        from pathlib import Path

        from .data.quality import analyse, quality_summary, write_report

        q = analyse(prepared.train_rows, prepared.eval_rows, tok, cfg.data.max_length, diversity=not args.no_embeddings)
        print("\n" + quality_summary(q, prepared.train_rows, prepared.eval_rows))
        if args.report:
            path = write_report(q, prepared.train_rows, prepared.train, prepared.eval_rows, Path(args.report))
            print(f"\nwrote {path} with plots")
    if args.export:
        export_examples(prepared.train, args.export)
        print(f"\nwrote {len(prepared.train)} training examples (input_ids, labels) to {args.export}")
    return 0


def _metrics(arg: str) -> list[str]:
    return [m.strip() for m in arg.split(",") if m.strip()]


def _data_overrides(items: list[str]) -> dict | None:
    """`--set data.KEY=VALUE` items as a dict, checked; they are laid over the run's own data settings."""
    from .config import parse_overrides, with_overrides

    if not items:
        return None
    bad = [i for i in items if not i.startswith("data.")]
    if bad:
        raise ConfigError(f"--set takes data.* keys only here, got {bad[0]!r}")
    overrides = parse_overrides(items)
    with_overrides(load_config(None), overrides)  # unknown keys and bad values stop here, before any model loads
    return overrides


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .compare import run_eval

    sampling = {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    result, _ = run_eval(args.model, args.data, _metrics(args.metrics), adapter=args.adapter,
                         data_overrides=_data_overrides(args.set), few_shot=args.few_shot, shots_from=args.shots_from,
                         limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         generate=not args.no_generate, sampling=sampling)
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
    from .compare import compare, table

    results, run_dir = compare(args.base, args.run, args.data, _metrics(args.metrics), few_shot=args.few_shot,
                               shots_from=args.shots_from, limit=args.limit, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size)
    print(f"\non {args.data}:")
    print(table(results))
    print(f"\nwrote {run_dir / 'report.md'} and {run_dir / 'compare.png'}")
    return 0


def _prompt_of(obj, path: str, line: int) -> list[dict[str, str]]:
    """Input rows for generation: messages (a trailing reply is dropped) or a prompt."""
    from .data.sources import DataError

    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        msgs = [m for m in obj["messages"] if isinstance(m, dict)]
        while msgs and msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
        if msgs and msgs[-1].get("role") == "user":
            return [{"role": m["role"], "content": m["content"]} for m in msgs]
    elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
        return [{"role": "user", "content": obj["prompt"]}]
    elif isinstance(obj, dict) and isinstance(obj.get("prompt"), list):
        return obj["prompt"]
    raise DataError(f"{path}:{line}: expected `messages` ending with a user turn, or `prompt`")


def cmd_generate(args: argparse.Namespace) -> int:
    import json

    from tqdm.auto import tqdm

    from .data import renderer_for
    from .data.sources import DataError, read_source
    from .generate import generate, load_for_inference

    model, tok, data_cfg = load_for_inference(args.model, args.adapter)
    objs = []
    for line, obj in read_source(args.input):
        if isinstance(obj, DataError):
            raise obj
        objs.append((obj, _prompt_of(obj, args.input, line)))
    renderer = renderer_for(data_cfg, tok)
    if args.best_of > 1 or args.reward:
        return best_of_n(args, model, renderer, objs)
    with tqdm(total=len(objs), desc="generate", file=sys.stderr) as bar:
        replies = generate(model, renderer, [p for _, p in objs], args.max_new_tokens, args.batch_size, bar.update,
                           temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    with open(args.output, "w", encoding="utf-8") as f:
        for (obj, _), reply in zip(objs, replies):
            f.write(json.dumps({**obj, "generated": reply}, ensure_ascii=False) + "\n")
    print(f"wrote {len(replies)} replies to {args.output}")
    return 0


def best_of_n(args: argparse.Namespace, model, renderer, objs: list) -> int:
    """Rejection sampling: N sampled replies per prompt, scored by a reward model; the best is kept and
    every score recorded; --pairs-out writes (best, worst) as preference pairs."""
    import json

    from tqdm.auto import tqdm

    from .generate import generate
    from .tasks.reward import Scorer

    if args.best_of < 2 or not args.reward:
        raise ConfigError("--best-of N needs N >= 2 and --reward REWARD_RUN (the reward model that picks)")
    if args.temperature <= 0:
        raise ConfigError("--best-of samples: give --temperature > 0 (e.g. 0.8), or the N replies are the same")
    scorer = Scorer(args.reward)
    prompts = [p for _, p in objs]
    samples: list[list[str]] = [[] for _ in prompts]
    with tqdm(total=len(prompts) * args.best_of, desc=f"generate (best of {args.best_of})", file=sys.stderr) as bar:
        for k in range(args.best_of):  # the k-th sample of every prompt, with its own seed
            for i, reply in enumerate(generate(model, renderer, prompts, args.max_new_tokens, args.batch_size, bar.update,
                                               temperature=args.temperature, top_p=args.top_p, seed=args.seed + k)):
                samples[i].append(reply)
    flat = [(p, [{"role": "assistant", "content": r}]) for p, rs in zip(prompts, samples) for r in rs]
    scores = scorer.score(flat)
    n = args.best_of
    pairs = 0
    with open(args.output, "w", encoding="utf-8") as out, \
            (open(args.pairs_out, "w", encoding="utf-8") if args.pairs_out else open("/dev/null", "w")) as pairs_file:
        for i, ((obj, prompt), replies) in enumerate(zip(objs, samples)):
            s = scores[i * n : (i + 1) * n]
            best, worst = max(range(n), key=s.__getitem__), min(range(n), key=s.__getitem__)
            out.write(json.dumps({**obj, "generated": replies[best], "score": s[best],
                                  "candidates": [{"reply": r, "score": x} for r, x in zip(replies, s)]},
                                 ensure_ascii=False) + "\n")
            if args.pairs_out and s[best] > s[worst] and replies[best] != replies[worst]:
                pairs_file.write(json.dumps({"prompt": prompt, "chosen": replies[best], "rejected": replies[worst],
                                             "margin": s[best] - s[worst]}, ensure_ascii=False) + "\n")
                pairs += 1
    print(f"wrote the best of {n} replies for {len(objs)} prompts to {args.output}"
          + (f"; {pairs} preference pairs (best vs worst) to {args.pairs_out}" if args.pairs_out else ""))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """A reward model's score for each prompt + reply row."""
    import json

    from .data.sources import DataError, Normaliser, read_source
    from .tasks.reward import Scorer

    scorer = Scorer(args.run)
    norm = Normaliser(args.input)
    rows, items = [], []
    for line, obj in read_source(args.input):
        if isinstance(obj, DataError):
            raise obj
        row = norm(obj, line)
        if row.text is not None or row.messages[-1]["role"] != "assistant":
            raise DataError(f"{args.input}:{line}: a row to score is a prompt and its reply (prompt/completion, or "
                            "messages ending with the assistant's reply)", "no reply")
        cut = max(i for i, m in enumerate(row.messages) if m["role"] == "user") + 1
        rows.append(obj)
        items.append((row.messages[:cut], row.messages[cut:]))
    scores = scorer.score(items, args.batch_size)
    with open(args.output, "w", encoding="utf-8") as f:
        for obj, s in zip(rows, scores):
            f.write(json.dumps({**obj, "score": s}, ensure_ascii=False) + "\n")
    print(f"wrote {len(scores)} scores to {args.output}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .generate import chat, load_for_inference

    model, tok, data_cfg = load_for_inference(args.model, args.adapter)
    if args.system:
        data_cfg.system = args.system
    chat(model, tok, data_cfg, args.max_new_tokens, args.temperature, args.top_p)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A run's model as a Hugging Face folder (--merge: the adapter merged in) and/or a GGUF file,
    each checked by loading it back and comparing logits with the run's model."""
    from pathlib import Path

    from .config import load_config
    from .export import hub_folder

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"export: {run} is not a run directory (no config.yaml)")
    if not (run / "final" / "model").is_dir():
        raise ConfigError(f"export: {run} has no final model (did the run finish?)")
    if not (args.out or args.gguf or args.push_to_hub):
        raise ConfigError("export: say where: --out DIR (a Hugging Face folder), --gguf FILE.gguf, and/or --push-to-hub REPO")
    cfg = load_config(run / "config.yaml")
    gguf_path = export_gguf(run, cfg, Path(args.gguf), args.gguf_type, args.overwrite) if args.gguf else None
    if args.out:
        export_folder(run, cfg, Path(args.out), args.merge, args.overwrite)
    if args.push_to_hub:
        folder = hub_folder(run, Path(args.out) if args.out else None, gguf_path)
        from huggingface_hub import HfApi

        try:
            api = HfApi()
            api.create_repo(args.push_to_hub, exist_ok=True)
            api.upload_folder(repo_id=args.push_to_hub, folder_path=str(folder))
        except Exception as e:  # noqa: BLE001 - offline, no token, no rights: one line whatever the cause
            raise ConfigError(f"--push-to-hub {args.push_to_hub}: upload failed ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); the folder it would upload is "
                              f"{folder}") from None
        print(f"uploaded {folder} to {args.push_to_hub}")
    return 0


def export_folder(run, cfg, out, merge: bool, overwrite: bool) -> None:
    import shutil

    from .export import check_export, merge_adapter, probe_rows

    adapter = run / "final" / "adapter"
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"export: {out} is not empty; pass --overwrite to replace it")
    if not adapter.is_dir() or (adapter.is_dir() and not merge):
        src = run / "final" / "model" if not adapter.is_dir() else adapter
        shutil.copytree(src, out, dirs_exist_ok=True)  # full / freeze: already a model; LoRA: the adapter
        print(f"copied {src} to {out}" + ("" if not adapter.is_dir() else " (add --merge for a standalone model)"))
        return
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import load_model

    merged = merge_adapter(cfg.model.name, adapter, "float32", cfg.model.revision)
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(out)  # the tokenizer the run saved, with its template
    (out / "README.md").write_text((run / "final" / "model" / "README.md").read_text() if
                                   (run / "final" / "model" / "README.md").is_file() else "")
    # Check: the merged folder, loaded back, against base + adapter as training ran it.
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    qlora = cfg.peft.method == "qlora"
    base, _ = load_model(cfg.model.name, "float32" if not qlora else cfg.model.dtype, cfg.model.revision, qlora)
    unmerged = PeftModel.from_pretrained(base, str(adapter)).eval()
    rows = probe_rows(run)
    if qlora:  # merged into full precision vs the 4-bit model it trained with: report, do not hide
        from .export import max_logit_difference

        diff = max_logit_difference(unmerged, reloaded, rows)
        print(f"[sftkit] QLoRA: merged into the full-precision base vs the 4-bit training model: max |logit "
              f"difference| {diff:.3g} (the 4-bit rounding of the base; not a fault of the export)", file=sys.stderr)
    else:
        check_export(unmerged, reloaded, rows, "merge", f"merged model {out}")
    print(f"merged {adapter} into {cfg.model.name} -> {out} (loads with AutoModelForCausalLM.from_pretrained)")


def export_gguf(run, cfg, path, kind: str, overwrite: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .export import check_export, load_gguf, modelfile, probe_rows, write_gguf

    if path.suffix != ".gguf":
        raise ConfigError(f"--gguf {path}: the file name must end in .gguf")
    if path.exists() and not overwrite:
        raise ConfigError(f"--gguf {path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    src = run / "final" / "model"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    write_gguf(model, tok, path, kind, name=run.name)
    (path.parent / "Modelfile").write_text(modelfile(path.name, tok, cfg.data.system))
    reloaded, _ = load_gguf(path)
    check_export(model, reloaded, probe_rows(run), kind, f"GGUF {path} ({kind})")
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {kind}) and {path.parent / 'Modelfile'}")
    return path


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import sweep

    cfg = load_config(args.config, args.overrides)
    out = sweep(cfg, args.space, args.trials, args.sampler, args.metric, args.direction, args.out, args.pruner)
    print(f"results: {out / 'trials.csv'}, {out / 'best.yaml'}, {out / 'history.png'}, {out / 'importance.png'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .classify import predict

    n = predict(args.run, args.input, args.output, batch_size=args.batch_size)
    print(f"wrote {n} predictions (label + probabilities) to {args.output}")
    return 0


def inspect_classification(cfg, tok, args: argparse.Namespace) -> int:
    from collections import Counter

    from .classify import read_labelled
    from .data.quality import analyse, percentile, quality_summary
    from .data.sources import Row

    rows, skipped = read_labelled(cfg.data.train, cfg.data.columns, cfg.data.on_error)
    counts = Counter(r.label for r in rows)
    lengths = [len(x) for x in tok([r.text for r in rows], add_special_tokens=False)["input_ids"]]
    print(f"train: {len(rows)} rows" + (f", skipped {dict(skipped)}" if skipped else "") + "; labels: "
          + ", ".join(f"{k} {v} ({v / len(rows):.0%})" for k, v in counts.most_common()))
    print(f"tokens per text: p50 {percentile(lengths, 50)}, p90 {percentile(lengths, 90)}, max {max(lengths)}; "
          f"{sum(n > cfg.data.max_length for n in lengths)} longer than data.max_length={cfg.data.max_length}")
    as_rows = [Row([], r.source, r.line, "text", text=r.text) for r in rows]
    tests = []
    if cfg.data.eval:
        tests = [Row([], r.source, r.line, "text", text=r.text) for r in read_labelled(cfg.data.eval, cfg.data.columns)[0]]
    q = analyse(as_rows, tests, tok, cfg.data.max_length, diversity=not args.no_embeddings, labels=[r.label for r in rows])
    print("\n" + quality_summary(q, as_rows, tests))
    return 0


def cmd_data_clean(args: argparse.Namespace) -> int:
    """Every row of the training sources ends in exactly one of two files: the cleaned rows, or
    removed.jsonl with the reason (a quality finding, or the message of a row that does not validate)."""
    import json
    from pathlib import Path

    from .data.quality import DROP_KINDS, plan_clean

    kinds = {k.strip() for k in args.drop.split(",") if k.strip()}
    unknown = kinds - set(DROP_KINDS)
    if unknown:
        raise ConfigError(f"--drop: unknown kinds {sorted(unknown)} (choose from {', '.join(DROP_KINDS)})")
    cfg = load_config(args.config, args.overrides)
    rows, stats, removed = plan_clean(cfg, kinds, args.near_threshold)
    out = Path(args.out)
    gone_path = out.with_name("removed.jsonl")
    with open(out, "w", encoding="utf-8") as kept, open(gone_path, "w", encoding="utf-8") as gone:
        for message, raw in stats.invalid:
            source = message.split(": ", 1)[0]
            gone.write(json.dumps({"source": source, "reason": message.removeprefix(source + ": "), "row": raw},
                                  ensure_ascii=False) + "\n")
        for i, r in enumerate(rows):
            if i in removed:
                gone.write(json.dumps({"source": f"{r.source}:{r.line}", "reason": removed[i], "row": r.raw},
                                      ensure_ascii=False) + "\n")
            else:
                kept.write(json.dumps(r.raw, ensure_ascii=False) + "\n")
    by_reason: dict[str, int] = dict(stats.skipped)
    for reason in removed.values():
        key = reason.split(" of row")[0].split(" with eval")[0]
        by_reason[key] = by_reason.get(key, 0) + 1
    n_removed = len(removed) + len(stats.invalid)
    print(f"read {stats.rows} = kept {len(rows) - len(removed)} + removed {n_removed}; kept -> {out}, "
          f"removed -> {gone_path}" + (f" ({by_reason})" if by_reason else ""))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .prune import prune

    info = prune(args.model, args.keep_layers, Path(args.out), args.data, args.overwrite)
    print(f"kept {len(info['kept'])} of {info['layers_before']} layers {info['kept']} -> {args.out} "
          f"(removed {info['removed']}, the ones that changed their input least; pruning.json says so)")
    return 0


def cmd_distill_cache(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .distill import build

    cfg = load_config(args.config, args.overrides)
    meta = build(cfg, Path(args.out), args.overwrite, args.batch_size)
    print(f"cached the teacher's top {meta['k']} log-probs for {meta['tokens']:,} trained tokens of {meta['examples']:,} "
          f"examples ({meta['bytes'] / 2**20:.1f} MiB) -> {args.out}; train with train.distill.teacher={args.out}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from pathlib import Path

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

    serve(args.runs_dir, args.host, args.port)
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
    from .data.quality import CLEAN_DEFAULT

    p = argparse.ArgumentParser(prog="sftkit", description="Supervised fine-tuning of language models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune a model: sftkit train CONFIG [section.key=value ...]")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_steps=200 peft.r=32")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    t.add_argument("--resume", action="store_true", help="continue the run in output_dir from its latest checkpoint")
    t.add_argument("--nproc", type=int, default=1, help="train in N processes (data parallel, through accelerate)")
    t.add_argument("--accelerate-config", help="an accelerate config file (configs/accelerate/: DDP, FSDP, DeepSpeed)")
    t.set_defaults(fn=cmd_train)

    d = sub.add_parser("data", help="look at the data as training will see it")
    dsub = d.add_subparsers(dest="data_command", required=True)
    di = dsub.add_parser("inspect", help="counts, lengths, trained fraction, duplicates and rendered samples")
    di.add_argument("config", help="YAML config file (its data and model sections are used)")
    di.add_argument("overrides", nargs="*", help="config overrides, e.g. data.max_length=512")
    di.add_argument("--n", type=int, default=3, help="samples to render with trained tokens marked")
    di.add_argument("--export", metavar="FILE.jsonl", help="write every kept training example's input_ids and labels")
    di.add_argument("--no-color", action="store_true", help="mark trained tokens with [[...]] even on a terminal")
    di.add_argument("--quality", action="store_true", help="also: near duplicates, contamination, lint, diversity")
    di.add_argument("--report", metavar="DIR", help="write data_report.md with plots to DIR (implies --quality)")
    di.add_argument("--no-embeddings", action="store_true", help="skip the embedding-based diversity (faster)")
    di.set_defaults(fn=cmd_data_inspect)

    dc = dsub.add_parser("clean", help="write the training rows without the flagged ones, and removed.jsonl with reasons")
    dc.add_argument("config", help="YAML config file")
    dc.add_argument("overrides", nargs="*")
    dc.add_argument("--out", required=True, help="cleaned rows (JSONL); removed.jsonl is written beside it")
    dc.add_argument("--drop", default=CLEAN_DEFAULT,
                    help="comma-separated: exact-dup, near-dup, contaminated, empty, echo, refusal, template-token, "
                         "debris, too-long, outlier")
    dc.add_argument("--near-threshold", type=float, default=0.8, help="MinHash Jaccard threshold for near duplicates")
    dc.set_defaults(fn=cmd_data_clean)

    def gen_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=0)

    e = sub.add_parser("eval", help="score a model on held-out rows: loss metrics and generation metrics")
    e.add_argument("model", help="alias, model directory, run directory, or base model with --adapter")
    e.add_argument("--data", required=True, help="held-out rows (any format training reads)")
    e.add_argument("--metrics", default="exact_match,token_f1,rouge_l",
                   help="comma-separated: exact_match, exact_match_strict, exact_match_loose, token_f1, rouge_l, module:function")
    e.add_argument("--adapter", help="a PEFT adapter directory to apply to MODEL")
    e.add_argument("--few-shot", type=int, default=0, help="put K solved training examples in each prompt")
    e.add_argument("--shots-from", help="rows to take few-shot examples from (default: the run's data.train)")
    e.add_argument("--limit", type=int, default=0, help="only the first N rows")
    e.add_argument("--no-generate", action="store_true", help="loss metrics only")
    e.add_argument("--out", help="directory for eval.json and predictions.jsonl")
    e.add_argument("--set", action="append", default=[], metavar="data.KEY=VALUE", help="rendering settings, e.g. data.template=plain")
    gen_opts(e)
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("compare", help="base vs tuned (vs base with few-shot) on the same rows; writes report.md")
    c.add_argument("base", help="the model the run started from (alias or directory)")
    c.add_argument("run", help="run directory")
    c.add_argument("--data", required=True, help="held-out rows")
    c.add_argument("--metrics", default="exact_match,token_f1,rouge_l")
    c.add_argument("--few-shot", type=int, default=0, help="also score the base with K examples in the prompt")
    c.add_argument("--shots-from", help="rows to take few-shot examples from (default: the run's data.train)")
    c.add_argument("--limit", type=int, default=0)
    c.add_argument("--max-new-tokens", type=int, default=64)
    c.add_argument("--batch-size", type=int, default=16)
    c.set_defaults(fn=cmd_compare)

    g = sub.add_parser("generate", help="batched replies for a JSONL of prompts")
    g.add_argument("model", help="alias, model directory, run directory, or base model with --adapter")
    g.add_argument("--input", required=True, help="JSONL rows with messages (ending in a user turn) or prompt")
    g.add_argument("--output", required=True, help="JSONL: each input row plus `generated`")
    g.add_argument("--adapter")
    g.add_argument("--best-of", type=int, default=1, metavar="N", help="sample N replies per prompt, keep the best by --reward")
    g.add_argument("--reward", metavar="REWARD_RUN", help="a reward model (task: reward run) that scores the N replies")
    g.add_argument("--pairs-out", metavar="FILE.jsonl", help="with --best-of: write best vs worst as preference pairs")
    gen_opts(g)
    g.set_defaults(fn=cmd_generate)

    sc = sub.add_parser("score", help="a reward model's score for each prompt + reply")
    sc.add_argument("run", help="a task: reward run directory (or a reward model directory)")
    sc.add_argument("--input", required=True, help="rows: prompt/completion, or messages ending with the reply")
    sc.add_argument("--output", required=True, help="JSONL: each row plus `score`")
    sc.add_argument("--batch-size", type=int, default=16)
    sc.set_defaults(fn=cmd_score)

    ch = sub.add_parser("chat", help="interactive chat in the terminal, streaming tokens")
    ch.add_argument("model", help="alias, model directory, run directory, or base model with --adapter")
    ch.add_argument("--adapter")
    ch.add_argument("--system", help="system message")
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.0)
    ch.add_argument("--top-p", type=float, default=1.0)
    ch.set_defaults(fn=cmd_chat)

    x = sub.add_parser("export", help="a run's model as a Hugging Face folder (--merge) or GGUF file, checked by reloading")
    x.add_argument("run", help="run directory")
    x.add_argument("--out", help="Hugging Face model folder to write")
    x.add_argument("--merge", action="store_true", help="merge the LoRA adapter into the base weights")
    x.add_argument("--gguf", metavar="OUT.gguf", help="also (or only) write a GGUF file, with an Ollama Modelfile beside it")
    x.add_argument("--gguf-type", default="f32", choices=["f32", "f16", "q8_0"], help="GGUF weight type")
    x.add_argument("--push-to-hub", metavar="REPO", help="upload the exported folder with its model card")
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(fn=cmd_export)

    sw = sub.add_parser("sweep", help="hyperparameter search on optuna; re-run the same command to continue it")
    sw.add_argument("config", help="YAML config file: the base every trial starts from")
    sw.add_argument("overrides", nargs="*", help="config overrides for every trial")
    sw.add_argument("--space", required=True, help="YAML: config key -> {loguniform|uniform|int: [lo, hi]} or {choice: [...]}")
    sw.add_argument("--trials", type=int, default=10, help="trials to finish (grid: at most the grid's size)")
    sw.add_argument("--sampler", default="tpe", choices=["tpe", "random", "grid"])
    sw.add_argument("--metric", default="eval_loss", help="eval_loss, final_loss, or eval.metric (with eval.generate)")
    sw.add_argument("--direction", default="minimize", choices=["minimize", "maximize"])
    sw.add_argument("--pruner", default="median", choices=["median", "halving", "none"])
    sw.add_argument("--out", help="sweep directory (default: <output_dir>/sweep)")
    sw.set_defaults(fn=cmd_sweep)

    pr = sub.add_parser("predict", help="classification: label and probabilities for each row of a file")
    pr.add_argument("run", help="run directory of a task: classification run, or a classifier model directory")
    pr.add_argument("--input", required=True, help="rows with a `text` field")
    pr.add_argument("--output", required=True, help="JSONL: each row plus `predicted` and `probabilities`")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.set_defaults(fn=cmd_predict)

    pn = sub.add_parser("prune", help="a smaller student: drop the decoder layers that change their input least")
    pn.add_argument("model", help="alias, model directory, or a run's final/model")
    pn.add_argument("--keep-layers", type=int, required=True, metavar="N", help="decoder layers to keep")
    pn.add_argument("--out", required=True, help="folder for the pruned model (plain transformers)")
    pn.add_argument("--data", metavar="CONFIG", help="score layers on this config's training rows (default: bundled general text)")
    pn.add_argument("--overwrite", action="store_true")
    pn.set_defaults(fn=cmd_prune)

    ds = sub.add_parser("distill", help="distillation helpers: an offline cache of the teacher's top-k log-probs")
    ds_sub = ds.add_subparsers(dest="distill_command", required=True)
    dsc = ds_sub.add_parser("cache", help="run train.distill.teacher once over the training data; keep its top-k per "
                                        "trained token (train.distill.top_k); then train.distill.teacher=DIR")
    dsc.add_argument("config")
    dsc.add_argument("overrides", nargs="*", help="config overrides, e.g. train.distill.top_k=32")
    dsc.add_argument("--out", required=True, help="folder for the cache")
    dsc.add_argument("--batch-size", type=int, default=16, help="rows per teacher pass")
    dsc.add_argument("--overwrite", action="store_true")
    dsc.set_defaults(fn=cmd_distill_cache)

    sy = sub.add_parser("synth", help="self-instruct: a model writes new tasks from seed tasks and answers them; "
                                      "filtered (ROUGE-L, lint, eval overlap); re-run to continue")
    sy.add_argument("--seeds", required=True, help="seed tasks (JSONL: alpaca instruction/input/output, prompt/completion "
                                                   "or messages; an `id` field names a seed)")
    sy.add_argument("--model", default="smollm2-135m", help="writes the new tasks: alias, model directory or run")
    sy.add_argument("--n", type=int, required=True, help="rows to end with in --out (counting what it holds)")
    sy.add_argument("--out", required=True, help="JSONL of kept rows; rejected.jsonl is written beside it")
    sy.add_argument("--answer-model", help="answers the tasks (default: --model)")
    sy.add_argument("--eval", metavar="FILE", help="held-out rows no synthetic row may nearly duplicate or share a 13-gram with")
    sy.add_argument("--reward", metavar="REWARD_RUN", help="with --best-of N: the reward model that picks the answer")
    sy.add_argument("--best-of", type=int, default=1, metavar="N", help="sampled answers per task (needs --reward)")
    sy.add_argument("--shots", type=int, default=3, help="example tasks in each prompt (one from those kept, once there are some)")
    sy.add_argument("--temperature", type=float, default=0.8, help="sampling temperature for new tasks")
    sy.add_argument("--top-p", type=float, default=0.95)
    sy.add_argument("--answer-temperature", type=float, default=0.0, help="0 = greedy answers; > 0 with --best-of")
    sy.add_argument("--max-new-tokens", type=int, default=64, help="tokens for a new task")
    sy.add_argument("--answer-tokens", type=int, default=256, help="tokens for an answer")
    sy.add_argument("--batch-size", type=int, default=16, help="candidates per batch (work is saved after each)")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--max-candidates", type=int, default=0, help="give up after this many candidates (0 = 20 x --n)")
    sy.set_defaults(fn=cmd_synth)

    u = sub.add_parser("ui", help="a local web dashboard: runs, live curves, compare, data masks, chat")
    u.add_argument("runs_dir", nargs="?", default="runs", help="the runs folder (default runs/)")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default) keeps it on this machine")
    u.set_defaults(fn=cmd_ui)

    m = sub.add_parser("models", help="list model aliases and what is cached")
    m.set_defaults(fn=cmd_models)

    k = sub.add_parser("config-keys", help="list every config key with its default")
    k.set_defaults(fn=cmd_config_keys)
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
        from .trainer import TrainingError

        if isinstance(e, ExportMismatch):
            print(f"sftkit: export check failed: {e}", file=sys.stderr)
            return 1
        if not isinstance(e, TrainingError):
            raise
        print(f"sftkit: training stopped: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
