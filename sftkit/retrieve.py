"""Retrieval and in-context examples, the alternatives to fine-tuning that `compare` weighs.

- `Embedder`: a sentence encoder (the bundled MiniLM by default), mean-pooled and normalised.
- `read_documents` / `chunk_document`: documents (JSONL `text`/`title`, `.txt`/`.md` files,
  folders) cut into chunks of the embedder's tokens with overlap, each with its provenance.
- `build_index` / `Index`: the chunks, their embeddings and provenance in LanceDB (an embedded,
  persistent vector database: one table on disk, rows deleted and added in place, so a rebuild
  re-embeds only the documents whose text changed). Search is exact (cosine, no approximate index).
- `augment`: the one function that puts shots and retrieved chunks into a prompt. Compare, eval,
  generate, chat and training (`data.rag`) all call it, so a model sees the same prompt everywhere.
- `pick_shots`: first / random / nearest (by embedding) solved examples for each held-out prompt,
  never the row itself or its near duplicate.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ConfigError, DataConfig
from .data.quality import NearIndex, normalised, shingles_of
from .data.sources import DataError, Row, load_rows, read_source
from .job import log
from .models import resolve

if TYPE_CHECKING:
    import numpy as np

DEFAULT_EMBEDDER = "minilm-l6"
LAYOUTS = ("system", "context")
SHOT_MODES = ("first", "random", "nearest")
NEAR, NEAR_CANDIDATES = 0.8, 0.5  # near duplicates: the data-quality threshold; LSH looks wider, then checks
TABLE = "chunks"
META = "sftkit-index.json"
DOC_SUFFIXES = (".jsonl", ".txt", ".md")


# -- the prompt ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hit:
    id: str  # the chunk's id in the index: <document hash>-<chunk number>
    text: str
    title: str
    source: str  # file:line (JSONL) or file, where the document was read
    score: float  # cosine similarity to the query


LAYOUT_NOTE = ("`system`: a system message holds the documents (after the row's own system message), headed "
               "\"Use the documents below to answer.\" and numbered [1].. with their titles; `context`: the last user "
               "turn starts with the same block, then \"Question:\" and the turn's text.")
CONTEXT_HEAD = "Use the documents below to answer. Each starts with its number and title."


def context_block(hits: list[Hit]) -> str:
    return "\n\n".join(f"[{i}] {h.title}\n{h.text}" if h.title else f"[{i}]\n{h.text}" for i, h in enumerate(hits, 1))


def augment(messages: list[dict], shots: list[Row] | None = None, hits: list[Hit] | None = None,
            layout: str = "system") -> list[dict]:
    """The prompt a model is given: `shots` (solved examples) as earlier turns of the conversation,
    then `hits` (retrieved chunks) by `layout`:
      system   a system message holds the documents (after the row's own system message, if any);
      context  the last user turn starts with the documents, then "Question:" and the turn's text.
    The original turns are otherwise untouched, so the reply still follows the last user turn."""
    if layout not in LAYOUTS:
        raise ConfigError(f"rag layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    system = [dict(m) for m in messages[:1] if m["role"] == "system"]
    rest = [dict(m) for m in messages[len(system):]]
    demos = [dict(m) for s in shots or [] for m in s.messages if m["role"] != "system"]
    if hits:
        block = f"{CONTEXT_HEAD}\n\n{context_block(hits)}"
        if layout == "system":
            system = [{"role": "system", "content": f"{system[0]['content']}\n\n{block}" if system else block}]
        else:
            last = max(i for i, m in enumerate(rest) if m["role"] == "user")
            rest[last]["content"] = f"{block}\n\nQuestion: {rest[last]['content']}"
    return system + demos + rest


def query_of(messages: list[dict]) -> str:
    """What a prompt is looked up by: its last user turn."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


# -- embeddings ---------------------------------------------------------------------------------------
class Embedder:
    """A sentence encoder, mean-pooled over real tokens and L2-normalised (as the bundled MiniLM was
    trained); `name` is an alias, a model folder or a hub id."""

    def __init__(self, name: str = DEFAULT_EMBEDDER, max_length: int = 256, batch_size: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.name, self.max_length, self.batch_size, self.torch = name, max_length, batch_size, torch
        path = resolve(name)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if not self.tokenizer.is_fast:
            raise ConfigError(f"--embedder {name}: chunking needs a fast tokenizer (token offsets); this one is not")
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        self.dims = int(self.model.config.hidden_size)
        self.limit = min(max_length, getattr(self.tokenizer, "model_max_length", max_length) or max_length)

    def __call__(self, texts: list[str], desc: str | None = None) -> np.ndarray:
        import numpy as np
        from tqdm import tqdm

        torch = self.torch
        out = []
        bar = tqdm(total=len(texts), desc=desc, file=sys.stderr, leave=False, disable=desc is None)
        with torch.no_grad():
            for b in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[b : b + self.batch_size], padding=True, truncation=True,
                                     max_length=self.limit, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).float()
                out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy())
                bar.update(len(texts[b : b + self.batch_size]))
        bar.close()
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dims), np.float32)


