"""Read training data from any common source and normalise every row to one shape.

Formats (`data.format`, detected from the first row's fields when `auto`):
  text               {"text": ...}                                     loss on every token
  prompt_completion  {"prompt": str | messages, "completion": str | messages}
  messages           {"messages": [{"role", "content"}, ...]}          OpenAI style
  sharegpt           {"conversations": [{"from": human|gpt|system, "value"}, ...]}
  alpaca             {"instruction", "input" (optional), "output"}
`data.columns` maps these field names to the columns a dataset really has, e.g. Dolly's
{instruction: instruction, input: context, output: response}.

Every problem is reported as `file:line: field: what is wrong`; with `data.on_error=skip` the
row is skipped instead and counted under its reason.
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..job import log

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("text", "prompt_completion", "messages", "sharegpt", "alpaca")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  # ShareGPT's function-call variants (LLaMA-Factory, Glaive, ToolACE): a call, then its result
                  "function_call": "assistant", "observation": "tool", "tool": "tool", "function_response": "tool"}


class DataError(ValueError):
    """Bad input data; the message names file, line and field. `reason` groups skipped rows."""

    def __init__(self, message: str, reason: str = "invalid row", raw: Any = None):
        super().__init__(message)
        self.reason = reason
        self.raw = raw  # the unreadable line's text, where there is one


@dataclass
class Row:
    """One normalised example: either `text`, or `messages` of which the first `n_prompt` are the prompt."""

    messages: list[dict[str, str]]
    source: str  # file (or dataset) the row came from
    line: int  # 1-based line (JSONL, CSV) or row number (other sources)
    kind: str  # the format the row was written in (one of FORMATS)
    n_prompt: int = 0  # prompt/completion rows: how many messages belong to the prompt
    text: str | None = None  # text rows: the whole text
    raw: Any = field(default=None, repr=False)  # the row as read, for `data clean` to write back unchanged
    tools: list[dict] | None = None  # the `tools` column: JSON-schema function definitions the template is given
    trained: list[int] | None = None  # the assistant turns to train, where a row was expanded into one example per turn
    eval_set: str | None = None  # the named held-out set (data.eval as a mapping, or a named data.train source) it is in


@dataclass
class ReadStats:
    rows: int = 0  # rows read from the sources (before skipping)
    skipped: Counter = field(default_factory=Counter)  # reason -> rows skipped (data.on_error=skip)
    invalid: list[tuple[str, Any]] = field(default_factory=list)  # (message, the row as read) of each skipped row


# -- reading ------------------------------------------------------------------------------------
def _jsonl(p: Path) -> Iterator[tuple[int, Any]]:
    with p.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, DataError(f"{p}:{n}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})",
                                   "not valid UTF-8", raw.decode("utf-8", errors="replace").rstrip("\r\n"))
                continue
            if not text.strip():
                continue
            try:
                yield n, json.loads(text)
            except json.JSONDecodeError as e:
                yield n, DataError(f"{p}:{n}: malformed JSON: {_json_msg(e)}", "malformed JSON",
                                   text.rstrip("\r\n"))


def _json_msg(e: json.JSONDecodeError) -> str:
    # Some of json's messages end in "at" ("Invalid control character at"): say the column once.
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def _json(p: Path) -> Iterator[tuple[int, Any]]:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 (byte {e.start})", "not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: malformed JSON: {_json_msg(e)}", "malformed JSON") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}: one list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{p}: expected a JSON array of rows (or an object holding exactly one array)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a JSON array of rows")
    yield from enumerate(data, start=1)


def _csv(p: Path) -> Iterator[tuple[int, Any]]:
    try:
        with p.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield reader.line_num, dict(row)
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 (byte {e.start})", "not valid UTF-8") from None


def _parquet(p: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    yield from enumerate(pq.read_table(p).to_pylist(), start=1)


def _hf(source: str, split: str) -> Iterator[tuple[int, Any]]:
    import datasets

    p = Path(source)
    if p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except (FileNotFoundError, ValueError, OSError) as e:
            raise DataError(f"{p}: a dataset folder datasets cannot load ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{p}: no split {split!r} (splits: {', '.join(ds)})")
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as e:  # noqa: BLE001 - offline, not found, gated: all end in the same advice
            raise DataError(
                f"{source}: not a local file or folder, and loading it as a Hugging Face hub dataset failed "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). Without network, "
                "save it elsewhere with datasets' save_to_disk or as JSONL and pass the path."
            ) from None
    yield from enumerate(ds, start=1)


DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
SAVED_DATASET = ("dataset_info.json", "state.json", "dataset_dict.json")  # what datasets' save_to_disk writes


def source_files(source: str) -> list[str]:
    """The files one source names: a folder of data files (not a dataset saved with save_to_disk) as
    its files in path order, sub-folders included, dot-files and dot-folders left out; anything else as
    itself. Files of other types beside them (a README) are named in the log, never read silently."""
    p = Path(source)
    if not p.is_dir() or any((p / n).is_file() for n in SAVED_DATASET):
        return [source]
    found = sorted(f for f in p.rglob("*") if f.is_file() and not any(x.startswith(".") for x in f.relative_to(p).parts))
    files = [f for f in found if f.suffix.lower() in DATA_SUFFIXES]
    if not files:
        raise DataError(f"{p}: a folder without data files ({', '.join(DATA_SUFFIXES)}) that is not a dataset "
                        "saved with datasets' save_to_disk either" + (f" (it holds {', '.join(f.name for f in found[:5])})"
                                                                      if found else " (it is empty)"))
    others = [str(f.relative_to(p)) for f in found if f not in files]
    log(f"{p}: reading {len(files)} data files ({', '.join(str(f.relative_to(p)) for f in files[:4])}"
        f"{', ...' if len(files) > 4 else ''})" + (f"; not data, left out: {', '.join(others[:4])}" if others else ""))
    return [str(f) for f in files]


def read_source(source: str, split: str = "train") -> Iterator[tuple[int, Any]]:
    """(line or row number, raw row) for every row; a DataError in place of a row that could not be read."""
    p = Path(source)
    if p.is_file():
        if p.stat().st_size == 0:
            raise DataError(f"{p}: empty file (no rows)", "empty file")
        suffix = p.suffix.lower()
        readers = {".jsonl": _jsonl, ".ndjson": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}
        if suffix not in readers:
            raise DataError(f"{p}: unknown file type {suffix!r} (use .jsonl, .json, .csv, .parquet or a dataset folder)")
        if suffix == ".json":  # JSON Lines saved as .json are common: sniff the first line
            with p.open("rb") as f:
                first = f.readline().strip()
            if first.startswith(b"{") and first.endswith(b"}") and p.read_bytes().strip().count(b"\n") > 0:
                readers[".json"] = _jsonl
        yield from readers[suffix](p)
    elif p.is_dir():
        if not any((p / n).is_file() for n in SAVED_DATASET):
            raise DataError(f"{p}: a folder, not a data file nor a dataset saved with datasets' save_to_disk "
                            "(data.train and data.eval read a folder of data files; here give one file)")
        yield from _hf(source, split)
    elif p.suffix.lower() in (".jsonl", ".ndjson", ".json", ".csv", ".parquet") or source.startswith((".", "/", "~")):
        raise DataError(f"{source}: file not found")
    else:
        yield from _hf(source, split)


# -- normalising --------------------------------------------------------------------------------
def detect_format(obj: dict[str, Any], columns: dict[str, str]) -> str:
    def has(name: str) -> bool:
        return columns.get(name, name) in obj

    if has("messages"):
        return "messages"
    if has("conversations"):
        return "sharegpt"
    if has("prompt") or has("completion"):
        return "prompt_completion"
    if has("instruction") or has("output"):
        return "alpaca"
    if has("text"):
        return "text"
    raise DataError(
        f"cannot tell the format from the fields ({', '.join(sorted(obj)) or 'none'}): expected messages, "
        "conversations, prompt/completion, instruction/output or text; set data.format and data.columns",
        "unknown format",
    )


class Normaliser:
    """Checks rows of one source and turns them into Rows."""

    def __init__(self, source: str, fmt: str = "auto", columns: dict[str, str] | None = None,
                 system: str | None = None):
        if fmt not in ("auto", *FORMATS):
            raise DataError(f"data.format: {fmt!r} is not one of auto, {', '.join(FORMATS)}")
        self.source, self.fmt, self.columns, self.system = source, fmt, dict(columns or {}), system

    def _err(self, line: int, fld: str, msg: str, reason: str) -> DataError:
        return DataError(f"{self.source}:{line}: {fld}: {msg}", reason)

    def _get(self, obj: dict, name: str, line: int, required: bool = True) -> Any:
        col = self.columns.get(name, name)
        if col not in obj:
            if not required:
                return None
            mapped = f" (mapped by data.columns.{name})" if name in self.columns else ""
            raise self._err(line, col, f"missing field{mapped}; the row has {', '.join(sorted(obj)) or 'no fields'}",
                            "missing field")
        return obj[col]

    def _string(self, obj: dict, name: str, line: int, required: bool = True) -> str | None:
        v = self._get(obj, name, line, required)
        if v is None and not required:
            return None
        if not isinstance(v, str):
            raise self._err(line, self.columns.get(name, name), f"expected a string, got {type(v).__name__}", "wrong type")
        return v

    def __call__(self, obj: Any, line: int) -> Row:
        row = self._normalise(obj, line)
        row.raw = obj
        return row

    def _normalise(self, obj: Any, line: int) -> Row:
        if not isinstance(obj, dict):
            raise DataError(f"{self.source}:{line}: expected an object per row, got {type(obj).__name__}", "wrong type")
        fmt = self.fmt if self.fmt != "auto" else self._detect(obj, line)
        if fmt == "text":
            text = self._string(obj, "text", line)
            if not text.strip():
                raise self._err(line, self.columns.get("text", "text"), "empty text", "empty text")
            return Row([], self.source, line, "text", text=text)
        if fmt == "messages":
            msgs = self._message_list(self._get(obj, "messages", line), line, self.columns.get("messages", "messages"))
            row = Row(msgs, self.source, line, "messages")
        elif fmt == "sharegpt":
            row = Row(self._sharegpt(obj, line), self.source, line, "sharegpt")
        elif fmt == "alpaca":
            instruction = self._string(obj, "instruction", line)
            extra = self._string(obj, "input", line, required=False)
            output = self._string(obj, "output", line)
            prompt = instruction if not extra or not extra.strip() else f"{instruction}\n\n{extra}"
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
            fields = [self.columns.get("instruction", "instruction"), self.columns.get("output", "output")]
            self._check_messages(msgs, line, lambda i: fields[i], lambda i: fields[i])
            row = Row(msgs, self.source, line, "alpaca", n_prompt=1)
        else:
            row = self._prompt_completion(obj, line)
        if self.system is not None and row.messages[0]["role"] != "system":
            row.messages.insert(0, {"role": "system", "content": self.system})
            row.n_prompt += 1 if row.n_prompt else 0
        row.tools = self.tools_of(obj, line)
        return row

    def _detect(self, obj: dict, line: int) -> str:
        try:
            return detect_format(obj, self.columns)
        except DataError as e:
            raise DataError(f"{self.source}:{line}: {e}", e.reason) from None

    def _prompt_completion(self, obj: dict, line: int) -> Row:
        parts = []
        for name, role in (("prompt", "user"), ("completion", "assistant")):
            v = self._get(obj, name, line)
            col = self.columns.get(name, name)
            if isinstance(v, str):
                if role == "assistant" and not v.strip():
                    raise self._err(line, col, "empty reply", "empty reply")
                parts.append([{"role": role, "content": v}])
            elif isinstance(v, list):
                parts.append(self.raw_messages(v, line, col))
            else:
                raise self._err(line, col, f"expected a string or a list of messages, got {type(v).__name__}", "wrong type")
        msgs = parts[0] + parts[1]
        n_prompt = len(parts[0])
        if not any(m["role"] == "assistant" for m in parts[1]):
            raise self._err(line, self.columns.get("completion", "completion"), "has no assistant message", "no reply")
        cols = [self.columns.get(k, k) for k in ("prompt", "completion")]
        strings = [isinstance(self._get(obj, k, line), str) for k in ("prompt", "completion")]

        def name(i: int) -> str:
            part = 0 if i < n_prompt else 1
            return cols[part] if strings[part] else f"{cols[part]}[{i - part * n_prompt}]"

        self._check_messages(msgs, line, name, lambda i: name(i) if strings[i >= n_prompt] else f"{name(i)}.content")
        return Row(msgs, self.source, line, "prompt_completion", n_prompt=n_prompt)

    def raw_messages(self, v: Any, line: int, col: str) -> list[dict[str, Any]]:
        out = []
        for i, m in enumerate(v):
            if not isinstance(m, dict):
                raise self._err(line, f"{col}[{i}]", "expected an object with role and content", "wrong type")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise self._err(line, f"{col}[{i}].role",
                                f"unknown role {role!r} (expected one of {', '.join(ROLES)})", "unknown role")
            if content is None and role == "assistant" and m.get("tool_calls"):
                content = ""  # a reply that only calls tools (OpenAI writes content: null)
            if not isinstance(content, str):
                raise self._err(line, f"{col}[{i}].content", f"expected a string, got {type(content).__name__}",
                                "wrong type")
            msg: dict[str, Any] = {"role": role, "content": content}
            for key in ("reasoning_content", "tool_calls", "name", "tool_call_id"):
                if m.get(key) is not None:
                    if role != ("tool" if key == "tool_call_id" else "assistant") and key != "name":
                        raise self._err(line, f"{col}[{i}].{key}", f"only {'tool' if key == 'tool_call_id' else 'assistant'} "
                                        "messages carry it", "misplaced field")
                    msg[key] = m[key]
            if "reasoning_content" in msg and not isinstance(msg["reasoning_content"], str):
                raise self._err(line, f"{col}[{i}].reasoning_content", "expected a string", "wrong type")
            if "tool_calls" in msg:
                msg["tool_calls"] = self._tool_calls(msg["tool_calls"], line, f"{col}[{i}].tool_calls")
            out.append(msg)
        return out

    def _tool_calls(self, v: Any, line: int, col: str) -> list[dict]:
        """Tool calls in the OpenAI / transformers shape, {type: function, function: {name, arguments}},
        from that shape or the flat {name, arguments}; arguments as an object (a JSON string is parsed)."""
        if not isinstance(v, list) or not v:
            raise self._err(line, col, "expected a non-empty list of calls", "wrong type")
        out = []
        for j, call in enumerate(v):
            where = f"{col}[{j}]"
            fn = call.get("function", call) if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise self._err(line, f"{where}.function.name", "expected {function: {name, arguments}}", "bad tool call")
            args = fn.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError as e:
                    raise self._err(line, f"{where}.function.arguments", f"not JSON: {_json_msg(e)}", "bad tool call") from None
            if not isinstance(args, dict):
                raise self._err(line, f"{where}.function.arguments", f"expected an object, got {type(args).__name__}",
                                "bad tool call")
            norm = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
            if isinstance(call, dict) and call.get("id") is not None:
                norm["id"] = call["id"]
            out.append(norm)
        return out

    def tools_of(self, obj: dict, line: int) -> list[dict] | None:
        """The `tools` column: a list of function definitions (or its JSON string), as TRL and the
        transformers chat templates take it."""
        col = self.columns.get("tools", "tools")
        v = obj.get(col)
        if v is None or v == "" or v == []:
            return None
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError as e:
                raise self._err(line, col, f"not JSON: {_json_msg(e)}", "bad tools") from None
        if not isinstance(v, list) or not all(isinstance(t, dict) for t in v):
            raise self._err(line, col, "expected a list of function definitions ({type: function, function: "
                            "{name, description, parameters}})", "bad tools")
        for k, t in enumerate(v):
            fn = t.get("function", t)
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise self._err(line, f"{col}[{k}]", "a function definition needs a name", "bad tools")
        return v

    def _message_list(self, v: Any, line: int, col: str) -> list[dict[str, str]]:
        if not isinstance(v, list) or not v:
            raise self._err(line, col, "expected a non-empty list of {role, content} objects", "wrong type")
        msgs = self.raw_messages(v, line, col)
        self._check_messages(msgs, line, lambda i: f"{col}[{i}]")
        return msgs

    def _sharegpt(self, obj: dict, line: int) -> list[dict[str, str]]:
        col = self.columns.get("conversations", "conversations")
        v = self._get(obj, "conversations", line)
        if not isinstance(v, list) or not v:
            raise self._err(line, col, "expected a non-empty list of {from, value} objects", "wrong type")
        msgs = []
        for i, m in enumerate(v):
            if not isinstance(m, dict):
                raise self._err(line, f"{col}[{i}]", "expected an object with from and value", "wrong type")
            who, value = m.get("from"), m.get("value")
            if who not in SHAREGPT_ROLES:
                raise self._err(line, f"{col}[{i}].from", f"unknown role {who!r} (expected human, gpt or system)",
                                "unknown role")
            if not isinstance(value, str):
                raise self._err(line, f"{col}[{i}].value", f"expected a string, got {type(value).__name__}", "wrong type")
            if who == "function_call":  # the value is the call: {"name": ..., "arguments": ...} (or a list of them)
                try:
                    calls = json.loads(value)
                except json.JSONDecodeError as e:
                    raise self._err(line, f"{col}[{i}].value", f"a function_call is JSON: {_json_msg(e)}",
                                    "bad tool call") from None
                calls = calls if isinstance(calls, list) else [calls]
                msgs.append({"role": "assistant", "content": "",
                             "tool_calls": self._tool_calls(calls, line, f"{col}[{i}].value")})
                continue
            msgs.append({"role": SHAREGPT_ROLES[who], "content": value})
        self._check_messages(msgs, line, lambda i: f"{col}[{i}]")
        return msgs

    def _check_messages(self, msgs: list[dict[str, str]], line: int, name, content=None) -> None:
        """Order and content rules; `name(i)` is the field of message i, `content(i)` of its text."""
        content = content or (lambda i: f"{name(i)}.content")
        for i, m in enumerate(msgs):
            if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
                raise self._err(line, content(i), "empty reply", "empty reply")
            if m["role"] == "system" and i != 0:
                raise self._err(line, f"{name(i)}.role", "system message must come first", "system not first")
        turns = msgs[1:] if msgs[0]["role"] == "system" else msgs
        offset = len(msgs) - len(turns)
        if not turns or turns[0]["role"] != "user":
            raise self._err(line, f"{name(min(offset, len(msgs) - 1))}.role", "the conversation must start with a user turn",
                            "no user turn first")
        for i in range(1, len(turns)):
            prev, role = turns[i - 1], turns[i]["role"]
            if role == "tool":  # a tool's result answers a call: after an assistant turn that made one, or another result
                if not (prev["role"] == "tool" or (prev["role"] == "assistant" and prev.get("tool_calls"))):
                    raise self._err(line, f"{name(i + offset)}.role", "a tool turn must follow an assistant turn "
                                    "with tool_calls (or another tool turn)", "tool turn without a call")
            elif role == prev["role"]:
                raise self._err(line, f"{name(i + offset)}.role", f"two {role} turns in a row",
                                f"two {role} turns in a row")
            elif prev["role"] == "assistant" and prev.get("tool_calls"):
                raise self._err(line, f"{name(i + offset)}.role", "an assistant turn with tool_calls must be followed "
                                "by the tools' results (role: tool)", "tool call without a result")
        if not any(m["role"] == "assistant" for m in turns):
            raise self._err(line, name(len(msgs) - 1), "no assistant turn to train on", "no reply")


# -- whole sources ------------------------------------------------------------------------------
def load_rows(source: str, fmt: str = "auto", columns: dict[str, str] | None = None, system: str | None = None,
              on_error: str = "error", stats: ReadStats | None = None, split: str = "train") -> list[Row]:
    """All rows of one source; bad rows stop the run, or with on_error=skip are counted in `stats`."""
    if on_error not in ("error", "skip"):
        raise DataError(f"data.on_error: {on_error!r} is not one of error, skip")
    stats = stats if stats is not None else ReadStats()
    files = source_files(str(source))
    if files != [str(source)]:  # a folder: each file read as a source of its own, so messages name the file
        return [r for f in files for r in load_rows(f, fmt, columns, system, on_error, stats, split)]
    norm = Normaliser(str(source), fmt, columns, system)
    rows: list[Row] = []
    first = True
    for line, obj in read_source(str(source), split):
        stats.rows += 1
        try:
            if isinstance(obj, DataError):
                raise obj
            if first and columns and isinstance(obj, dict):
                # A mapping that names a column the data lacks is a config error, not a bad row.
                missing = [f"{k}: {v}" for k, v in columns.items() if v not in obj]
                if missing:
                    raise DataError(f"{source}:{line}: data.columns names columns the data does not have: "
                                    f"{', '.join(missing)} (the data has: {', '.join(sorted(obj))})", "missing column")
            first = False
            rows.append(norm(obj, line))
        except DataError as e:
            if on_error == "error" or e.reason == "missing column":
                raise
            stats.skipped[e.reason] += 1
            stats.invalid.append((str(e), e.raw if isinstance(obj, DataError) else obj))
    if stats.rows == 0:
        raise DataError(f"{source}: empty file (no rows)", "empty file")
    return rows


def parse_sources(spec: Any) -> list[tuple[str, float]]:
    """`data.train`: a path, or a list of paths / {path, weight, name} for a weighted mix."""
    return [(path, weight) for path, weight, _ in named_sources(spec)]


def named_sources(spec: Any) -> list[tuple[str, float, str | None]]:
    """`data.train` as (path, weight, name): a source's `name` makes its held-out split (data.eval_fraction)
    an eval set of that name."""
    if spec is None:
        return []
    if isinstance(spec, str):
        return [(spec, 1.0, None)]
    out = []
    for i, item in enumerate(spec):
        if isinstance(item, str):
            out.append((item, 1.0, None))
        elif isinstance(item, dict) and "path" in item:
            unknown = set(item) - {"path", "weight", "name"}
            if unknown:
                raise DataError(f"data.train[{i}]: unknown keys {sorted(unknown)} (expected path, weight and name)")
            w = float(item.get("weight", 1.0))
            if w < 0:
                raise DataError(f"data.train[{i}].weight: must be >= 0, got {w}")
            name = item.get("name")
            if name is not None and (not isinstance(name, str) or not name or "/" in name):
                raise DataError(f"data.train[{i}].name: expected a name without '/', got {name!r}")
            out.append((str(item["path"]), w, name))
        else:
            raise DataError(f"data.train[{i}]: expected a path or {{path: ..., weight: ..., name: ...}}, got {item!r}")
    return out


def eval_sources(spec: Any) -> list[tuple[str, str | None]]:
    """`data.eval`: a path (one unnamed set), or {name: path} (named sets, each scored on its own)."""
    if spec is None:
        return []
    if isinstance(spec, str):
        return [(spec, None)]
    if isinstance(spec, dict) and spec and all(isinstance(k, str) and k and "/" not in k and isinstance(v, str)
                                               for k, v in spec.items()):
        return [(v, k) for k, v in spec.items()]
    raise DataError(f"data.eval: expected a path or {{name: path, ...}} (names without '/'), got {spec!r}")


def mix(groups: list[tuple[list[Row], float]], seed: int) -> list[Row]:
    """Weighted mix: weight 2 repeats a source's rows twice, 0.5 keeps a seeded half of them."""
    rng = random.Random(seed)
    out: list[Row] = []
    for rows, weight in groups:
        whole, frac = int(weight), weight - int(weight)
        out += rows * whole
        if frac > 0:
            out += rng.sample(rows, round(frac * len(rows)))
    return out


def split_eval(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Deterministic held-out split by seed: (train, eval)."""
    if not 0 < fraction < 1:
        raise DataError(f"data.eval_fraction: must be between 0 and 1, got {fraction}")
    # Rows with the same content go to the same side: a duplicate would otherwise be trained on and
    # then "held out".
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(content_key(r), []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    n_eval = max(1, round(fraction * len(rows)))
    held: set[int] = set()
    for k in keys:
        if len(held) >= n_eval:
            break
        held.update(groups[k])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def content_key(row: Row) -> str:
    """What a row says, whatever file or line it came from."""
    return row.text if row.text is not None else json.dumps(row.messages, sort_keys=True, ensure_ascii=False)
