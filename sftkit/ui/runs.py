"""What the dashboard reads from a runs folder: plain functions over the files a run writes.

Nothing here writes: the dashboard is read-only except for chat. Every path a request names goes
through `inside`, which refuses anything that resolves outside the runs folder.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import yaml

from ..rundir import is_run_dir


def inside(root: Path, rel: str) -> Path | None:
    """root/rel when it resolves to root or below it (symlinks followed), else None. Absolute paths,
    `..` and links that lead out are refused."""
    if not rel or rel.startswith(("/", "\\")) or "\x00" in rel or ":" in rel.split("/")[0]:
        return None if rel else root.resolve()
    base = root.resolve()
    target = (base / rel).resolve()
    return target if target == base or base in target.parents else None


def find_runs(root: Path, depth: int = 3) -> list[str]:
    """Run folders under root (a sweep's trials sit one level down), as paths relative to root."""
    found: list[str] = []

    def walk(d: Path, level: int) -> None:
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for c in children:
            if is_run_dir(c):
                found.append(c.relative_to(root).as_posix())
            if level < depth and c.name not in ("final", "plots", "eval") and not c.name.startswith("step-"):
                walk(c, level + 1)

    walk(root, 1)
    return found


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def read_config(run: Path) -> dict:
    try:
        value = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        return value if isinstance(value, dict) else {}
    except (OSError, yaml.YAMLError):
        return {}


def read_metrics(run: Path, offset: int = 0) -> tuple[list[dict], int]:
    """The records of metrics.jsonl from byte `offset`, and the offset after the last whole line: a
    line still being written is left for the next call."""
    records: list[dict] = []
    try:
        with open(run / "metrics.jsonl", "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return records, offset
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn line from a killed run
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records, offset + end


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status(run: Path) -> tuple[str, str]:
    """(running | completed | early-stopped | stopped | failed, why) from summary.json and status.json."""
    summary, st = read_json(run / "summary.json"), read_json(run / "status.json")
    if summary and st.get("status") != "running":
        stopped = summary.get("stopped", "completed")
        if stopped == "early stopping":
            return "early-stopped", f"best at step {summary.get('best_step')}"
        return ("completed", "") if stopped == "completed" else ("stopped", str(stopped))
    if st.get("status") == "running":
        if st.get("host") == socket.gethostname() and isinstance(st.get("pid"), int) and not _alive(st["pid"]):
            return "failed", "the training process is gone (killed?); continue with --resume"
        return "running", ""
    if st.get("status") in ("failed", "stopped"):
        return st["status"], st.get("error", "")
    if summary:
        return "completed", ""
    return "failed", "no summary.json: the run ended before its final save"


def checkpoints(run: Path) -> list[dict]:
    """The run's complete checkpoints (a `.tmp` folder is a save in progress), by step."""
    out = []
    for p in run.glob("checkpoints/step-*"):
        meta = read_json(p / "meta.json")
        if p.is_dir() and not p.name.endswith(".tmp") and "step" in meta:
            out.append({"name": p.name, "step": meta["step"], "best_eval": meta.get("best_eval")})
    return sorted(out, key=lambda c: c["step"])


def summarise(root: Path, name: str) -> dict:
    """One row of the runs table."""
    run = root / name
    cfg, summary = read_config(run), read_json(run / "summary.json")
    records, _ = read_metrics(run)
    state, why = status(run)
    evals = [r["eval_loss"] for r in records if isinstance(r.get("eval_loss"), (int, float))]
    scores = summary.get("scores") or {}
    metric = summary.get("metric")
    if metric is None and isinstance(summary.get("metrics"), dict) and "macro_f1" in summary["metrics"]:
        metric, scores = "macro_f1", {"tuned": summary["metrics"]["macro_f1"]}
    forgetting = summary.get("forgetting")
    if forgetting is None:
        forgetting = next((r["forgetting"] for r in reversed(records) if "forgetting" in r), None)
    started = read_json(run / "status.json").get("started")
    seconds = summary.get("seconds")
    if seconds is None and state == "running" and started:
        seconds = time.time() - started
    return {"name": name, "task": cfg.get("task", "sft"), "method": (cfg.get("peft") or {}).get("method", "lora"),
            "model": (cfg.get("model") or {}).get("name", ""), "steps": summary.get("steps", records[-1]["step"] if records else 0),
            "final_eval_loss": summary.get("eval_loss", evals[-1] if evals else None),
            "best_eval_loss": summary.get("best_eval_loss", min(evals) if evals else None),
            "metric": metric, "base": scores.get("base"), "tuned": scores.get("tuned"), "forgetting": forgetting,
            "seconds": seconds, "status": state, "why": why}


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(configs: dict[str, dict]) -> list[tuple[str, list]]:
    """(key, [value per run]) for every config key whose value differs between the runs."""
    flats = {name: flat(c) for name, c in configs.items()}
    keys = sorted(set().union(*flats.values())) if flats else []
    rows = []
    for k in keys:
        values = [f.get(k) for f in flats.values()]
        if any(v != values[0] for v in values[1:]):
            rows.append((k, values))
    return rows


def last_samples(run: Path, limit: int = 20) -> tuple[str, object, list[tuple[str, str, object]]] | None:
    """task: rl's samples.jsonl: the last eval's (label, step, [(prompt, reply, reward)]), or None.
    A line that does not parse is skipped; prompts given as messages are shown as their last turn."""
    path = run / "samples.jsonl"
    if not path.is_file():
        return None
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[-2000:]:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict):
            records.append(r)
    if not records:
        return None
    last = (records[-1].get("label"), records[-1].get("step"))
    rows = []
    for r in records:
        if (r.get("label"), r.get("step")) != last:
            continue
        p = r.get("prompt")
        if isinstance(p, list) and p and isinstance(p[-1], dict):
            p = p[-1].get("content")
        rows.append((str(p), str(r.get("completion", "")), r.get("reward")))
    return str(last[0]), last[1], rows[:limit]


def comparison(run: Path) -> list[tuple[str, dict]]:
    """What `sftkit compare` wrote for a run: (row name, its metrics) for each row (base, tuned and
    the alternatives: shots, retrieval), base and tuned first, then in the order compare names them."""
    folder = run / "compare"
    if not folder.is_dir():
        return []
    found = {p.name: read_json(p / "eval.json").get("metrics", {}) for p in folder.iterdir()
             if p.is_dir() and (p / "eval.json").is_file()}
    lead = [n for n in ("base", "tuned") if n in found]
    rest = sorted(n for n in found if n not in lead and not n.startswith("tuned"))
    tail = sorted(n for n in found if n not in lead and n.startswith("tuned"))
    return [(n, found[n]) for n in lead[:1] + rest + lead[1:] + tail]