# -- documents and chunks -----------------------------------------------------------------------------
@dataclass
class Document:
    text: str
    title: str
    source: str  # file:line or file

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps([self.title, self.text]).encode()).hexdigest()[:16]


@dataclass
class Chunk:
    id: str
    doc: Document
    number: int  # its place in the document
    start: int  # token offsets in the document: [start, end)
    end: int
    text: str


def document_files(paths: list[str]) -> list[Path]:
    """Every document file the paths name: files as given, folders walked in path order (dot-files
    out); a folder's files of other types are named in the log as left out."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ConfigError(f"index build: {p}: no such file or folder")
        if p.is_file():
            if p.suffix not in DOC_SUFFIXES:
                raise ConfigError(f"index build: {p}: expected {', '.join(DOC_SUFFIXES)} (JSONL rows with `text`, "
                                  "or plain text / markdown)")
            out.append(p)
            continue
        found = sorted(f for f in p.rglob("*") if f.is_file() and not any(x.startswith(".") for x in f.relative_to(p).parts))
        others = [f for f in found if f.suffix not in DOC_SUFFIXES]
        if others:
            log(f"index build: {p}: left out {len(others)} files of other types ({', '.join(f.name for f in others[:5])})")
        docs = [f for f in found if f.suffix in DOC_SUFFIXES]
        if not docs:
            raise ConfigError(f"index build: {p}: no .jsonl, .txt or .md files in it")
        out += docs
    return out


def read_documents(paths: list[str]) -> list[Document]:
    """Documents of JSONL files (`text`, optional `title`; a bad row stops, naming file, line and
    field) and plain text / markdown files (one document each; the title is the first line of a
    markdown heading, else the file name)."""
    docs: list[Document] = []
    for f in document_files(paths):
        if f.suffix == ".jsonl":
            for line, obj in read_source(str(f)):
                if isinstance(obj, DataError):
                    raise obj
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise DataError(f"{f}:{line}: text: each row needs a `text` string (and may have a `title`)")
                if not obj["text"].strip():
                    raise DataError(f"{f}:{line}: text: empty")
                title = obj.get("title", "")
                if not isinstance(title, str):
                    raise DataError(f"{f}:{line}: title: expected a string, got {type(title).__name__}")
                docs.append(Document(obj["text"], title, f"{f}:{line}"))
        else:
            text = f.read_text(encoding="utf-8")
            if not text.strip():
                log(f"index build: {f}: empty, left out")
                continue
            first = text.lstrip().splitlines()[0]
            title = first.lstrip("#").strip() if f.suffix == ".md" and first.startswith("#") else f.stem
            docs.append(Document(text, title, str(f)))
    return docs


def chunk_document(doc: Document, tokenizer, chunk_tokens: int, overlap: int) -> list[Chunk]:
    """Consecutive windows of at most `chunk_tokens` of the embedder's tokens, cut where a word
    starts (a window ends earlier rather than split a word, unless the word is longer than half a
    window). Each window starts where the last one ended, moved back by at most `overlap` tokens (to
    a word start): every token is in exactly one chunk apart from those overlaps. A chunk's text is
    the document's own characters from its first token to its last."""
    enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    spans, words = enc["offset_mapping"], enc.word_ids()
    n = len(spans)

    def word_start(i: int) -> bool:
        return i in (0, n) or words[i] != words[i - 1]

    chunks, start, number = [], 0, 0
    while start < n:
        end = min(start + chunk_tokens, n)
        cut = end
        while cut < n and cut > start + chunk_tokens // 2 and not word_start(cut):
            cut -= 1
        end = cut if word_start(cut) else end
        chunks.append(Chunk(f"{doc.hash}-{number}", doc, number, start, end,
                            doc.text[spans[start][0] : spans[end - 1][1]]))
        if end == n:
            break
        nxt = end - overlap
        while nxt < end and not word_start(nxt):
            nxt += 1
        start, number = nxt, number + 1
    return chunks


