"""Run outputs for people: metrics.jsonl (+ TensorBoard / MLflow when asked), the loss plot."""

from __future__ import annotations

import json
from pathlib import Path

from .config import Config


def _record(line: str) -> dict | None:
    """One metrics.jsonl line, or None for a torn or foreign one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


class MetricsLog:
    """One JSON object per optimizer step in metrics.jsonl; on resume, lines past the checkpoint are dropped."""

    def __init__(self, run_dir: Path, cfg: Config, start_step: int, main_process: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.active = main_process
        self.tb = self.mlflow = None
        if not main_process:
            return
        if self.path.exists():
            # A run killed after its last checkpoint logged steps the resumed run will take again; a
            # kill -9 in the middle of a write leaves a torn last line, which goes too.
            kept = [line for line in self.path.read_text(errors="replace").splitlines()
                    if (record := _record(line)) is not None and record["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a", encoding="utf-8")
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("log.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if cfg.log.mlflow:
            try:
                import mlflow
            except ImportError:
                raise ImportError("log.mlflow needs the mlflow package: pip install mlflow") from None
            mlflow.set_tracking_uri(cfg.log.mlflow)
            mlflow.set_experiment("sftkit")
            self.mlflow = mlflow.start_run(run_name=run_dir.name)
            mlflow.log_params({k: str(v)[:250] for k, v in _flat(cfg.to_dict()).items()})

    def write(self, record: dict) -> None:
        if not self.active:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.mlflow is not None:
            import mlflow

            mlflow.log_metrics(numbers, step=record["step"])

    def close(self) -> None:
        if not self.active:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            import mlflow

            mlflow.end_run()
            self.mlflow = None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not prefix:
            out.update(_flat(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [r for line in path.read_text(errors="replace").splitlines() if (r := _record(line)) is not None] if path.exists() else []


def plot_loss(run_dir: Path) -> Path | None:
    """plots/loss.png: train and eval loss against step (each named eval set's too, and a distillation's
    NLL and divergence terms)."""
    records = read_metrics(run_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    sets = sorted({k.split("/")[1] for r in records for k in r if k.startswith("eval/") and k.endswith("/eval_loss")})
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss" + (" (mean of the sets)" if sets else ""))
    for name in sets:  # named eval sets (data.eval as a mapping): one curve each
        part = [(r["step"], r[f"eval/{name}/eval_loss"]) for r in records if f"eval/{name}/eval_loss" in r]
        ax.plot(*zip(*part), ".:", label=f"eval loss: {name}", linewidth=1)
    # Distillation: the loss is a blend; its two terms (each per trained token, unweighted) beside it.
    for key, label in (("nll", "train NLL"), ("distill", "distillation term")):
        part = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if part:
            ax.plot(*zip(*part), "--", label=label, linewidth=1)
            train += part  # the scale below covers them too
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per trained token)")
    ax.set_yscale("log" if train and min(v for _, v in train) > 0 else "linear")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / "plots" / "loss.png"
    out.parent.mkdir(exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
