"""The engine off the happy path: tied weights, early stopping without checkpoints, full disks,
--overwrite of what is not a run, damaged checkpoints and logs on --resume."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sftkit import checkpoint
from sftkit.config import ConfigError, load_config
from sftkit.trainer import TrainingError, train

from ..conftest import write_jsonl
from .test_engine import cfg_dict, losses

pytestmark = pytest.mark.slow  # end to end on a real tiny model: `pytest -m 'not slow'` leaves it out


def test_full_fine_tuning_of_a_tied_model_checkpoints_and_resumes_bitwise(tmp_path, tiny_model_dir, chat_rows):
    """The tiny Llama ties lm_head to the input embeddings, as SmolLM2 does."""
    base = cfg_dict(tmp_path, tiny_model_dir, chat_rows, "ref", **{
        "peft.method": "full", "train.schedule": "constant", "train.save_every": 2, "train.batch_size": 4,
        "eval.reference": None})
    ref = train(load_config(None, {**base, "train.max_steps": 6}))
    run = {**base, "output_dir": str(tmp_path / "run")}
    train(load_config(None, {**run, "train.max_steps": 3}))  # "interrupted" after step 3, checkpoint at 2
    ckpt = checkpoint.complete_checkpoints(tmp_path / "run")[-1]
    saved = load_file(str(ckpt / "trainable.safetensors"))
    assert "model.embed_tokens.weight" in saved and "lm_head.weight" not in saved  # tied: stored once
    r = train(load_config(None, {**run, "train.max_steps": 6}), resume=True)
    assert losses(r.run_dir) == losses(ref.run_dir)  # bitwise, step for step
    final = r.model
    assert final.lm_head.weight.data_ptr() == final.model.embed_tokens.weight.data_ptr()  # still tied
    assert torch.equal(final.lm_head.weight, ref.model.lm_head.weight)


def test_freeze_with_the_tied_head_checkpoints(tmp_path, tiny_model_dir, chat_rows):
    cfg = load_config(None, cfg_dict(tmp_path, tiny_model_dir, chat_rows, "fz", **{
        "peft.method": "freeze", "peft.trainable": ["lm_head"], "train.max_steps": 3, "train.save_every": 1,
        "eval.reference": None}))
    r = train(cfg)
    assert [p.name for p in checkpoint.complete_checkpoints(r.run_dir)] == ["step-0000001", "step-0000002"]
    assert not list((r.run_dir / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize("save_every,keep", [(0, 2), (2, 0)])
def test_early_stopping_without_a_best_checkpoint_ends_with_the_best_weights(
        tmp_path, tiny_model_dir, chat_rows, save_every, keep):
    write_jsonl(tmp_path / "eval.jsonl", chat_rows[:3])
    base = cfg_dict(tmp_path, tiny_model_dir, chat_rows, "es", **{
        "data.eval": str(tmp_path / "eval.jsonl"), "train.eval_every": 1, "train.patience": 2,
        "train.min_delta": 100.0, "train.max_steps": 20, "train.schedule": "constant",
        "train.save_every": save_every, "train.keep": keep, "eval.reference": None})
    r = train(load_config(None, base))
    assert r.stopped == "early stopping" and r.steps == 3
    summary = json.loads((r.run_dir / "summary.json").read_text())
    assert summary["best_step"] == 1 and summary["final_weights"] == "best (step 1)"
    one = train(load_config(None, {**base, "train.max_steps": 1, "train.patience": 0, "output_dir": str(tmp_path / "one")}))
    a = load_file(str(r.run_dir / "final" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(one.run_dir / "final" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the weights after step 1


# -- full disks -------------------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A real, small file system (tmpfs); skipped where this process may not mount one."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_disk_that_fills_during_training_gives_one_line_and_resume_works(tmp_path, small_fs, tiny_model_dir, chat_rows):
    write_jsonl(tmp_path / "eval.jsonl", chat_rows[:2])
    d = cfg_dict(tmp_path, tiny_model_dir, chat_rows, "x", **{
        "output_dir": str(small_fs / "run"), "train.max_steps": 6, "train.save_every": 2, "train.keep": 5,
        "data.eval": str(tmp_path / "eval.jsonl"), "train.eval_every": 1, "eval.reference": None})
    filler = small_fs / "filler"

    def fill_disk(step, record):  # another program takes the space left, after the first checkpoint
        if step == 3:
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 2**20)
                except OSError:
                    pass

    with pytest.raises(TrainingError) as e:
        train(load_config(None, d), on_eval=fill_disk)
    msg = str(e.value)
    assert "\n" not in msg and "no space left on device" in msg and "step-0000002 is intact" in msg, msg
    run = small_fs / "run"
    assert checkpoint.complete_checkpoints(run)[-1].name == "step-0000002"
    assert checkpoint.problem(run / "checkpoints" / "step-0000002") is None
    assert not list((run / "checkpoints").glob("*.tmp"))  # the half-written one gave its space back
    filler.unlink()
    r = train(load_config(None, d), resume=True)
    assert r.steps == 6 and (run / "final" / "model" / "config.json").is_file()


def test_full_disk_errors_of_each_writer_are_recognised(tmp_path, small_fs):
    from safetensors.torch import save_file

    with open(small_fs / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 2**20)
        except OSError:
            pass
    big = {"a": torch.zeros(200_000)}
    for write in (lambda: torch.save(big, small_fs / "a.pt"), lambda: save_file(big, str(small_fs / "b.st")),
                  lambda: (small_fs / "c.json").write_text("x" * 10**6)):
        with pytest.raises(Exception) as e:
            write()
        assert checkpoint.write_failure(e.value, small_fs).startswith("no space left on device")


# -- --overwrite ------------------------------------------------------------------------------------
def test_overwrite_replaces_only_a_run(tmp_path, tiny_model_dir, chat_rows, monkeypatch):
    d = cfg_dict(tmp_path, tiny_model_dir, chat_rows, "r", **{"train.max_steps": 1, "eval.reference": None})
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match=r"--overwrite: output_dir .*project holds thesis.tex, which is not an sftkit run"):
        train(load_config(None, {**d, "output_dir": str(precious)}), overwrite=True)
    assert (precious / "thesis.tex").read_text() == "years of work"
    monkeypatch.chdir(precious)
    with pytest.raises(ConfigError, match=r"output_dir \. is the current directory; nothing was deleted"):
        train(load_config(None, {**d, "output_dir": "."}), overwrite=True)
    with pytest.raises(ConfigError, match="is the home directory"):
        train(load_config(None, {**d, "output_dir": str(Path.home())}), overwrite=True)
    assert (precious / "thesis.tex").exists()
    r = train(load_config(None, d))
    (r.run_dir / "extra.txt").write_text("left by the run's owner")
    train(load_config(None, d), overwrite=True)  # a run is replaced
    assert not (r.run_dir / "extra.txt").exists()


# -- resume edge cases --------------------------------------------------------------------------
def test_resume_with_the_reference_text_switched_on_measures_the_base(tmp_path, tiny_model_dir, chat_rows):
    d = cfg_dict(tmp_path, tiny_model_dir, chat_rows, "ref", **{"train.save_every": 2, "train.max_steps": 3,
                                                                "eval.reference": None})
    train(load_config(None, d))
    r = train(load_config(None, {**d, "train.max_steps": 4, "eval.reference": "builtin"}), resume=True)
    summary = json.loads((r.run_dir / "summary.json").read_text())
    assert summary["base_ref_ppl"] > 1 and r.forgetting is not None and abs(r.forgetting) < 1


def test_resume_after_a_torn_metrics_line(tmp_path, tiny_model_dir, chat_rows):
    d = cfg_dict(tmp_path, tiny_model_dir, chat_rows, "torn", **{"train.save_every": 2, "train.max_steps": 3,
                                                                 "train.schedule": "constant", "eval.reference": None})
    train(load_config(None, d))
    m = tmp_path / "torn" / "metrics.jsonl"
    m.write_text(m.read_text() + '{"step": 4, "lo')  # kill -9 in the middle of a write
    r = train(load_config(None, {**d, "train.max_steps": 5}), resume=True)
    assert [json.loads(line)["step"] for line in m.read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert r.steps == 5


@pytest.mark.parametrize("damage", ["meta.json", "trainable.safetensors", "state.pt"])
def test_resume_passes_over_a_damaged_latest_checkpoint(tmp_path, tiny_model_dir, chat_rows, damage, capsys):
    d = cfg_dict(tmp_path, tiny_model_dir, chat_rows, "dmg", **{"train.save_every": 1, "train.max_steps": 3,
                                                                "train.keep": 3, "eval.reference": None})
    train(load_config(None, d))
    latest = checkpoint.complete_checkpoints(tmp_path / "dmg")[-1]
    f = latest / damage
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])  # torn by a crash of the disk, say
    r = train(load_config(None, {**d, "train.max_steps": 4}), resume=True)
    err = capsys.readouterr().err
    assert f"checkpoint {latest.name} is damaged ({f}" in err and "resuming from" in err and "step-0000001" in err
    assert r.steps == 4
    for p in checkpoint.complete_checkpoints(tmp_path / "dmg"):
        (p / "trainable.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"--resume: no checkpoint in .* reads back whole"):
        train(load_config(None, d), resume=True)


def test_max_length_is_capped_at_the_models_positions(tmp_path, tiny_model_dir, chat_rows, capsys):
    """The tiny Llama has 512 positions; a row of ~800 tokens follows data.truncation within them."""
    rows = chat_rows + [{"prompt": "Summarise: " + "word " * 60, "completion": "long " * 800}]
    r = train(load_config(None, cfg_dict(tmp_path, tiny_model_dir, rows, "cap", **{
        "data.max_length": 4096, "train.max_steps": 2, "train.batch_size": 13, "eval.reference": None})))
    err = capsys.readouterr().err
    assert "data.max_length=4096 is more than" in err and "(512 positions): using 512" in err
    assert "1 truncated" in err and r.steps == 2


def test_a_logger_whose_package_is_missing_stops_before_the_model_loads(tmp_path, tiny_model_dir, chat_rows,
                                                                       monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    with pytest.raises(ConfigError, match="log.tensorboard=true needs the tensorboard package: pip install tensorboard"):
        train(load_config(None, cfg_dict(tmp_path, tiny_model_dir, chat_rows, "tb", **{"log.tensorboard": True})))
    assert "loading model" not in capsys.readouterr().err


def test_resume_after_max_length_was_capped(tmp_path, tiny_model_dir, chat_rows):
    """The capped data.max_length is an adjustment, not a change: --resume with the same config works."""
    d = cfg_dict(tmp_path, tiny_model_dir, chat_rows, "capres", **{
        "data.max_length": 4096, "train.save_every": 1, "train.max_steps": 2, "eval.reference": None})
    train(load_config(None, d))
    r = train(load_config(None, {**d, "train.max_steps": 3}), resume=True)
    assert r.steps == 3


def test_ctrl_c_swallowed_while_loading_still_stops_before_the_first_step(tmp_path, tiny_model_dir, monkeypatch):
    """Python drops a KeyboardInterrupt raised inside a finalizer ("Exception ignored"); the run must not
    then train as if nothing happened."""
    import os
    import signal

    from sftkit.tasks import sft

    real = sft.prepare

    def prepare_that_swallows(cfg, run, **kw):
        try:  # what a finalizer running at the wrong moment does to the default handler's exception
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
        except KeyboardInterrupt:
            pass
        return real(cfg, run, **kw)

    monkeypatch.setattr(sft, "prepare", prepare_that_swallows)
    data = tmp_path / "t.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 4)
    cfg = load_config(None, {"model.name": str(tiny_model_dir), "data.train": str(data), "train.max_steps": 3,
                             "output_dir": str(tmp_path / "run")})
    # The handler a terminal gives; a job started in the background by a non-interactive shell (nohup ... &)
    # starts with SIGINT ignored instead, and the trainer rightly puts that back.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
        restored = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, outer)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or (tmp_path / "run" / "metrics.jsonl").read_text() == ""
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "stopped"
    assert restored is signal.default_int_handler  # the handler is put back
