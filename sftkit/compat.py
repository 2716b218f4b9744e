"""Every use of a library's private or experimental API, behind one door.

Nothing else in sftkit touches these internals. Each function says what it relies on; each has a
test in tests/unit/test_compat.py that fails with a message naming the function and the library
when a release changes what it relies on. Checked against (the versions `make` installs):

    transformers 5.24.0, peft 0.21.2, torch 2.13.0, optuna 5.0.0, bitsandbytes 0.50.2
"""

from __future__ import annotations

import torch

CHECKED = {"transformers": "5.24.0", "peft": "0.21.2", "torch": "2.13.0", "optuna": "5.0.0", "bitsandbytes": "0.50.2"}


# -- transformers ------------------------------------------------------------------------------------
def sdpa_attention_forward():
    """transformers' own SDPA attention function (integrations.sdpa_attention, not exported at the top)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward as fn

    return fn


def register_attention(name: str, forward) -> None:
    """Register an attention implementation under `name`, with transformers' SDPA mask builder for it
    (masking_utils.ALL_MASK_ATTENTION_FUNCTIONS and sdpa_mask are internals of transformers 5)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)


def attention_implementation(model) -> str | None:
    """The attention a model runs with (config._attn_implementation: private, no public getter)."""
    return getattr(model.config, "_attn_implementation", None)


def clear_quantization_flags(model) -> None:
    """A model loaded from a GGUF file is de-quantized to real tensors but still flagged as quantized
    (is_quantized, quantization_method, hf_quantizer and config.quantization_config); without clearing
    them, save_pretrained records a GGUF quantization and later loads look for the .gguf file."""
    model.is_quantized = False
    model.quantization_method = None
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def cache_argument(model) -> str:
    """The name generate() and forward() take a KV cache under: `cache` in transformers 5.24 (where
    `past_key_values` is deprecated, with a warning on every call), `past_key_values` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


# -- peft ------------------------------------------------------------------------------------------
def register_lora_layer(lora_config, base_type: type, dispatch) -> None:
    """Have peft build LoRA layers for `base_type` through `dispatch` (LoraConfig._register_custom_module,
    marked experimental by peft)."""
    lora_config._register_custom_module({base_type: dispatch})


# -- torch -----------------------------------------------------------------------------------------
# Names torch's wrappers insert into parameter names: FSDP1's flat wrapper, activation checkpointing's
# wrapper, DDP's `module.`.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrapped_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name.removeprefix("module.")


# -- optuna ----------------------------------------------------------------------------------------
def set_trial_state(study, trial, state) -> None:
    """Mark a trial of a loaded study finished in a given state (study._storage, trial._trial_id: optuna
    has no public call to end a trial another process left running)."""
    study._storage.set_trial_state_values(trial._trial_id, state)


def set_trial_attr(study, trial, key: str, value) -> None:
    """Set a user attribute on a FrozenTrial of a loaded study (same private storage)."""
    study._storage.set_trial_user_attr(trial._trial_id, key, value)


# -- bitsandbytes ----------------------------------------------------------------------------------
def is_bitsandbytes_layer(module: torch.nn.Module) -> bool:
    """bitsandbytes' own layers (Linear4bit, ...). Their eval-mode forward without gradients repacks the
    4-bit weights into a CPU layout on the first call (Linear4bit.forward in 0.50), which sftkit avoids
    in its probes by keeping them in training mode."""
    return type(module).__module__.startswith("bitsandbytes")
