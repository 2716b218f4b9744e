"""Hyperparameter search on optuna: every trial an ordinary run, the study in SQLite so it resumes.

    sftkit sweep CONFIG --space SPACE.yaml --trials N [--sampler tpe|random|grid]

SPACE.yaml maps config keys to distributions:
    train.lr: {loguniform: [1.0e-5, 1.0e-3]}
    peft.r: {choice: [8, 16, 32]}
    train.epochs: {int: [1, 3]}
    peft.dropout: {uniform: [0.0, 0.2]}
"""

from __future__ import annotations

import csv
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from . import compat
from .config import Config, ConfigError, load_config, save_config, valid_keys, with_overrides
from .job import log
from .trainer import train

KINDS = ("loguniform", "uniform", "int", "choice")


@dataclass
class Param:
    key: str
    kind: str
    values: list[Any]

    def suggest(self, trial):
        if self.kind == "loguniform":
            return trial.suggest_float(self.key, *self.values, log=True)
        if self.kind == "uniform":
            return trial.suggest_float(self.key, *self.values)
        if self.kind == "int":
            return trial.suggest_int(self.key, *self.values)
        return trial.suggest_categorical(self.key, self.values)

    def grid(self) -> list[Any]:
        if self.kind == "choice":
            return list(self.values)
        if self.kind == "int":
            return list(range(self.values[0], self.values[1] + 1))
        raise ConfigError(f"--sampler grid: {self.key} is {self.kind}; a grid needs choice or int ranges")


def load_space(path: str | Path) -> list[Param]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--space: file not found: {p}")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{p}: expected a mapping of config keys to distributions, e.g. train.lr: {{loguniform: [1e-5, 1e-3]}}")
    params = []
    keys = valid_keys()
    for key, dist in raw.items():
        if key not in keys:
            load_config(None, {key: None})  # raises the unknown-key error with its suggestions
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in KINDS:
            raise ConfigError(f"{p}: {key}: expected one of {', '.join(f'{{{k}: [...]}}' for k in KINDS)}, got {dist!r}")
        kind, values = next(iter(dist.items()))
        if not isinstance(values, list) or (kind != "choice" and len(values) != 2) or not values:
            raise ConfigError(f"{p}: {key}: {kind} takes a list of {'values' if kind == 'choice' else '[low, high]'}")
        if kind in ("loguniform", "uniform"):
            values = [float(v) for v in values]
        params.append(Param(key, kind, values))
    return params


def metric_of(result, metric: str) -> float:
    if metric == "eval_loss":
        if result.eval_loss is None:
            raise ConfigError("--metric eval_loss needs held-out data: set data.eval or data.eval_fraction")
        return result.eval_loss
    if metric == "final_loss":
        return result.final_loss
    if "tuned" in result.scores:
        return result.scores["tuned"]
    raise ConfigError(f"--metric {metric}: use eval_loss, final_loss, or the eval.metric with eval.generate=true")


