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