# -- the index ----------------------------------------------------------------------------------------
@dataclass
class BuildStats:
    documents: int = 0
    embedded: int = 0  # documents whose chunks were embedded now (new or changed)
    kept: int = 0  # documents already in the index with the same text
    removed: int = 0  # documents no longer given (or whose text changed): their chunks deleted
    duplicates: int = 0  # documents whose title and text another one has: indexed once
    chunks: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return (f"{self.documents} documents: {self.embedded} embedded, {self.kept} unchanged, {self.removed} removed"
                + (f", {self.duplicates} duplicates indexed once" if self.duplicates else "")
                + f"; {self.chunks} chunks in the index ({self.seconds:.1f} s)")


def _schema(dims: int):
    import pyarrow as pa

    return pa.schema([pa.field("id", pa.string()), pa.field("doc", pa.string()), pa.field("title", pa.string()),
                      pa.field("source", pa.string()), pa.field("chunk", pa.int32()), pa.field("start", pa.int32()),
                      pa.field("end", pa.int32()), pa.field("text", pa.string()),
                      pa.field("vector", pa.list_(pa.float32(), dims))])


def _lancedb():
    import os

    os.environ.setdefault("LANCE_LOG", "error")  # its "no dataset yet, creating" notice is not news to a user
    try:
        import lancedb
    except ImportError:
        raise ConfigError("retrieval needs LanceDB: pip install 'sftkit[rag]'") from None
    return lancedb


