"""`sftkit synth`: instruction data written by a model (self-instruct, Wang et al. 2022).

Each candidate: a few tasks sampled from the seeds (and from what was kept so far) go into a prompt;
the model writes a new task; filters run on it; a model (the same, or --answer-model) answers it
(--best-of N with --reward: N sampled answers, the reward model keeps the best); filters run on the
whole row. A candidate is kept only if it passes every filter, in this order:

  length      3 to 150 words, as in the paper
  unsuitable  asks for what a text model cannot see or make (image, file, graph, ...), as in the paper
  form        starts with punctuation or a non-letter
  rouge-l     ROUGE-L against every task in the pool (seeds and kept) is below 0.7, as in the paper
  eval        not a near duplicate of an eval row, and no 13-gram in common with one (--eval FILE)
  lint        the data-quality lint of `data inspect` (empty reply, echo, refusal, template tokens, ...)

Kept rows go to --out as chats with a `provenance` field (seed ids, models, sampling settings, the
candidate's number); every rejected candidate goes to `rejected.jsonl` beside --out with its
reason. Work is written after each batch; running the same command again continues to --n (a
torn last line, from a kill mid-write, is dropped and redone).
"""

from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .config import ConfigError
from .data import renderer_for
from .data.quality import NearIndex, lint, row_texts
from .data.sources import DataError, Row, load_rows
from .generate import generate, load_for_inference
from .metrics import rouge_l
from .tasks.reward import Scorer

UNSUITABLE = ("image", "images", "picture", "pictures", "photo", "graph", "graphs", "file", "files", "map", "maps",
              "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram", "chart")
_NUMBERING = re.compile(r"^\s*(?:(?:write\s+)?(?:one\s+)?(?:new\s+)?task(?:\s*\d+)?\s*[:.)-]|\d+\s*[:.)-]|[-*•])\s*",
                        re.IGNORECASE)
ROUGE_LIMIT = 0.7


@dataclass
class Candidate:
    number: int  # its place in the sequence of candidates (the resume point and its random draws)
    seeds: list[str]  # ids of the tasks shown in its prompt
    prompt: list[dict[str, str]] = field(default_factory=list)  # the chat that asks for a new task
    raw: str = ""  # what the model wrote
    instruction: str = ""
    answer: str = ""
    reason: str | None = None  # why rejected; None = kept so far
    scores: list[float] = field(default_factory=list)


def clean_instruction(text: str) -> str:
    """The task the model wrote: its first paragraph, without a list number or "Task 4:", quotes or a
    trailing next item."""
    text = text.strip()
    text = re.split(r"\n\s*\n|\n\s*(?:task\s*)?\d+\s*[.:)]", text, maxsplit=1, flags=re.IGNORECASE)[0]
    for _ in range(3):  # "4. Task 4: ..." holds two
        text = _NUMBERING.sub("", text.strip(), count=1).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def instruction_problem(text: str) -> str | None:
    """The first per-instruction filter it fails, as a reason; None when it passes them."""
    words = text.split()
    if len(words) < 3:
        return f"length: {len(words)} words (fewer than 3)"
    if len(words) > 150:
        return f"length: {len(words)} words (more than 150)"
    low = " " + re.sub(r"[^a-z ]", " ", text.lower()) + " "
    hit = next((w for w in UNSUITABLE if f" {w} " in low), None)
    if hit:
        return f"unsuitable: mentions {hit!r} (a text model can neither see nor make it)"
    if not text[0].isalpha():
        return f"form: starts with {text[0]!r}, not a letter"
    return None


class Pool:
    """The tasks a new one must differ from (ROUGE-L below the limit): seeds and those kept."""

    def __init__(self, tasks: list[tuple[str, str]]):
        self.tasks = list(tasks)  # (id, instruction)

    def add(self, task_id: str, instruction: str) -> None:
        self.tasks.append((task_id, instruction))

    def remove(self, task_id: str) -> None:
        self.tasks = [t for t in self.tasks if t[0] != task_id]

    def too_close(self, instruction: str, limit: float = ROUGE_LIMIT) -> str | None:
        best, who = max(((rouge_l(instruction, t), i) for i, t in self.tasks), default=(0.0, ""))
        return f"rouge-l: {best:.2f} against {who} (limit {limit})" if best >= limit else None


