"""Merge a LoRA adapter into its base weights and save a Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path

from .models import load_model


def merge_adapter(base_name: str, adapter_dir: str | Path, dtype: str = "auto", revision: str | None = None):
    """Base model (full precision) + adapter -> one merged transformers model."""
    from peft import PeftModel

    base, _ = load_model(base_name, dtype, revision)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
