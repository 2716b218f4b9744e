"""Shared fixtures: the real SmolLM2 tokenizer and tiny random-weight Llama models built from a config."""

from __future__ import annotations

import json
import os
from pathlib import Path

# No hub at test time: a model or data set name that is not local fails at once instead of waiting on
# the network (set before transformers and huggingface_hub read it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sftkit.models import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("smollm2-135m")


def make_tiny_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).float()


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory) -> Path:
    """A tiny Llama with the SmolLM2 tokenizer and chat template, saved as a local model directory."""
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(tokenizer).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture
def chat_rows() -> list[dict]:
    """Twelve short chats, a few multi-turn, all memorisable."""
    rows = []
    for i in range(12):
        msgs = [{"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]
        if i % 3 == 0:
            msgs += [{"role": "user", "content": "And doubled?"},
                     {"role": "assistant", "content": f"Doubled it is {4 * i}."}]
        rows.append({"messages": msgs})
    return rows