def initial_pool(seeds: list[tuple[str, str, Row]]) -> Pool:
    """The seeds, and the request's own sentences: a model that echoes them has written no task."""
    return Pool([(i, t) for i, t, _ in seeds] + [("the request", INTRO), ("the request", ASK)])


def seed_tasks(path: str) -> list[tuple[str, str, Row]]:
    """(id, instruction, row) per seed: the id is the row's `id` field, else file:line; the instruction the
    row's prompt side (alpaca instruction + input, a prompt, or the user turns)."""
    rows = load_rows(path)
    out = []
    for r in rows:
        prompt, _ = row_texts(r)
        if not prompt.strip():
            raise DataError(f"{r.source}:{r.line}: a seed task needs a prompt side (instruction, prompt or a user turn)",
                            "no prompt")
        task_id = str(r.raw.get("id")) if isinstance(r.raw, dict) and r.raw.get("id") is not None else f"{Path(r.source).name}:{r.line}"
        out.append((task_id, prompt.strip(), r))
    if len(out) < 2:
        raise DataError(f"{path}: {len(out)} seed task(s); give at least 2 (the paper starts from 175)", "too few seeds")
    return out


INTRO = "Here are some tasks a user might give an assistant:"
ASK = "one new task, different from these. Reply with the task only."


def task_prompt(examples: list[str]) -> list[dict[str, str]]:
    listed = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(examples))
    return [{"role": "user", "content": f"{INTRO}\n\n{listed}\n\nWrite task {len(examples) + 1}: {ASK}"}]


def read_jsonl(path: Path) -> list[dict]:
    """Rows written so far; a torn last line (killed mid-write) is cut off the file and redone."""
    if not path.exists():
        return []
    rows, good = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
            good += len(line)
    if good != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good)
    return rows


@dataclass
class SynthSettings:
    seeds: str
    model: str
    n: int
    out: Path
    answer_model: str | None = None
    eval: str | None = None
    reward: str | None = None
    best_of: int = 1
    shots: int = 3
    machine_shots: int = 1  # of the shots, how many come from kept tasks once there are some (the paper: 2 of 8)
    temperature: float = 0.8
    top_p: float = 0.95
    answer_temperature: float = 0.0
    max_new_tokens: int = 64
    answer_tokens: int = 256
    batch_size: int = 16
    seed: int = 0
    max_candidates: int = 0  # stop after this many candidates in all; 0 = 20 x n


def check(s: SynthSettings) -> None:
    if s.n < 1:
        raise ConfigError(f"synth: --n must be at least 1, got {s.n}")
    if s.shots < 1:
        raise ConfigError(f"synth: --shots must be at least 1, got {s.shots}")
    if s.best_of > 1 and not s.reward:
        raise ConfigError("synth: --best-of N needs --reward REWARD_RUN (the reward model that picks)")
    if s.reward and s.best_of < 2:
        raise ConfigError("synth: --reward picks among several answers: give --best-of N with N >= 2")
    if s.best_of > 1 and s.answer_temperature <= 0:
        raise ConfigError("synth: --best-of samples its answers: give --answer-temperature > 0 (e.g. 0.8)")
    if not 0 < s.top_p <= 1 or s.temperature <= 0:
        raise ConfigError("synth: new tasks are sampled: --temperature > 0 and 0 < --top-p <= 1")


