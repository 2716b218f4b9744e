"""The run directory's layout: its marker, what counts as a run, the overwrite refusal, and where a
run keeps its final model. No torch: the dashboard reads runs through this too.

    runs/NAME/
      .sftkit-run      the marker: --overwrite may replace this folder, and nothing that lacks it
      config.yaml  metrics.jsonl  status.json  summary.json  report.md  plots/
      step-NNNNNNN/    checkpoints (sftkit.checkpoint)
      final/model/     the final model, loadable by plain transformers
      final/adapter/   LoRA: the adapter as peft saves it
"""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

from .config import ConfigError

# Written into every run directory: --overwrite replaces only a folder that holds this marker (or
# a run from before the marker: config.yaml and metrics.jsonl), never anything else.
RUN_MARKER = ".sftkit-run"

# What a run directory holds before its first step (a run that stopped on bad data): taken again freely.
NOT_YET_A_RUN = (RUN_MARKER, "config.yaml", "status.json")


def is_run_dir(path: Path) -> bool:
    path = Path(path)
    return (path / RUN_MARKER).is_file() or ((path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file())


def final_model_dir(run_dir: str | Path) -> Path:
    """Where a run keeps its final model."""
    return Path(run_dir) / "final" / "model"


def final_model(name: str | Path) -> str:
    """A model name or directory as given; a run directory stands for its final/model."""
    return str(final_model_dir(name)) if final_model_dir(name).is_dir() else str(name)


def overwrite_refusal(out: Path) -> str | None:
    """Why --overwrite must not delete `out`, or None when it holds an sftkit run and nothing else."""
    real = out.resolve()
    protected = {Path("/").resolve(): "the root directory", Path.home().resolve(): "the home directory",
                 Path.cwd().resolve(): "the current directory"}
    if real in protected:
        return f"output_dir {out} is {protected[real]}"
    if not is_run_dir(out):
        found = sorted(p.name for p in out.iterdir())
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        return f"output_dir {out} holds {shown}, which is not an sftkit run (no {RUN_MARKER}, config.yaml or metrics.jsonl)"
    return None


def prepare_run_dir(path: str | Path, overwrite: bool, resume: bool) -> Path:
    """A run directory that holds a run is never reused unless the user says --overwrite or --resume,
    and --overwrite deletes only a folder that holds an sftkit run."""
    out = Path(path)
    try:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output_dir {out} is not writable: it is a file, not a directory")
        if out.exists() and any(p.name not in NOT_YET_A_RUN for p in out.iterdir()) and not resume:
            if not overwrite and not is_run_dir(out):
                raise ConfigError(f"{overwrite_refusal(out)}; choose an empty or new output_dir")
            if not overwrite:
                raise ConfigError(f"output_dir {out} already holds a run; pass --resume to continue it, "
                                  "--overwrite to replace it, or choose another output_dir")
            refusal = overwrite_refusal(out)
            if refusal:
                raise ConfigError(f"--overwrite: {refusal}; nothing was deleted. Choose an output_dir of its own "
                                  "(e.g. runs/NAME)")
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_MARKER).write_text("sftkit run directory: `--overwrite` may replace this folder\n")
    except OSError as e:
        raise ConfigError(f"output_dir {out} is not writable: {e.strerror or e}") from None
    return out


# -- a path the user typed ----------------------------------------------------------------------
def looks_like_path(name: str) -> bool:
    """A name that cannot be a hub id (owner/name): it starts like a path, has more than one '/', or its
    first part is a folder here (`runs/demo` beside a `runs` folder). Such a name is never sent to the hub."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/"):
        return True
    return "/" in name and Path(name.split("/", 1)[0]).expanduser().is_dir()


def near_path(p: Path) -> str:
    """'; did you mean X?' from the names beside where the missing path would be, or where it stops."""
    parent = p.parent
    while not parent.is_dir() and parent != parent.parent:
        p, parent = parent, parent.parent
    if not parent.is_dir():
        return ""
    names = [c.name for c in parent.iterdir() if not c.name.startswith(".")]
    close = difflib.get_close_matches(p.name, names, n=1, cutoff=0.6)
    return f" ({parent} has no {p.name!r}; did you mean {str(parent / close[0])!r}?)" if close else f" ({parent} has no {p.name!r})"


def check_file(path: str, what: str) -> None:
    """A file the command will read exists, checked before any model loads (`what` names the flag)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{what} {path}: no such file{near_path(p)}")