def sweep(cfg: Config, space_path: str, trials: int, sampler: str = "tpe", metric: str = "eval_loss",
          direction: str = "minimize", out: str | None = None, pruner: str = "median") -> Path:
    params = load_space(space_path)
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"--direction: {direction!r} is not minimize or maximize")
    sweep_dir = Path(out) if out else Path(cfg.output_dir) / "sweep"
    sweep_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, sweep_dir / "base.yaml")
    if sampler == "grid":
        grid = {p.key: p.grid() for p in params}
        chosen = optuna.samplers.GridSampler(grid, seed=cfg.train.seed)
        size = 1
        for v in grid.values():
            size *= len(v)
        trials = min(trials, size) if trials else size
    elif sampler == "random":
        chosen = optuna.samplers.RandomSampler(seed=cfg.train.seed)
    elif sampler == "tpe":
        chosen = optuna.samplers.TPESampler(seed=cfg.train.seed)
    else:
        raise ConfigError(f"--sampler: {sampler!r} is not one of tpe, random, grid")
    prune = {"median": optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
             "halving": optuna.pruners.SuccessiveHalvingPruner(), "none": optuna.pruners.NopPruner()}
    if pruner not in prune:
        raise ConfigError(f"--pruner: {pruner!r} is not one of median, halving, none")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="sftkit", storage=f"sqlite:///{sweep_dir / 'study.db'}",
                                load_if_exists=True, direction=direction, sampler=chosen, pruner=prune[pruner])

    # A trial left RUNNING was cut off by a crash or kill: record that, and run its parameters again.
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        compat.set_trial_attr(study, t, "reason", "interrupted (sweep killed); parameters re-queued")
        compat.set_trial_state(study, t, TrialState.FAIL)
        study.enqueue_trial(t.params, skip_if_exists=False)

    def finished() -> int:
        return sum(1 for t in study.get_trials(deepcopy=False)
                   if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                   or (t.state == TrialState.FAIL and not str(t.user_attrs.get("reason", "")).startswith("interrupted")))

    done = finished()
    if done:
        log(f"continuing the study in {sweep_dir}: {done} of {trials} trials already finished")
    def objective(trial) -> float:
        values = {p.key: p.suggest(trial) for p in params}
        run_dir = sweep_dir / f"trial-{trial.number:03d}"
        log(f"trial {trial.number}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
        trial.set_user_attr("run_dir", str(run_dir))
        t0 = time.time()

        def report(step: int, record: dict) -> None:
            if record.get(metric) is not None:
                trial.report(record[metric], step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at step {step}: {metric} {record[metric]:.4f}")

        try:
            result = train(with_overrides(cfg, {**values, "output_dir": str(run_dir)}), overwrite=True, on_eval=report)
            value = metric_of(result, metric)
        except optuna.TrialPruned as e:
            trial.set_user_attr("reason", str(e))
            log(f"trial {trial.number} {e}")
            raise
        except (SystemExit, KeyboardInterrupt) as e:
            if isinstance(e, SystemExit) and e.code in (0, None):
                raise
            # Ctrl-C / SIGTERM: the run saved and stopped; the sweep stops too. The trial is not a finished
            # one: its parameters are queued again for the next `sftkit sweep` of the same study.
            trial.set_user_attr("reason", "interrupted (signal); parameters re-queued")
            study.enqueue_trial(trial.params, skip_if_exists=False)
            raise
        except Exception as e:  # a failing trial is recorded and never stops the sweep
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            trial.set_user_attr("reason", reason)
            log(f"trial {trial.number} failed: {reason}")
            raise RuntimeError(reason) from None
        finally:
            trial.set_user_attr("seconds", round(time.time() - t0, 1))
        log(f"trial {trial.number}: {metric} = {value:.4f}")
        return value

    try:
        while finished() < trials:
            if sampler == "grid" and chosen.is_exhausted(study):
                break
            study.optimize(objective, n_trials=1, catch=(RuntimeError,))
    except (SystemExit, KeyboardInterrupt) as e:
        code = e.code if isinstance(e, SystemExit) else 130
        if code in (0, None):
            raise
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # optuna leaves it running
            compat.set_trial_state(study, t, TrialState.FAIL)
        write_results(study, cfg, sweep_dir, metric)
        log(f"sweep stopped by a signal after {finished()} finished trials; run the same command to "
              f"continue it ({sweep_dir})")
        raise SystemExit(code) from None

    write_results(study, cfg, sweep_dir, metric)
    return sweep_dir


def write_results(study, cfg: Config, sweep_dir: Path, metric: str) -> None:
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    with open(sweep_dir / "trials.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "state", metric, *keys, "seconds", "reason", "run_dir"])
        for t in trials:
            w.writerow([t.number, t.state.name, "" if t.value is None else t.value, *[t.params.get(k, "") for k in keys],
                        t.user_attrs.get("seconds", ""), t.user_attrs.get("reason", ""), t.user_attrs.get("run_dir", "")])
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    lines = [f"{'trial':>5} {'state':<9} {metric:>12}  " + "  ".join(keys)]
    for t in trials:
        value = f"{t.value:12.4f}" if t.value is not None else f"{'-':>12}"
        lines.append(f"{t.number:>5} {t.state.name:<9} {value}  " + "  ".join(str(t.params.get(k, "")) for k in keys)
                     + (f"  ({t.user_attrs['reason']})" if t.user_attrs.get("reason") else ""))
    print("\n".join(lines))
    if not complete:
        print("no trial completed: see the reasons above")
        return
    best = study.best_trial
    best_cfg = with_overrides(cfg, {**best.params, "output_dir": str(Path(cfg.output_dir) / "best")})
    save_config(best_cfg, sweep_dir / "best.yaml")
    print(f"\nbest: trial {best.number}, {metric} = {best.value:.4f}; reproduce with: sftkit train {sweep_dir / 'best.yaml'}")
    _plots(study, sweep_dir)


def _plots(study, sweep_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")

    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ov

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        for name, fn in (("history", ov.plot_optimization_history), ("importance", ov.plot_param_importances)):
            try:
                ax = fn(study)
                ax.figure.tight_layout()
                ax.figure.savefig(sweep_dir / f"{name}.png", dpi=110)
                plt.close(ax.figure)
            except (ValueError, RuntimeError) as e:  # importance needs 2+ completed trials that differ
                log(f"{name}.png not drawn: {e}")