def draw(number: int, seeds: list[tuple[str, str, Row]], kept: list[tuple[str, str]], s: SynthSettings) -> Candidate:
    """Candidate `number`: its example tasks drawn (by its number alone, so a re-run draws the same) from
    the seeds and, once there are some, the kept tasks."""
    rng = random.Random(s.seed * 1_000_003 + number)
    n_kept = min(s.machine_shots, len(kept), s.shots - 1)
    shown = rng.sample(kept, n_kept) if n_kept else []
    shown = rng.sample([(i, t) for i, t, _ in seeds], min(s.shots - n_kept, len(seeds))) + shown
    rng.shuffle(shown)
    return Candidate(number, [i for i, _ in shown], task_prompt([t for _, t in shown]))


def synth(s: SynthSettings) -> dict:
    """Run to s.n kept rows (continuing what s.out holds); returns the counts."""
    check(s)
    seeds = seed_tasks(s.seeds)
    rejected_path = s.out.parent / "rejected.jsonl"
    s.out.parent.mkdir(parents=True, exist_ok=True)
    kept_rows, rejected_rows = read_jsonl(s.out), read_jsonl(rejected_path)
    pool = initial_pool(seeds)
    for row in kept_rows:
        pool.add(f"synth:{row['provenance']['candidate']}", row["messages"][0]["content"])
    done = len(kept_rows) + len(rejected_rows)
    next_number = 1 + max([r["provenance"]["candidate"] for r in kept_rows + rejected_rows], default=-1)
    limit = s.max_candidates or 20 * s.n
    eval_index = None
    if s.eval:
        eval_index = NearIndex(load_rows(s.eval))

    model, tok, data_cfg = load_for_inference(s.model)
    renderer = renderer_for(data_cfg, tok)
    if s.answer_model and s.answer_model != s.model:
        answer_model, answer_tok, answer_cfg = load_for_inference(s.answer_model)
        answer_renderer = renderer_for(answer_cfg, answer_tok)
    else:
        answer_model, answer_renderer = model, renderer
    scorer = None
    if s.reward:
        scorer = Scorer(s.reward, device=next(model.parameters()).device)
    provenance_common = {
        "model": s.model, "answer_model": s.answer_model or s.model,
        "sampling": {"temperature": s.temperature, "top_p": s.top_p, "max_new_tokens": s.max_new_tokens},
        "answer_sampling": {"temperature": s.answer_temperature, "top_p": s.top_p if s.answer_temperature > 0 else 1.0,
                            "max_new_tokens": s.answer_tokens, "best_of": s.best_of},
        "reward": s.reward, "seed": s.seed, "seeds_file": s.seeds}
    reasons: dict[str, int] = {}
    bar = tqdm(total=s.n, initial=min(len(kept_rows), s.n), desc="synth (kept)", file=sys.stderr, unit="row")
    with open(s.out, "a", encoding="utf-8") as kept_f, open(rejected_path, "a", encoding="utf-8") as rej_f:
        while len(kept_rows) < s.n:
            if done >= limit:
                bar.close()
                raise ConfigError(f"synth: {done} candidates tried, {len(kept_rows)} kept, short of --n {s.n}; "
                                  f"see {rejected_path} for why; raise --max-candidates or change the model or seeds")
            kept_tasks = [t for t in pool.tasks if t[0].startswith("synth:")]
            batch = [draw(number, seeds, kept_tasks, s) for number in range(next_number, next_number + s.batch_size)]
            next_number += s.batch_size
            raws = generate(model, renderer, [c.prompt for c in batch], s.max_new_tokens,
                            s.batch_size, temperature=s.temperature, top_p=s.top_p, seed=s.seed * 1_000_003 + batch[0].number)
            # Instruction filters, in order; a candidate also has to differ from those earlier in this batch.
            for c, raw in zip(batch, raws):
                c.raw, c.instruction = raw, clean_instruction(raw)
                c.reason = instruction_problem(c.instruction) or pool.too_close(c.instruction)
                if c.reason is None and eval_index is not None:
                    c.reason = eval_problem(eval_index, Row([{"role": "user", "content": c.instruction}], "", 0, "messages"))
                if c.reason is None:
                    pool.add(f"synth:{c.number}", c.instruction)
            live = [c for c in batch if c.reason is None]
            if live:
                prompts = [[{"role": "user", "content": c.instruction}] for c in live]
                answers = answer_all(answer_model, answer_renderer, prompts, s, scorer, s.seed * 1_000_003 + batch[0].number + 1)
                for c, (answer, scores) in zip(live, answers):
                    c.answer, c.scores = answer, scores
                row_filters(live, answer_renderer.tok, answer_renderer.max_length, eval_index)
                for c in live:
                    if c.reason is not None:  # out of the pool again: a rejected task constrains nothing
                        pool.remove(f"synth:{c.number}")
            for c in batch:
                prov = {**provenance_common, "candidate": c.number, "seed_ids": c.seeds}
                if c.reason is None and len(kept_rows) < s.n:
                    if c.scores:
                        prov["scores"] = c.scores
                    row = {"messages": [{"role": "user", "content": c.instruction},
                                        {"role": "assistant", "content": c.answer}], "provenance": prov}
                    kept_f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    kept_rows.append(row)
                    bar.update(1)
                else:
                    reason = c.reason or "not needed: --n reached in this batch"
                    if c.reason is None:
                        pool.remove(f"synth:{c.number}")
                    key = reason.split(":")[0]
                    reasons[key] = reasons.get(key, 0) + 1
                    rej_f.write(json.dumps({"reason": reason, "instruction": c.instruction, "raw": c.raw,
                                            "answer": c.answer or None, "provenance": prov}, ensure_ascii=False) + "\n")
                done += 1
            kept_f.flush()
            rej_f.flush()
    bar.close()
    return {"kept": len(kept_rows), "candidates": done, "rejected_now": reasons, "out": str(s.out),
            "rejected": str(rejected_path)}


