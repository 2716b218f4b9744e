"""The offline teacher: `sftkit distill cache CONFIG --out DIR` runs the teacher once over the training
data and keeps, for every trained token, its k most likely next tokens and their log-probs;
`train.distill.teacher: DIR` then trains without the teacher in memory (loss.cached_divergence).

On disk, in DIR:
  distill_cache.json   format, k, the teacher, its output width, counts, and the data section it was made with
  hashes.npy           uint64 per cached example: a hash of its rendered token ids and labels (the key)
  offsets.npy          int64 [examples + 1]: example i's trained tokens are rows offsets[i]:offsets[i + 1]
  logprobs.npy         float32 [tokens, k]: the teacher's k largest log-probs at temperature 1, largest first
  indices.npy          uint16 (vocabularies up to 65536) or int32 [tokens, k]: their token ids
  tokenizer files      the teacher's tokenizer, checked against the student's at training time

An example is found by the hash of what training feeds the model, so the cache is keyed by the data
*and* the template, system message, truncation and tokenizer: change any of them and the examples it
changes are missing, and training refuses the cache naming the first one. Order does not matter (a
new seed reorders the rows, not their content). The arrays are memory-mapped: the cache need not fit
in memory. Float32 values keep the cached loss equal to the online one (tested at k = vocabulary).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from .config import Config, ConfigError
from .data import prepare as prepare_data
from .data import renderer_for
from .data.packing import pad_collate
from .data.render import IGNORE, Example
from .job import cap_max_length, log
from .loss import DIVERGENCES, Distill, head_is_logits
from .models import load_model, load_tokenizer
from .rundir import final_model

CACHE_FILE = "distill_cache.json"
PARTIAL_MARKER = ".sftkit-cache-partial"  # in <out>.partial while a cache is being written
FORMAT = 1


def data_section(cfg: Config) -> dict:
    """The data section as JSON holds it: what the cache records and a refusal compares."""
    return json.loads(json.dumps(asdict(cfg.data), default=str))


def is_cache(path: str | Path) -> bool:
    return (Path(path) / CACHE_FILE).is_file()


def example_hash(e: Example) -> int:
    """A 64-bit key of the example as training sees it: token ids and labels."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(e.labels, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little")


def trained_positions(e: Example) -> list[int]:
    """Positions j whose token is a training target (predicted from position j - 1), in order: what the
    loss takes from this example, padded or packed (sftkit.loss, sftkit.data.packing)."""
    return [j for j in range(1, len(e.labels)) if e.labels[j] != IGNORE]