def build_index(paths: list[str], out: str, embedder_name: str = DEFAULT_EMBEDDER, chunk_tokens: int = 128,
                overlap: int = 16, embedder: Embedder | None = None) -> BuildStats:
    """Build `out` from the documents, or bring an index built with the same settings up to date:
    chunks of documents whose text is unchanged are kept (not embedded again), those of changed or
    removed documents are deleted, new ones embedded and added."""
    t0 = time.time()
    if chunk_tokens < 8:
        raise ConfigError(f"--chunk-tokens {chunk_tokens}: expected at least 8")
    if not 0 <= overlap <= chunk_tokens // 2:
        raise ConfigError(f"--overlap {overlap}: expected 0 <= overlap <= chunk_tokens / 2 ({chunk_tokens // 2})")
    out_dir = Path(out)
    settings = {"embedder": embedder_name, "chunk_tokens": chunk_tokens, "overlap": overlap}
    meta_path = out_dir / META
    if out_dir.exists() and any(out_dir.iterdir()) and not meta_path.is_file():
        raise ConfigError(f"index build: {out} exists and is not an sftkit index (no {META}); choose another --out")
    docs = read_documents(paths)
    if not docs:
        raise ConfigError("index build: no documents to index")
    stats = BuildStats(documents=len(docs))
    unique: dict[str, Document] = {}
    for d in docs:
        if d.hash in unique:
            stats.duplicates += 1
        else:
            unique[d.hash] = d
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    lancedb = _lancedb()
    embedder = embedder or Embedder(embedder_name)
    db = lancedb.connect(str(out_dir))
    same = meta is not None and all(meta.get(k) == v for k, v in settings.items()) and TABLE in db.list_tables().tables
    if meta is not None and not same:
        log(f"index build: {out} was built with {', '.join(f'{k} {meta.get(k)}' for k in settings)}; "
            "rebuilding it whole with the new settings")
    table = db.open_table(TABLE) if same else None
    have = set(table.to_arrow().column("doc").to_pylist()) if table is not None else set()
    gone = sorted(have - set(unique))
    if gone and table is not None:
        for b in range(0, len(gone), 500):
            table.delete("doc IN (" + ", ".join(f"'{h}'" for h in gone[b : b + 500]) + ")")
    stats.removed, stats.kept = len(gone), len(have & set(unique))
    new = [d for h, d in unique.items() if h not in have]
    chunks = [c for d in new for c in chunk_document(d, embedder.tokenizer, chunk_tokens, overlap)]
    stats.embedded = len(new)
    vectors = embedder([c.text for c in chunks], desc="embed chunks") if chunks else None
    rows = [{"id": c.id, "doc": c.doc.hash, "title": c.doc.title, "source": c.doc.source, "chunk": c.number,
             "start": c.start, "end": c.end, "text": c.text, "vector": v} for c, v in zip(chunks, vectors if chunks else [])]
    if table is None:
        table = db.create_table(TABLE, schema=_schema(embedder.dims), mode="overwrite")
    if rows:
        table.add(rows)
    stats.chunks = table.count_rows()
    meta_path.write_text(json.dumps({**settings, "dims": embedder.dims, "documents": len(unique),
                                     "chunks": stats.chunks}, indent=1))
    stats.seconds = time.time() - t0
    return stats


@dataclass
class Index:
    """An index `build_index` wrote, opened for search (its own embedder, as it was built with)."""
    path: str
    embedder: Embedder | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        meta = Path(self.path) / META
        if not meta.is_file():
            raise ConfigError(f"--rag {self.path}: not an sftkit index (no {META}); make one: sftkit index build DOCS --out {self.path}")
        self.meta = json.loads(meta.read_text())
        lancedb = _lancedb()
        self.table = lancedb.connect(self.path).open_table(TABLE)
        if self.embedder is None or self.embedder.name != self.meta["embedder"]:
            self.embedder = Embedder(self.meta["embedder"])

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        """The k chunks closest to each query (cosine similarity), best first."""
        if k < 1:
            raise ConfigError(f"--k {k}: expected at least 1")
        vectors = self.embedder(queries)
        out = []
        for v in vectors:
            found = (self.table.search(v).metric("cosine").select(["id", "title", "source", "text", "_distance"]).limit(k).to_list())
            out.append([Hit(r["id"], r["text"], r["title"], r["source"], 1.0 - float(r["_distance"])) for r in found])
        return out


@dataclass(frozen=True)
class Rag:
    """Retrieval for prompts: the index, how many chunks and the layout (config `data.rag`, flags
    `--rag INDEX --k K --rag-layout LAYOUT`)."""
    index: str
    k: int = 3
    layout: str = "system"

    @staticmethod
    def of(spec: dict | None, where: str = "data.rag") -> Rag | None:
        if not spec:
            return None
        if not isinstance(spec, dict) or "index" not in spec or set(spec) - {"index", "k", "layout"}:
            raise ConfigError(f"{where}: expected {{index: INDEX, k: 3, layout: system|context}}, got {spec!r}")
        k = spec.get("k", 3)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"{where}.k: expected a whole number >= 1, got {k!r}")
        if spec.get("layout", "system") not in LAYOUTS:
            raise ConfigError(f"{where}.layout: expected one of {', '.join(LAYOUTS)}, got {spec.get('layout')!r}")
        return Rag(str(spec["index"]), k, spec.get("layout", "system"))

    def describe(self) -> str:
        return f"index {self.index}, top {self.k} chunks, layout {self.layout}"


