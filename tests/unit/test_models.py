"""Model resolution: aliases, local directories, hub ids without network."""

import pytest

from sftkit.cli import main
from sftkit.config import ConfigError
from sftkit.models import load_model, resolve


def test_models_command_lists_aliases(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "minilm-l6" in out


def test_config_keys_command_lists_every_key(capsys):
    assert main(["config-keys"]) == 0
    out = capsys.readouterr().out
    for key in ("model.name", "data.train", "peft.method", "train.lr", "train.max_steps", "output_dir"):
        assert f"{key} = " in out


def test_directory_without_config_is_named(tmp_path):
    with pytest.raises(ConfigError, match="holds no config.json"):
        resolve(str(tmp_path))


def test_hub_id_without_network_gives_a_clear_message(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"could not load model 'some-org/not-a-model'.*Without network"):
        load_model("some-org/not-a-model")


def test_a_mistyped_local_path_is_never_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo" / "final" / "model").mkdir(parents=True)
    for name, near in (("runs/dmo", "runs/demo"), ("runs/demo/final/modl", "runs/demo/final/model"),
                       ("./runs/demo/final/mdel", "runs/demo/final/model")):
        with pytest.raises(ConfigError, match=rf"no such directory .*did you mean '.*{near}'"):
            resolve(name)
    with pytest.raises(ConfigError, match="no such directory"):
        resolve(str(tmp_path / "elsewhere" / "model"))
    assert resolve("some-org/some-model") == "some-org/some-model"  # a hub id stays one


@pytest.mark.parametrize("name,alias", [("smollm2-135", "smollm2-135m"), ("SmolLM2-135M", "smollm2-135m"),
                                        ("minilm-l", "minilm-l6")])
def test_a_near_miss_alias_gets_a_did_you_mean(name, alias):
    with pytest.raises(ConfigError, match=rf"did you mean '{alias}'"):
        resolve(name)


def test_loading_a_model_prints_no_library_noise(tiny_model_dir):
    """No "Loading weights" bar per load, no bitsandbytes notice about an optional kernel package."""
    import subprocess
    import sys

    code = ("import sys\nfrom sftkit.models import load_model\nload_model(sys.argv[1])\n"
            "from sftkit.models import apply_method\n")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Loading weights" not in out.stderr and "kernels" not in out.stderr, out.stderr
