"""One test per private or experimental library API sftkit uses (all in sftkit/compat.py): each fails
with a message naming the compat function to update when a release changes what it relies on."""

import inspect

import pytest
import torch

from sftkit import compat

from ..conftest import make_tiny_llama


def changed(fn, lib: str, what: str) -> str:
    return f"{lib} changed {what}: update sftkit.compat.{fn.__name__} (checked against {lib} {compat.CHECKED[lib]})"


def test_sdpa_attention_forward(tokenizer):
    fn = compat.sdpa_attention_forward()
    params = list(inspect.signature(fn).parameters)
    assert params[:5] == ["module", "query", "key", "value", "attention_mask"], \
        changed(compat.sdpa_attention_forward, "transformers", "sdpa_attention_forward's signature")


def test_register_attention_and_attention_implementation(tokenizer):
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    model = make_tiny_llama(tokenizer).eval()
    assert compat.attention_implementation(model) == "sdpa", \
        changed(compat.attention_implementation, "transformers", "where the attention implementation is kept")
    ids = torch.tensor([[1, 200, 300, 400, 2]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    compat.register_attention("sftkit_test_sdpa", compat.sdpa_attention_forward())
    assert "sftkit_test_sdpa" in AttentionInterface._global_mapping and \
        "sftkit_test_sdpa" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, \
        changed(compat.register_attention, "transformers", "the attention or mask registries")
    model.set_attn_implementation("sftkit_test_sdpa")
    assert compat.attention_implementation(model) == "sftkit_test_sdpa"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref)


def test_clear_quantization_flags_on_a_model_read_from_gguf(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from sftkit.export import write_gguf

    write_gguf(make_tiny_llama(tokenizer), tokenizer, tmp_path / "m.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert getattr(model, "is_quantized", None) is True or getattr(model, "hf_quantizer", None) is not None or \
        hasattr(model.config, "quantization_config"), \
        changed(compat.clear_quantization_flags, "transformers", "how a GGUF-loaded model is flagged")
    compat.clear_quantization_flags(model)
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in (tmp_path / "saved" / "config.json").read_text(), \
        changed(compat.clear_quantization_flags, "transformers", "the flags save_pretrained reads")
    AutoModelForCausalLM.from_pretrained(tmp_path / "saved")  # loads without the .gguf file


def test_register_lora_layer(tokenizer):
    from peft import LoraConfig, get_peft_model

    from sftkit.lora import FusedLoraLinear, use_fused_lora

    config = LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")
    assert hasattr(config, "_register_custom_module"), \
        changed(compat.register_lora_layer, "peft", "LoraConfig._register_custom_module")
    use_fused_lora(config)
    model = get_peft_model(make_tiny_llama(tokenizer), config)
    assert any(isinstance(m, FusedLoraLinear) for m in model.modules()), \
        changed(compat.register_lora_layer, "peft", "how custom LoRA layers are dispatched")


def test_cache_argument_is_one_forward_takes_without_a_warning(tokenizer):
    import warnings

    from transformers import DynamicCache

    from sftkit.compat import cache_argument

    model = make_tiny_llama(tokenizer)
    name = cache_argument(model)
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated name warns: fail here, naming it
        model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, **{name: cache})
    assert cache.get_seq_length() == 3, f"compat.cache_argument: transformers no longer fills a cache passed as {name!r}"


def test_wrapper_prefixes():
    from torch.distributed.algorithms._checkpoint import checkpoint_wrapper
    from torch.distributed.fsdp import _common_utils

    assert f"{_common_utils.FSDP_WRAPPED_MODULE}." in compat.WRAPPER_PREFIXES, \
        changed(compat.unwrapped_name, "torch", "FSDP's wrapped-module prefix")
    assert f"{checkpoint_wrapper._CHECKPOINT_WRAPPED_MODULE}." in compat.WRAPPER_PREFIXES, \
        changed(compat.unwrapped_name, "torch", "the checkpoint wrapper's prefix")
    assert compat.unwrapped_name("module._fsdp_wrapped_module.model.layers.0.weight") == "model.layers.0.weight"


def test_optuna_trial_state_and_attr():
    import optuna
    from optuna.trial import TrialState

    study = optuna.create_study()
    study.ask()  # a trial left running, as by a killed sweep
    (t,) = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    compat.set_trial_attr(study, t, "reason", "interrupted")
    compat.set_trial_state(study, t, TrialState.FAIL)
    (t,) = study.get_trials()
    assert t.state == TrialState.FAIL and t.user_attrs["reason"] == "interrupted", \
        changed(compat.set_trial_state, "optuna", "study._storage / trial._trial_id")


def test_bitsandbytes_layers_repack_only_in_eval_mode():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 64)
    assert compat.is_bitsandbytes_layer(layer) and not compat.is_bitsandbytes_layer(torch.nn.Linear(2, 2))
    source = inspect.getsource(bnb.nn.Linear4bit.forward)
    assert "not self.training" in source and "_convert_weight_packed_for_cpu" in source, \
        changed(compat.is_bitsandbytes_layer, "bitsandbytes", "when Linear4bit repacks its weights")