def retrieve_for(prompts: list[list[dict]], rag: Rag, index: Index | None = None) -> list[list[Hit]]:
    index = index or Index(rag.index)
    return index.search([query_of(p) for p in prompts], rag.k)


def rag_rows(rows: list[Row], rag: Rag, renderer, index: Index | None = None) -> list[Row]:
    """Training / held-out rows with retrieved context (`data.rag`): a row's last user turn is the
    query and its chunks go into the prompt by the layout, through `augment` as at inference, so
    the trained text is what the model sees when it answers with retrieval. Only the reply after
    that turn is trained (the context is prompt); rows whose reply comes before it, and text rows,
    have nothing to retrieve for and are left as they are."""
    import dataclasses

    if renderer.template == "plain" and rag.layout == "system":
        raise ConfigError("data.rag.layout system: data.template plain renders no system message; use layout context")
    chat = [i for i, r in enumerate(rows) if r.text is None and any(m["role"] == "user" for m in r.messages)]
    if not chat:
        return rows
    index = index or Index(rag.index)
    hits = index.search([query_of(rows[i].messages[: last_user(rows[i].messages) + 1]) for i in chat], rag.k)
    out = list(rows)
    for i, h in zip(chat, hits):
        m = renderer.with_system(rows[i].messages)
        cut = last_user(m) + 1
        augmented = augment(m[:cut], hits=h, layout=rag.layout) + m[cut:]
        added = len(augmented) - len(rows[i].messages)  # a system message of its own: the turns move by one
        trained = [t + added for t in rows[i].trained] if rows[i].trained is not None else None
        out[i] = dataclasses.replace(rows[i], messages=augmented, n_prompt=rows[i].n_prompt + added if rows[i].n_prompt else 0,
                                     trained=trained)
    return out


def last_user(messages: list[dict]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "user")


# -- shots --------------------------------------------------------------------------------------------
def pick_shots(pool: list[Row], held: list[list[dict]], k: int, mode: str = "first", seed: int = 0,
               held_rows: list[Row] | None = None, embedder: Embedder | None = None) -> list[list[Row]]:
    """K solved examples for each held-out prompt: `first` the first K usable rows of the pool,
    `random` K drawn by seed, both the same for every prompt; `nearest` the K pool rows whose
    prompts are closest to that prompt by embedding (ties by pool order). Never a pool row with the
    held-out row's own content, nor one the data-quality MinHash calls its near duplicate."""
    if mode not in SHOT_MODES:
        raise ConfigError(f"--shots {mode}: expected one of {', '.join(SHOT_MODES)}")
    pool = [r for r in pool if r.text is None and r.messages[-1]["role"] == "assistant"]
    targets = held_rows or [Row(p + [{"role": "assistant", "content": ""}], "prompt", i + 1, "messages")
                            for i, p in enumerate(held)]
    near = NearIndex(pool, threshold=NEAR_CANDIDATES)
    shingles = [shingles_of(r) for r in pool]

    def banned_for(t: Row) -> set[int]:
        """Pool rows with t's own content, or its near duplicates: word-shingle Jaccard >= NEAR (the
        data-quality threshold), candidates from MinHash LSH at a lower threshold, each checked exactly."""
        own = {i for i, r in enumerate(pool) if normalised(r) == normalised(t)} if held_rows else set()
        mine = shingles_of(t)
        return own | {i for i in near.all_near(t) if len(mine & shingles[i]) >= NEAR * len(mine | shingles[i])}

    banned_each = [banned_for(t) for t in targets]
    if mode in ("first", "random"):
        banned = set().union(*banned_each) if banned_each else set()
        usable = [r for i, r in enumerate(pool) if i not in banned]
        if len(usable) < k:
            raise ConfigError(f"--few-shot {k}: only {len(usable)} usable rows to take examples from "
                              "(rows equal or near to an evaluated row are left out)")
        chosen = usable[:k] if mode == "first" else random.Random(seed).sample(usable, k)
        return [chosen for _ in held]
    import numpy as np

    embedder = embedder or Embedder()
    pool_vecs = embedder([query_of(r.messages[:-1]) for r in pool], desc="embed shot prompts")
    held_vecs = embedder([query_of(p) for p in held])
    sims = held_vecs @ pool_vecs.T
    out = []
    for j, banned in enumerate(banned_each):
        order = np.argsort(-sims[j], kind="stable")
        picked = [pool[i] for i in order if i not in banned][:k]
        if len(picked) < k:
            raise ConfigError(f"--few-shot {k}: only {len(picked)} usable rows to take examples from")
        out.append(picked[::-1])  # the nearest last: right before the question
    return out


