"""Data: read and normalise rows (sources), render them to token ids and labels (render), batch (packing).

`prepare` is the one path from `data.*` config to training examples; training, `data inspect` and
evaluation all take it, so a row is rendered the same way everywhere.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files

from ..config import DataConfig
from .render import Example, Renderer, RenderStats, build_examples
from .sources import DataError, ReadStats, Row, eval_sources, load_rows, mix, named_sources, split_eval


@dataclass
class Prepared:
    train: list[Example]
    eval: list[Example]
    train_rows: list[Row]
    eval_rows: list[Row]
    train_stats: RenderStats
    eval_stats: RenderStats | None
    read_stats: ReadStats = field(default_factory=ReadStats)  # rows read and skipped (on_error=skip)
    eval_sets: dict[str, tuple[list[Example], list[Row]]] = field(default_factory=dict)  # named sets: (examples, rows)

    def summary(self) -> list[str]:
        lines = []
        if self.read_stats.skipped:
            skipped = ", ".join(f"{n} {r}" for r, n in self.read_stats.skipped.most_common())
            lines.append(f"skipped while reading (data.on_error=skip): {skipped}")
        lines.append(self.train_stats.summary("train"))
        if self.eval_stats is not None:
            lines.append(self.eval_stats.summary("eval"))
        return lines


def read(cfg: DataConfig, seed: int) -> tuple[list[Row], list[Row], ReadStats]:
    """Training and held-out rows as the config describes them (mix, split), before tokenization."""
    sources = named_sources(cfg.train)
    if not sources:
        raise DataError("data.train is not set: give a training file (data.train=path/to/train.jsonl)")
    stats = ReadStats()
    groups = [(load_rows(path, cfg.format, cfg.columns, cfg.system, cfg.on_error, stats), w) for path, w, _ in sources]
    held: list[Row] = []
    if cfg.eval:
        for path, name in eval_sources(cfg.eval):
            rows = load_rows(path, cfg.format, cfg.columns, cfg.system, cfg.on_error, stats, split="validation")
            held += [dataclasses.replace(r, eval_set=name) for r in rows] if name else rows
    elif cfg.eval_fraction > 0:
        # Each source is split before mixing, so that repeating a source (weight 2) cannot put a row
        # on both sides, and replay text is added to the training side only. A named source's
        # held-out rows are an eval set of that name.
        split = [(split_eval(rows, cfg.eval_fraction, seed), w) for rows, w in groups]
        groups = [(tr, w) for (tr, _), w in split]
        held = [dataclasses.replace(r, eval_set=name) if name else r
                for ((_, ev), _), (_, _, name) in zip(split, sources) for r in ev]
    train = mix(groups, seed) if len(groups) > 1 or groups[0][1] != 1.0 else groups[0][0]
    if cfg.replay:
        train = train + replay_rows(cfg.replay, len(train), seed)
    return train, held, stats


def resource(name: str) -> str:
    """A file shipped inside the package (e.g. the built-in reference text)."""
    return str(files("sftkit") / "resources" / name)


def text_source(spec: str) -> str:
    return resource("reference.jsonl") if spec == "builtin" else spec


def replay_rows(spec: dict, n_train: int, seed: int) -> list[Row]:
    """data.replay {source, ratio}: general-text rows (loss on every token), ratio x the task rows, drawn by seed."""
    unknown = set(spec) - {"source", "ratio"}
    if unknown or "source" not in spec:
        raise DataError(f"data.replay: expected {{source: FILE or builtin, ratio: 0.1}}, got {spec!r}")
    ratio = float(spec.get("ratio", 0.1))
    if not 0 < ratio <= 10:
        raise DataError(f"data.replay.ratio: expected a number in (0, 10], got {ratio}")
    rows = load_rows(text_source(str(spec["source"])), "text")
    n = max(1, round(ratio * n_train))
    rng = random.Random(seed + 1)
    return [rows[rng.randrange(len(rows))] for _ in range(n)]


def prepare(cfg: DataConfig, seed: int, renderer: Renderer,
            augment: Callable[[list[Row]], list[Row]] | None = None) -> Prepared:
    """`augment`: a change to every row before it is rendered, training and held-out alike (data.rag:
    retrieved context in the prompt)."""
    train_rows, eval_rows, read_stats = read(cfg, seed)
    if augment is not None:
        train_rows, eval_rows = augment(train_rows), augment(eval_rows) if eval_rows else eval_rows
    train, train_stats = build_examples(train_rows, renderer)
    eval_ex, eval_stats = build_examples(eval_rows, renderer) if eval_rows else ([], None)
    sets: dict[str, tuple[list[Example], list[Row]]] = {}
    names = list(dict.fromkeys(r.eval_set for r in eval_rows if r.eval_set))
    if names and any(r.eval_set is None for r in eval_rows):
        names.append("other")  # held-out rows of unnamed sources, beside the named ones
    for name in names:
        rows = [r for r in eval_rows if (r.eval_set or "other") == name]
        sets[name] = (build_examples(rows, renderer)[0], rows)
    return Prepared(train, eval_ex, train_rows, eval_rows, train_stats, eval_stats, read_stats, sets)


def renderer_for(cfg: DataConfig, tokenizer) -> Renderer:
    return Renderer(tokenizer, cfg.template, cfg.max_length, cfg.mask, cfg.truncation, cfg.system, cfg.chunk_overlap,
                    cfg.reasoning)


__all__ = ["DataError", "Example", "Prepared", "Renderer", "Row", "prepare", "read", "renderer_for"]
