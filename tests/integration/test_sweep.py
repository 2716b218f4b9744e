"""`sftkit sweep` on the tiny model: best pick, grid coverage, resume after a kill, failing trials."""

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sftkit.config import ConfigError, load_config
from sftkit.sweep import load_space, sweep

from ..conftest import write_jsonl

pytestmark = pytest.mark.slow  # end to end on a real tiny model: `pytest -m 'not slow'` leaves it out

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def base(tmp_path, tiny_model_dir, chat_rows):
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows)
    held = write_jsonl(tmp_path / "eval.jsonl", chat_rows[:4])
    d = {"model": {"name": str(tiny_model_dir)}, "data": {"train": str(train), "eval": str(held), "max_length": 128},
         "peft": {"r": 4}, "train": {"max_steps": 3, "batch_size": 4, "eval_every": 1},
         "output_dir": str(tmp_path / "runs")}
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def space(tmp_path, d):
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


def rows(sweep_dir):
    return list(csv.DictReader(open(Path(sweep_dir) / "trials.csv")))


def test_sweep_picks_the_best_trial_and_writes_results(tmp_path, base):
    sp = space(tmp_path, {"train.lr": {"loguniform": [1e-4, 3e-2]}})
    out = sweep(load_config(base), sp, trials=4, sampler="random", pruner="none")
    trials = rows(out)
    assert len(trials) == 4 and all(t["state"] == "COMPLETE" for t in trials)
    best = min(trials, key=lambda t: float(t["eval_loss"]))
    best_cfg = load_config(out / "best.yaml")
    assert best_cfg.train.lr == pytest.approx(float(best["train.lr"]))
    assert (out / "history.png").is_file() and (out / "importance.png").is_file()
    assert (Path(best["run_dir"]) / "metrics.jsonl").is_file()  # an ordinary run directory


def test_grid_sweep_covers_its_grid(tmp_path, base):
    sp = space(tmp_path, {"peft.r": {"choice": [2, 4]}, "train.lr": {"choice": [1e-3, 1e-2]}})
    out = sweep(load_config(base), sp, trials=0, sampler="grid", pruner="none")
    got = {(int(t["peft.r"]), float(t["train.lr"])) for t in rows(out)}
    assert got == {(2, 1e-3), (2, 1e-2), (4, 1e-3), (4, 1e-2)}


def test_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, base):
    sp = space(tmp_path, {"peft.method": {"choice": ["lora", "nonsense"]}})
    out = sweep(load_config(base), sp, trials=0, sampler="grid", pruner="none")
    by_method = {t["peft.method"]: t for t in rows(out)}
    assert by_method["lora"]["state"] == "COMPLETE"
    assert by_method["nonsense"]["state"] == "FAIL"
    assert "peft.method: 'nonsense' is not one of" in by_method["nonsense"]["reason"]


def test_bad_space_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="'train.lr'"):
        load_space(space(tmp_path, {"train.learning_rate": {"loguniform": [1e-5, 1e-3]}}))
    with pytest.raises(ConfigError, match="expected one of"):
        load_space(space(tmp_path, {"train.lr": {"normal": [0, 1]}}))


def test_killed_sweep_continues_with_the_remaining_trials_only(tmp_path, base):
    sp = space(tmp_path, {"train.lr": {"loguniform": [1e-4, 3e-2]}})
    cmd = [sys.executable, "-m", "sftkit", "sweep", str(base), "--space", sp, "--trials", "4",
           "--sampler", "random", "--pruner", "none", "train.max_steps=20"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sweep_dir = tmp_path / "runs" / "sweep"
    t0 = time.time()
    while not (sweep_dir / "trial-002" / "metrics.jsonl").exists():  # two done, the third under way
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() - t0 < 240
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    rc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr[-2000:]
    assert "2 of 4 trials already finished" in rc.stderr
    trials = rows(sweep_dir)
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    assert len(complete) == 4
    interrupted = [t for t in trials if t["reason"].startswith("interrupted")]
    assert len(interrupted) == 1
    # The interrupted trial's parameters were run again, not lost.
    assert interrupted[0]["train.lr"] in {t["train.lr"] for t in complete}


def test_hopeless_trials_are_pruned_with_the_reason(tmp_path, base):
    # lr 1e-9 leaves the loss where it started; once two trials have finished, the median pruner
    # stops such a trial at its first eval. The random sampler's seed fixes the order of trials.
    sp = space(tmp_path, {"train.lr": {"choice": [0.05, 1e-9]}})
    out = sweep(load_config(base), sp, trials=6, sampler="random", pruner="median")
    trials = rows(out)
    pruned = [t for t in trials if t["state"] == "PRUNED"]
    assert pruned and all(float(t["train.lr"]) == 1e-9 for t in pruned)
    assert all(t["reason"].startswith("pruned at step 1: eval_loss") for t in pruned)


def test_ctrl_c_ends_the_sweep_after_the_running_trial_saves_and_the_study_continues(tmp_path, base):
    import signal

    sp = space(tmp_path, {"train.lr": {"loguniform": [1e-4, 3e-2]}})
    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "sftkit", "sweep", str(base), "--space", sp, "--trials", "2", "--sampler", "random",
           "--pruner", "none", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(cmd + ["train.max_steps=400", "train.save_every=1000"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    metrics = out / "trial-000" / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert p.poll() is None and time.time() - t0 < 120, p.stderr.read()[-2000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "sweep stopped by a signal after 0 finished trials" in err
    assert not (out / "trial-001").exists()  # no next trial started
    assert (out / "trial-000" / "checkpoints").is_dir()  # the running trial saved
    first = rows(out)
    assert [t["state"] for t in first] == ["FAIL", "WAITING"] and first[0]["reason"].startswith("interrupted")
    # The same command continues: the interrupted trial's parameters run again, and it is not counted.
    r = subprocess.run(cmd + ["train.max_steps=3"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    trials = rows(out)
    assert [t["state"] for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1]["train.lr"] == first[0]["train.lr"]
