"""Read training files and normalise every row to a list of chat messages.

Every problem is reported as `file:line: field: what is wrong`, so the user can open the file
at the right place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad input data; the message names file, line and field."""


@dataclass
class Row:
    """One normalised training example."""

    messages: list[dict[str, str]]  # role/content dicts: optional system, then user/assistant turns
    source: str  # file the row came from
    line: int  # 1-based line number in that file
    kind: str  # "messages" | "prompt_completion": which format the row was written in


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; malformed JSON stops with its line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    rows = []
    with p.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{p}:{n}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{n}: malformed JSON: {e.msg} at column {e.colno}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{p}:{n}: expected a JSON object per line, got {type(obj).__name__}")
            rows.append((n, obj))
    if not rows:
        raise DataError(f"{p}: empty file (no rows)")
    return rows


def _where(path: str, line: int, field: str) -> str:
    return f"{path}:{line}: {field}"


def normalise(obj: dict[str, Any], path: str, line: int, system: str | None = None) -> Row:
    """A `messages` row or a `prompt`/`completion` row -> Row with checked messages."""
    if "messages" in obj:
        messages, kind = obj["messages"], "messages"
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{_where(path, line, 'messages')}: expected a non-empty list of {{role, content}} objects")
    elif "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if key not in obj:
                raise DataError(f"{_where(path, line, key)}: missing (a prompt/completion row needs both)")
            if not isinstance(obj[key], str):
                raise DataError(f"{_where(path, line, key)}: expected a string, got {type(obj[key]).__name__}")
        messages = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
        kind = "prompt_completion"
    else:
        raise DataError(
            f"{path}:{line}: row has neither `messages` nor `prompt`/`completion` (keys: {', '.join(sorted(obj)) or 'none'})"
        )
    checked = []
    for i, m in enumerate(messages):
        field = f"messages[{i}]" if kind == "messages" else ("prompt" if i == 0 else "completion")
        if not isinstance(m, dict):
            raise DataError(f"{_where(path, line, field)}: expected an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{_where(path, line, field + '.role')}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise DataError(f"{_where(path, line, field + '.content')}: expected a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise DataError(f"{_where(path, line, field if kind == 'prompt_completion' else field + '.content')}: empty reply")
        checked.append({"role": role, "content": content})
    _check_order(checked, path, line, kind)
    if system is not None and checked[0]["role"] != "system":
        checked.insert(0, {"role": "system", "content": system})
    return Row(messages=checked, source=path, line=line, kind=kind)


def _check_order(messages: list[dict[str, str]], path: str, line: int, kind: str) -> None:
    for i, m in enumerate(messages):
        if m["role"] == "system" and i != 0:
            raise DataError(f"{_where(path, line, f'messages[{i}].role')}: system message must come first")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns or turns[0]["role"] != "user":
        raise DataError(f"{_where(path, line, 'messages')}: the conversation must start with a user turn")
    for i in range(1, len(turns)):
        if turns[i]["role"] == turns[i - 1]["role"]:
            offset = len(messages) - len(turns)
            raise DataError(
                f"{_where(path, line, f'messages[{i + offset}].role')}: two {turns[i]['role']} turns in a row"
            )
    if not any(m["role"] == "assistant" for m in turns):
        raise DataError(f"{_where(path, line, 'messages')}: no assistant turn to train on")


def load_rows(path: str | Path, system: str | None = None) -> list[Row]:
    return [normalise(obj, str(path), n, system) for n, obj in read_jsonl(path)]
