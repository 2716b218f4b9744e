"""Reward functions for `task: rl`: the built-ins, a user's `module:function`, and a reward model.

A reward function has TRL's signature, so one written for GRPOTrainer works unchanged:

    fn(prompts, completions, **columns) -> list[float | None]

`prompts` and `completions` are as TRL passes them: strings, or message lists where the data is chat
(`completions[i] == [{"role": "assistant", "content": ...}]`); `columns` holds every other column
of the prompt rows (e.g. `answer`), one value per completion, plus `completion_ids`. `None` means
"not applicable to this row"; a completion that every function leaves at None teaches nothing (its
advantage is 0). A function that raises, returns another number of values, or a NaN stops the run,
naming the function and the row.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError
from .metrics import import_function, normalise_text

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def text_of(completion) -> str:
    """A completion as text: a string as is, a message list as its assistant contents."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


# -- the built-ins ----------------------------------------------------------------------------------
def exact_match(prompts, completions, column: str = "answer", **columns) -> list[float | None]:
    """1 where the reply equals the row's `column` after eval's normalisation (case, spaces), else 0;
    None where the row has no such value."""
    refs = columns.get(column)
    if refs is None:
        raise ConfigError(f"reward exact_match: the prompt rows have no column {column!r} (set `column:`)")
    return [None if r is None else float(normalise_text(text_of(c)) == normalise_text(str(r)))
            for c, r in zip(completions, refs)]


def number_match(prompts, completions, column: str = "answer", **columns) -> list[float | None]:
    """1 where the last number in the reply equals the row's `column` (a number or a numeric string)."""
    refs = columns.get(column)
    if refs is None:
        raise ConfigError(f"reward number_match: the prompt rows have no column {column!r} (set `column:`)")
    out: list[float | None] = []
    for c, r in zip(completions, refs):
        want = last_number(str(r)) if r is not None else None
        got = last_number(text_of(c))
        out.append(None if want is None else float(got is not None and math.isclose(got, want, rel_tol=0, abs_tol=1e-9)))
    return out


def regex(prompts, completions, pattern: str = "", **columns) -> list[float]:
    """1 where the reply matches `pattern` (re.search), else 0."""
    if not pattern:
        raise ConfigError("reward regex: give `pattern:` (a regular expression the reply should match)")
    try:
        rx = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ConfigError(f"reward regex: pattern {pattern!r} is not a regular expression: {e}") from None
    return [float(rx.search(text_of(c)) is not None) for c in completions]


def length(prompts, completions, target: int = 200, unit: str = "chars", completion_ids=None, **columns) -> list[float]:
    """0 up to `target` characters (or tokens, `unit: tokens`), then minus the excess over the target
    as a fraction of it: a reply twice the target gets -1."""
    if unit not in ("chars", "tokens"):
        raise ConfigError(f"reward length: unit {unit!r} is not chars or tokens")
    sizes = [len(ids) for ids in completion_ids] if unit == "tokens" else [len(text_of(c)) for c in completions]
    return [-max(0, n - target) / target for n in sizes]


BUILTINS: dict[str, Callable] = {"exact_match": exact_match, "number_match": number_match, "regex": regex,
                                 "length": length}


@dataclass
class Reward:
    name: str
    fn: Callable | None  # a function of TRL's signature; None for a reward model
    weight: float = 1.0
    options: dict = field(default_factory=dict)  # keyword arguments for a built-in (column, pattern, target)
    model: str | None = None  # a reward run: scored with `sftkit score`'s code


def parse_rewards(specs) -> list[Reward]:
    """rl.rewards: a list of {function: builtin | module:name, weight, ...options} or {model: RUN, weight}."""
    if not isinstance(specs, list) or not specs:
        raise ConfigError("rl.rewards: give a list of rewards, e.g. [{function: number_match}] or "
                          "[{function: mymodule:my_reward, weight: 1.0}, {model: runs/reward}]")
    out = []
    for i, spec in enumerate(specs):
        where = f"rl.rewards[{i}]"
        if isinstance(spec, str):
            spec = {"function": spec}
        if not isinstance(spec, dict) or ("function" in spec) == ("model" in spec):
            raise ConfigError(f"{where}: expected {{function: NAME}} or {{model: REWARD_RUN}}, got {spec!r}")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"{where}.weight: expected a number, got {weight!r}")
        options = {k: v for k, v in spec.items() if k not in ("function", "model", "weight")}
        if "model" in spec:
            if options:
                raise ConfigError(f"{where}: a reward model takes only weight, not {sorted(options)}")
            out.append(Reward(f"model:{Path(str(spec['model'])).name}", None, float(weight), model=str(spec["model"])))
            continue
        name = str(spec["function"])
        if name in BUILTINS:
            fn = BUILTINS[name]
        elif ":" in name:
            fn = import_function(name, "rl.rewards")
            if options:
                raise ConfigError(f"{where}: options {sorted(options)} are for built-ins; a function of your own takes "
                                  "the prompt rows' columns")
        else:
            raise ConfigError(f"{where}.function: {name!r} is not a built-in ({', '.join(BUILTINS)}) nor module:function")
        out.append(Reward(name.rsplit(":", 1)[-1], fn, float(weight), options))
    return out


def call(reward: Reward, prompts: list, completions: list, columns: dict[str, list], first_row: int = 0,
         where: Callable[[int], str] = str) -> list[float]:
    """One reward function over the completions; NaN for None. Raises ConfigError naming the function
    and the row (`where(i)` describes row i: its file and line) on an exception, a wrong length or a NaN."""
    try:
        values = reward.fn(prompts=prompts, completions=completions, **columns, **reward.options)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a user's function: any failure is named, with its row
        row = _failing_row(reward, prompts, completions, columns)
        at = f" at {where(row)}" if row is not None else ""
        raise ConfigError(f"reward {reward.name} raised{at}: {type(e).__name__}: {e}") from None
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        n = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise ConfigError(f"reward {reward.name}: returned {n} values for {len(completions)} completions "
                          "(one float or None per completion)")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(float("nan"))
            continue
        if not isinstance(v, (int, float)) and not hasattr(v, "__float__"):  # bools count as 1 and 0
            raise ConfigError(f"reward {reward.name}: returned {v!r} for {where(i)} (expected a number or None)")
        f = float(v)
        if not math.isfinite(f):
            raise ConfigError(f"reward {reward.name}: returned {f} for {where(i)}; a reward must be finite (None = "
                              "not applicable to this row)")
        out.append(f)
    return out


def _failing_row(reward: Reward, prompts, completions, columns) -> int | None:
    for i in range(len(completions)):
        try:
            reward.fn(prompts=prompts[i : i + 1], completions=completions[i : i + 1],
                      **{k: v[i : i + 1] for k, v in columns.items()}, **reward.options)
        except Exception:  # noqa: BLE001
            return i
    return None