class TeacherCache:
    """A cache written by `build`, bound to a run's training examples (`bind`) and read per batch (`lookup`)."""

    def __init__(self, path: str | Path, top_k: int = 0):
        self.path = Path(path)
        self.meta = json.loads((self.path / CACHE_FILE).read_text())
        if self.meta.get("format") != FORMAT:
            raise ConfigError(f"train.distill.teacher {path}: a cache of format {self.meta.get('format')}, this sftkit "
                              f"reads format {FORMAT}; run `sftkit distill cache` again")
        self.k = int(self.meta["k"])
        if top_k > self.k:
            raise ConfigError(f"train.distill.top_k={top_k}: the cache {path} holds the teacher's top {self.k} only; "
                              f"set train.distill.top_k <= {self.k} (0 = all it holds) or rebuild it with a larger top_k")
        self.use = top_k or self.k  # the largest come first: the top `use` of a larger cache are the top `use`
        self.vocab = int(self.meta["vocab"])
        load = lambda name: np.load(self.path / name, mmap_mode="r")  # noqa: E731
        self.hashes, self.offsets = load("hashes.npy"), load("offsets.npy")
        self.logprobs, self.indices = load("logprobs.npy"), load("indices.npy")
        self.rows: list[tuple[int, int]] = []

    def bind(self, examples: list[Example], current_data: dict | None = None) -> None:
        """Map each training example (by index) to its rows in the cache; refused, naming the first
        example not in it, when the data or its rendering changed since the cache was made."""
        where = {int(h): i for i, h in enumerate(self.hashes)}
        self.rows = []
        missing = []
        for e in examples:
            i = where.get(example_hash(e))
            if i is None:
                missing.append(e)
                continue
            start, end = int(self.offsets[i]), int(self.offsets[i + 1])
            if end - start != len(trained_positions(e)):  # a hash collision; practically never
                missing.append(e)
                continue
            self.rows.append((start, end))
        if missing:
            e = missing[0]
            changed = ""
            if current_data is not None:
                was = self.meta.get("data", {})
                diff = [f"data.{k}: {was.get(k)!r} -> {v!r}" for k, v in current_data.items() if was.get(k) != v]
                if diff:
                    changed = " Changed since: " + "; ".join(diff) + "."
            raise ConfigError(
                f"train.distill.teacher {self.path}: the cache was made from other data: {len(missing)} of "
                f"{len(examples)} training examples are not in it, the first {e.source}:{e.line} (the rows, "
                f"data.template, data.system, data.max_length or the tokenizer changed since `sftkit distill cache`)."
                f"{changed} Make it again: sftkit distill cache CONFIG --out {self.path}")

    def lookup(self, example_ids: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k log-probs and token ids for these examples' trained tokens, end to end in
        the order of the ids (the order `loss.token_loss` takes trained tokens in)."""
        spans = [self.rows[i] for i in example_ids.tolist()]
        logp = np.concatenate([self.logprobs[a:b, : self.use] for a, b in spans])
        idx = np.concatenate([self.indices[a:b, : self.use] for a, b in spans]).astype(np.int64)
        return torch.from_numpy(logp).to(device), torch.from_numpy(idx).to(device)


# -- the teacher beside the student, or its cache -----------------------------------------------
def check_distill(cfg: Config) -> None:
    """train.distill's settings, before anything is written."""
    d = cfg.train.distill
    if d.teacher is None:
        return
    if d.loss not in DIVERGENCES:
        raise ConfigError(f"train.distill.loss: {d.loss!r} is not {' | '.join(DIVERGENCES)}")
    if not 0 <= d.weight <= 1:
        raise ConfigError(f"train.distill.weight: must be in [0, 1], got {d.weight}")
    if not d.temperature > 0:
        raise ConfigError(f"train.distill.temperature: must be above 0, got {d.temperature}")
    if d.top_k < 0 or (d.top_k and d.loss != "forward_kl"):
        raise ConfigError("train.distill.top_k: a whole number >= 0, and above 0 only with loss forward_kl "
                          "(the other divergences need the teacher's whole distribution)")
    if cfg.train.kl_to_base > 0:
        raise ConfigError("train.distill and train.kl_to_base are two teachers; choose one")


def tokenizer_difference(student, teacher) -> str | None:
    """The first difference between two tokenizers that would make their distributions incomparable:
    the vocabulary (token -> id) or a special token; None when they agree."""
    sv, tv = student.get_vocab(), teacher.get_vocab()
    if len(sv) != len(tv):
        return f"vocabulary sizes differ: student {len(sv)}, teacher {len(tv)}"
    for token, i in sorted(sv.items(), key=lambda x: x[1]):
        if tv.get(token) != i:
            return (f"token {token!r} is id {i} in the student and "
                    + (f"id {tv[token]} in the teacher" if token in tv else "absent from the teacher"))
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if getattr(student, name, None) != getattr(teacher, name, None):
            return f"{name} differs: student {getattr(student, name, None)!r}, teacher {getattr(teacher, name, None)!r}"
    return None


def check_teacher_tokenizer(cfg: Config, tok, teacher_tok) -> None:
    difference = tokenizer_difference(tok, teacher_tok)
    if difference:
        raise ConfigError(f"train.distill.teacher {cfg.train.distill.teacher}: its tokenizer is not the student's "
                          f"({cfg.model.name}): {difference}; distillation compares next-token distributions token by token")


def output_width(model) -> int:
    """Rows of the model's output layer (the vocabulary it scores, padding included)."""
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.vocab_size


def load_teacher(cfg: Config, tok, device, model, examples: list) -> Distill | None:
    """The teacher (train.distill.teacher): a model name, directory or run, frozen, in eval mode; or an
    offline cache made by `sftkit distill cache`, bound to this run's training examples. Refused when
    its tokenizer differs from the student's, or when the cache was made from other data."""
    d = cfg.train.distill
    if d.teacher is None:
        return None
    if is_cache(d.teacher):
        check_teacher_tokenizer(cfg, tok, AutoTokenizer.from_pretrained(d.teacher))  # saved with the cache
        if d.loss != "forward_kl":
            raise ConfigError(f"train.distill.loss={d.loss}: a cache of the teacher's top-k log-probs gives forward_kl "
                              "only (the other divergences need its whole distribution); set train.distill.loss=forward_kl")
        cache = TeacherCache(d.teacher, d.top_k)
        width = output_width(model)
        if cache.vocab > width:
            raise ConfigError(f"train.distill.teacher {d.teacher}: the cached teacher scores {cache.vocab} tokens, the "
                              f"student's output layer {width}")
        cache.bind(examples, data_section(cfg))
        log(f"distilling from the cache {d.teacher} (teacher {cache.meta['teacher']}, top {cache.use} of "
            f"{cache.meta['vocab']} tokens, {cache.meta['tokens']:,} trained tokens; weight {d.weight}, "
            f"temperature {d.temperature})")
        return Distill(None, d.weight, d.temperature, d.loss, cache.use, cache=cache)
    name = final_model(d.teacher)
    check_teacher_tokenizer(cfg, tok, load_tokenizer(name))
    log(f"loading teacher {d.teacher} (distillation: {d.loss}, weight {d.weight}, temperature {d.temperature}"
        + (f", top {d.top_k}" if d.top_k else "") + ")")
    teacher, _ = load_model(name, cfg.model.dtype)
    teacher = teacher.to(device).eval().requires_grad_(False)
    return Distill(teacher, d.weight, d.temperature, d.loss, d.top_k)


# -- making the cache ---------------------------------------------------------------------------
def _holds(path: Path) -> str:
    found = sorted(p.name for p in path.iterdir())
    return ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")


def check_cache_out(out: Path, partial: Path, overwrite: bool) -> None:
    """`--out` and its `.partial` sibling may be replaced only when they hold a cache (or an interrupted
    one) of this command's, or nothing: the same rule as `train --overwrite`, nothing else deleted."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"distill cache: --out {out} is a file, not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"distill cache: {out} exists and is not empty; choose another --out or pass --overwrite")
        if not is_cache(out):
            raise ConfigError(f"distill cache --overwrite: {out} holds {_holds(out)}, which is not a teacher cache (no "
                              f"{CACHE_FILE}); nothing was deleted. Choose another --out")
    if partial.exists() and (not partial.is_dir() or (any(partial.iterdir())
                                                      and not (partial / PARTIAL_MARKER).is_file())):
        raise ConfigError(f"distill cache: {partial}, where the cache is written before it is moved to {out}, exists "
                          f"and is not an interrupted cache of this command's ({_holds(partial) if partial.is_dir() else 'a file'}); "
                          "nothing was deleted. Move it away or choose another --out")


def build(cfg: Config, out: Path, overwrite: bool = False, batch_size: int = 16) -> dict:
    """Run the teacher (train.distill.teacher) over the training examples the config gives and write
    its top-k (train.distill.top_k) per trained token to `out`."""
    d = cfg.train.distill
    if cfg.task != "sft":
        raise ConfigError(f"distill cache: task {cfg.task!r}; distillation is for task: sft")
    if d.teacher is None:
        raise ConfigError("distill cache: set train.distill.teacher (the model to run once over the data)")
    if is_cache(d.teacher):
        raise ConfigError(f"distill cache: train.distill.teacher {d.teacher} is itself a cache; give the teacher model")
    if d.top_k <= 0:
        raise ConfigError("distill cache: set train.distill.top_k, the teacher's log-probs to keep per trained token "
                          "(e.g. train.distill.top_k=32)")
    tmp = out.with_name(out.name + ".partial")
    check_cache_out(out, tmp, overwrite)
    name = final_model(d.teacher)
    tok = load_tokenizer(cfg.model.name, cfg.model.revision)
    check_teacher_tokenizer(cfg, tok, load_tokenizer(name))
    log(f"loading teacher {d.teacher}")
    teacher, _ = load_model(name, cfg.model.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = teacher.to(device).eval().requires_grad_(False)
    cap_max_length(cfg, teacher)
    data_given = data_section(cfg)
    renderer = renderer_for(cfg.data, tok)
    data = prepare_data(cfg.data, cfg.train.seed, renderer)
    examples, seen = [], set()
    for e in data.train:  # each distinct example once
        h = example_hash(e)
        if h not in seen:
            seen.add(h)
            examples.append(e)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    counts = [len(trained_positions(e)) for e in examples]
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    vocab = output_width(teacher)
    index_dtype = np.uint16 if vocab <= 65536 else np.int32
    k = min(d.top_k, vocab)
    shutil.rmtree(tmp, ignore_errors=True)  # checked above: absent, empty, or an interrupted cache of ours
    tmp.mkdir(parents=True)
    (tmp / PARTIAL_MARKER).write_text("an interrupted `sftkit distill cache`: the next one may replace this folder\n")
    total = int(offsets[-1])
    logprobs = np.lib.format.open_memmap(tmp / "logprobs.npy", "w+", np.float32, (total, k))
    indices = np.lib.format.open_memmap(tmp / "indices.npy", "w+", index_dtype, (total, k))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    bar = tqdm(total=len(order), desc="teacher top-k", file=sys.stderr, unit="ex")
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            part = order[b : b + batch_size]
            batch = {key: v.to(device) for key, v in pad_collate([examples[i] for i in part], pad).items()}
            keep = batch["labels"][:, 1:] != IGNORE
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
            if head_is_logits(teacher, batch["input_ids"]):
                hidden = teacher.get_decoder()(**inputs).last_hidden_state[:, :-1][keep]
                head = teacher.get_output_embeddings()
                chunks = [head(hidden[i : i + 1024]) for i in range(0, len(hidden), 1024)]
            else:
                chunks = [teacher(**inputs).logits[:, :-1][keep]]
            values, ids = [], []
            for logits in chunks:
                v, i = torch.log_softmax(logits.float(), -1).topk(k, -1)
                values.append(v.cpu().numpy())
                ids.append(i.cpu().numpy())
            values, ids = np.concatenate(values), np.concatenate(ids)
            at = 0
            for i in part:  # trained tokens come row by row, each row's in order
                a, z = offsets[i], offsets[i + 1]
                logprobs[a:z], indices[a:z] = values[at : at + z - a], ids[at : at + z - a]
                at += z - a
            bar.update(len(part))
    bar.close()
    logprobs.flush()
    indices.flush()
    del logprobs, indices
    np.save(tmp / "hashes.npy", np.array([example_hash(e) for e in examples], dtype=np.uint64))
    np.save(tmp / "offsets.npy", offsets)
    tok.save_pretrained(tmp)
    meta = {"format": FORMAT, "k": k, "teacher": d.teacher, "vocab": int(vocab), "examples": len(examples),
            "tokens": total, "model": cfg.model.name, "data": data_given,
            "bytes": sum(f.stat().st_size for f in tmp.glob("*.npy"))}
    (tmp / CACHE_FILE).write_text(json.dumps(meta, indent=1))
    (tmp / PARTIAL_MARKER).unlink()
    if out.exists():
        shutil.rmtree(out)  # checked above: empty, or a cache this command wrote
    tmp.rename(out)
    return meta
