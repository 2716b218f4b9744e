"""Preference pairs as rows: TRL's formats (`prompt` + `chosen` + `rejected`, each a string or a
message list, or `chosen` and `rejected` as whole chats that share their prompt) -> Pair, with bad
rows named by file, line and field; the held-out split by prompt. Read by task: preference, task:
reward and `sftkit export` (its check rows)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config, ConfigError
from .sources import DataError, ReadStats, Row, mix, parse_sources, read_source, source_files, split_eval


@dataclass
class Pair:
    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    source: str
    line: int
    margin: float = 0.0  # reward models: how much better chosen is (optional `margin` column)


def _messages(v, role: str, where: str) -> list[dict[str, str]]:
    if isinstance(v, str):
        return [{"role": role, "content": v}]
    if isinstance(v, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                   and m.get("role") in ("system", "user", "assistant") for m in v):
        return [{"role": m["role"], "content": m["content"]} for m in v]
    raise DataError(f"{where}: expected a string or a list of {{role, content}} messages", "wrong type")


def normalise_pair(obj, source: str, line: int, columns: dict[str, str], system: str | None) -> Pair:
    """One preference row -> Pair, or a DataError naming file:line: field: problem."""
    at = f"{source}:{line}"
    if not isinstance(obj, dict):
        raise DataError(f"{at}: expected an object per row, got {type(obj).__name__}", "wrong type")
    col = {k: columns.get(k, k) for k in ("prompt", "chosen", "rejected")}
    for k in ("chosen", "rejected"):
        if col[k] not in obj:
            raise DataError(f"{at}: {col[k]}: missing field; the row has {', '.join(sorted(obj)) or 'no fields'}",
                            "missing field")
    chosen = _messages(obj[col["chosen"]], "assistant", f"{at}: {col['chosen']}")
    rejected = _messages(obj[col["rejected"]], "assistant", f"{at}: {col['rejected']}")
    if col["prompt"] in obj:
        prompt = _messages(obj[col["prompt"]], "user", f"{at}: {col['prompt']}")
    else:  # implicit prompt: the messages both chats share
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise DataError(f"{at}: {col['chosen']}: without a prompt field, chosen and rejected must be chats that "
                            "share their opening turns; these differ from the first message", "prompt differs")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    for k, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply or reply[0]["role"] != "assistant":
            raise DataError(f"{at}: {col[k]}: the reply must start with an assistant message", "no reply")
        if not any(m["content"].strip() for m in reply if m["role"] == "assistant"):
            raise DataError(f"{at}: {col[k]}: empty reply", "empty reply")
    if chosen == rejected:
        raise DataError(f"{at}: {col['rejected']}: identical to {col['chosen']}: nothing to prefer", "chosen == rejected")
    if not prompt or prompt[-1]["role"] != "user":
        raise DataError(f"{at}: {col['prompt']}: the prompt must end with a user turn", "no user turn")
    if system is not None and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    margin = obj.get(columns.get("margin", "margin"), 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise DataError(f"{at}: {columns.get('margin', 'margin')}: expected a number, got {margin!r}", "wrong type")
    return Pair(prompt, chosen, rejected, source, line, float(margin))


def read_pairs(cfg: Config, stats: ReadStats) -> tuple[list[Pair], list[Pair]]:
    """Training and held-out pairs: every data.train source split (data.eval_fraction) before mixing."""
    def load(source: str, split: str = "train") -> list[Pair]:
        return [pair for path in source_files(source) for pair in load_file(path, split)]

    def load_file(path: str, split: str) -> list[Pair]:
        out = []
        for line, obj in read_source(path, split):
            stats.rows += 1
            try:
                if isinstance(obj, DataError):
                    raise obj
                out.append(normalise_pair(obj, path, line, cfg.data.columns, cfg.data.system))
            except DataError as e:
                if cfg.data.on_error != "skip":
                    raise
                stats.skipped[e.reason] += 1
        return out

    sources = parse_sources(cfg.data.train)
    if not sources:
        raise DataError("data.train is not set: give a file of preference pairs (prompt, chosen, rejected)")
    groups = [(load(p), w) for p, w in sources]
    held: list = []
    if cfg.data.eval:
        held = load(cfg.data.eval, "validation")
    elif cfg.data.eval_fraction > 0:
        split = [(split_eval(_as_rows(g), cfg.data.eval_fraction, cfg.train.seed), w) for g, w in groups]
        groups = [([r.raw for r in tr], w) for (tr, _), w in split]
        held = [r.raw for (_, ev), _ in split for r in ev]
    train = mix([(_as_rows(g), w) for g, w in groups], cfg.train.seed) if len(groups) > 1 or groups[0][1] != 1 \
        else _as_rows(groups[0][0])
    return [r.raw for r in train], held


def check_training_pairs(cfg: Config, train_pairs: list, eval_pairs: list) -> None:
    """Some pairs are left to train on once the held-out ones are set aside."""
    if not train_pairs:
        raise ConfigError(f"{cfg.data.train}: no pair left to train on: all {len(eval_pairs)} pairs read are held out "
                          f"(data.eval_fraction={cfg.data.eval_fraction} of {len(eval_pairs)} prompts); give more pairs, "
                          "a lower data.eval_fraction, or a data.eval file")


def _as_rows(pairs: list[Pair]) -> list[Row]:
    """Pairs as Rows (for the shared split and mix) whose content is the prompt: every pair of one prompt
    lands on the same side, so no prompt (nor a reply to it) is both trained on and held out."""
    return [Row(list(p.prompt), p.source, p.line, "preference", raw=p) for p in pairs]
