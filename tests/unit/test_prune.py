"""`sftkit prune`: layers scored by how little they change their input; the kept ones bitwise the originals."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from sftkit.cli import main
from sftkit.prune import keep_layers, layer_similarity


def four_layers(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


def test_a_layer_that_passes_its_input_through_scores_one(tokenizer):
    model = four_layers(tokenizer)
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: output == input
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    ids = torch.randint(5, 2000, (2, 10))
    scores = layer_similarity(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    assert scores[2] == pytest.approx(1.0, abs=1e-6) and max(scores[:2] + scores[3:]) < 0.999


def test_prune_writes_a_loadable_model_whose_kept_layers_are_the_originals(tokenizer, tmp_path, capsys):
    model = four_layers(tokenizer)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.zero_()
        model.model.layers[1].self_attn.o_proj.weight.zero_()
    src = tmp_path / "src"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "pruned"
    assert main(["prune", str(src), "--keep-layers", "3", "--out", str(out)]) == 0
    info = json.loads((out / "pruning.json").read_text())
    assert info["removed"] == [1] and info["kept"] == [0, 2, 3]  # the pass-through layer goes
    assert "kept 3 of 4 layers" in capsys.readouterr().out
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    assert pruned.config.num_hidden_layers == 3
    before, after = model.state_dict(), pruned.state_dict()
    for new, old in enumerate(info["kept"]):
        for key, value in after.items():
            if key.startswith(f"model.layers.{new}."):
                assert torch.equal(value, before[key.replace(f"layers.{new}.", f"layers.{old}.", 1)]), key
    # Removing an identity layer changes nothing: same logits, and generation with a KV cache works.
    ids = torch.randint(5, 2000, (1, 8))
    with torch.no_grad():
        assert torch.allclose(pruned(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    assert pruned.generate(input_ids=ids, max_new_tokens=4, do_sample=False).shape == (1, 12)


def test_keep_layers_renumbers_for_the_cache_and_subsets_layer_types(tokenizer):
    model = four_layers(tokenizer)
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    keep_layers(model, [1, 3])
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert model.config.layer_types == ["sliding_attention", "sliding_attention"]


@pytest.mark.parametrize("keep", ["0", "4"])
def test_keep_layers_out_of_range_is_one_line(tokenizer, tmp_path, keep, capsys):
    src = tmp_path / "src"
    four_layers(tokenizer).save_pretrained(src)
    tokenizer.save_pretrained(src)
    assert main(["prune", str(src), "--keep-layers", keep, "--out", str(tmp_path / "o")]) == 2
    assert "--keep-layers must be between 1 and 3" in capsys.readouterr().err