def row_filters(candidates: list[Candidate], tok, max_length: int, eval_index=None) -> None:
    """The filters on a whole row (task + answer): the data-quality lint, then overlap with the eval
    rows; sets each failing candidate's reason."""
    rows = [Row([{"role": "user", "content": c.instruction}, {"role": "assistant", "content": c.answer}],
                "", 0, "messages", n_prompt=1) for c in candidates]
    for problem, idx in lint(rows, tok, max_length).items():
        if problem.startswith("extreme length"):  # relative to the batch at hand: not a fault of the row itself
            continue
        for i in idx:
            candidates[i].reason = candidates[i].reason or f"lint: {problem}"
    if eval_index is not None:
        for c, row in zip(candidates, rows):
            c.reason = c.reason or eval_problem(eval_index, row)


def eval_problem(index, row: Row) -> str | None:
    j = index.near(row)
    if j is not None:
        r = index.rows[j]
        return f"eval: a near duplicate of {r.source}:{r.line}"
    j = index.overlap(row)
    if j is not None:
        r = index.rows[j]
        return f"eval: shares a {index.n}-gram with {r.source}:{r.line}"
    return None


def answer_all(model, renderer, prompts: list[list[dict]], s: SynthSettings, scorer,
               seed: int) -> list[tuple[str, list[float]]]:
    """One answer per prompt; with a reward model, the best of s.best_of sampled ones and all their scores."""
    if scorer is None:
        replies = generate(model, renderer, prompts, s.answer_tokens, s.batch_size, temperature=s.answer_temperature,
                           top_p=s.top_p if s.answer_temperature > 0 else 1.0, seed=seed)
        return [(r.strip(), []) for r in replies]
    samples = [generate(model, renderer, prompts, s.answer_tokens, s.batch_size, temperature=s.answer_temperature,
                        top_p=s.top_p, seed=seed + 7919 * k) for k in range(s.best_of)]
    out = []
    for i, p in enumerate(prompts):
        replies = [samples[k][i].strip() for k in range(s.best_of)]
        scores = scorer.score([(p, [{"role": "assistant", "content": r}]) for r in replies])
        best = max(range(len(replies)), key=scores.__getitem__)
        out.append((replies[best], scores))
    return out