# -- shots and retrieval for a command's prompts ------------------------------------------------------
@dataclass
class InContext:
    """What eval, compare, generate and chat put into each prompt besides the row: `few_shot` solved
    examples from `shots_from` picked by `shots` (first | random | nearest, by `embedder`), and the
    top chunks of `rag`. `apply` is the one place prompts get them."""
    few_shot: int = 0
    shots: str = "first"
    shots_from: str | None = None
    embedder: str = DEFAULT_EMBEDDER
    rag: Rag | None = None
    seed: int = 0
    _embedder: Embedder | None = field(default=None, init=False, repr=False)
    _index: Index | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.few_shot < 0:
            raise ConfigError(f"--few-shot {self.few_shot}: expected 0 or more")
        if self.shots not in SHOT_MODES:
            raise ConfigError(f"--shots {self.shots}: expected one of {', '.join(SHOT_MODES)}")

    @property
    def active(self) -> bool:
        return bool(self.few_shot or self.rag)

    def label(self) -> str:
        parts = [f"{self.few_shot} {self.shots} shots"] if self.few_shot else []
        return " + ".join(parts + ([f"RAG top {self.rag.k}"] if self.rag else []))

    def encoder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = Embedder(self.embedder)
        return self._embedder

    def index(self) -> Index:
        if self._index is None:
            assert self.rag is not None
            shared = self._embedder if self._embedder is not None and self._embedder.name == self.embedder else None
            self._index = Index(self.rag.index, embedder=shared)
        return self._index

    def apply(self, prompts: list[list[dict]], renderer, data_cfg: DataConfig, held_rows: list[Row] | None = None
              ) -> tuple[list[list[dict]], list[dict]]:
        """The prompts as the model is given them, and what went into each: `shots` (where each came
        from) and `retrieved` (chunk id, source, score). `held_rows`: the held-out rows the prompts
        are of, so that none of them (nor a near duplicate) is its own shot."""
        if renderer.template == "plain" and self.rag and self.rag.layout == "system":
            raise ConfigError("rag layout system: data.template plain renders no system message; use the context layout")
        n = len(prompts)
        shots: list[list[Row]] = [[] for _ in range(n)]
        if self.few_shot:
            if not self.shots_from:
                raise ConfigError("--few-shot needs --shots-from FILE (rows to take the examples from)")
            pool = load_rows(self.shots_from, data_cfg.format, data_cfg.columns, data_cfg.system)
            shots = pick_shots(pool, prompts, self.few_shot, self.shots, self.seed, held_rows,
                               self.encoder() if self.shots == "nearest" else None)
        hits: list[list[Hit]] = [[] for _ in range(n)]
        if self.rag:
            hits = self.index().search([query_of(p) for p in prompts], self.rag.k)
        layout = self.rag.layout if self.rag else "system"
        out = [augment(renderer.with_system(p), s, h, layout) for p, s, h in zip(prompts, shots, hits)]
        info = [{**({"shots": [f"{r.source}:{r.line}" for r in s]} if self.few_shot else {}),
                 **({"retrieved": [{"id": h.id, "source": h.source, "score": round(h.score, 4)} for h in hs]}
                    if self.rag else {})} for s, hs in zip(shots, hits)]
        return out, info
