"""Typed run configuration: YAML file + `section.key=value` overrides.

Every field is documented on its line. Values are checked for type here; whether a value makes
sense is checked where it is used, so the message can say what it is used for.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config problem the user can fix; the message says which key and how."""


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # alias (see `sftkit models`), local HF model directory, or hub id
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16; auto = bf16 where the hardware has it, else fp32
    revision: str | None = None  # hub revision (branch, tag or commit) for hub ids


@dataclass
class DataConfig:
    train: str | list[Any] | None = None  # file, folder or hub dataset; or a list of them / {path, weight} to mix
    eval: str | dict[str, str] | None = None  # held-out data in the same format; or {name: path, ...}: named sets, each scored on its own (eval/<name>/...), selected by their mean or eval.select: NAME
    eval_fraction: float = 0.0  # without data.eval: hold out this fraction of data.train (split by train.seed)
    format: str = "auto"  # auto | text | prompt_completion | messages | sharegpt | alpaca
    columns: dict[str, str] = field(default_factory=dict)  # our field -> the data's column, e.g. {output: response}
    max_length: int = 1024  # longest sample in tokens
    pack: bool = False  # pack several examples per row (best-fit) up to max_length; they never attend to each other
    share_prefix: bool = True  # packed, on CPU: the untrained opening a pass's examples share (system message) is computed once
    truncation: str = "truncate"  # truncate (prompt from the left first, then the reply's tail; a text row is split into blocks) | drop | error
    reasoning: str = "train"  # assistant reasoning traces (reasoning_content, or <think>...</think> in content): train | mask (kept in the text, not trained) | drop
    chunk_overlap: int = 0  # a text row longer than max_length: tokens of each block repeated, untrained, at the start of the next
    mask: str = "auto"  # auto | completion | assistant | last_assistant | none (train on every token)
    template: str = "auto"  # auto = tokenizer's chat template | plain | chatml | llama-3 | alpaca | path.jinja
    system: str | None = None  # system message added to every conversation that has none
    replay: dict[str, Any] = field(default_factory=dict)  # {source: general text, ratio: 0.1}: mix general text (LM loss) into training
    rag: dict[str, Any] = field(default_factory=dict)  # {index: INDEX, k: 3, layout: system | context}: each prompt gets its top-k retrieved chunks (prompt, never trained), as `--rag` gives them at inference
    on_error: str = "error"  # error = stop at the first bad row | skip = skip bad rows and count them by reason


@dataclass
class PeftConfig:
    method: str = "lora"  # lora | qlora (4-bit NF4 base + LoRA) | full | freeze (train only peft.trainable)
    r: int = 16  # LoRA rank
    alpha: float = 32.0  # LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # LoRA dropout
    target_modules: list[str] | str = "all-linear"  # module names to adapt, or all-linear
    rslora: bool = False  # rank-stabilised LoRA scaling
    dora: bool = False  # weight-decomposed LoRA (DoRA)
    trainable: list[str] = field(default_factory=list)  # freeze: last:N (decoder layers), lm_head, embeddings, or name globs


@dataclass
class DistillConfig:
    teacher: str | None = None  # the teacher model (alias, directory or a run's final/model); unset = no distillation
    weight: float = 0.5  # loss = (1 - weight) * NLL + weight * divergence, on trained tokens
    temperature: float = 1.0  # both distributions are softened by this before the divergence
    loss: str = "forward_kl"  # forward_kl = KL(teacher || student) | reverse_kl = KL(student || teacher) | jsd
    top_k: int = 0  # the teacher's top-k log-probs only (for an offline cache); 0 = the whole vocabulary


@dataclass
class TrainConfig:
    lr: float = 2e-4  # peak learning rate
    batch_size: int = 8  # samples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = -1  # optimizer steps; -1 = as many as `epochs` gives
    epochs: float = 1.0  # passes over the training data when max_steps is -1
    seed: int = 42  # seeds data order, LoRA init and dropout
    schedule: str = "cosine"  # cosine | linear | constant, after the warmup
    warmup_steps: int = 0  # linear warmup steps
    warmup_ratio: float = 0.0  # warmup as a fraction of all steps (used when warmup_steps is 0)
    min_lr_ratio: float = 0.0  # cosine and linear decay to lr * min_lr_ratio
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping norm; 0 disables clipping
    eval_every: int = 0  # optimizer steps between eval-loss passes; 0 = only at the end
    save_every: int = 0  # optimizer steps between checkpoints; 0 = none (no resume possible)
    keep: int = 2  # checkpoints kept: the last `keep` plus the best by eval loss
    patience: int = 0  # early stopping: evals without improvement before stopping; 0 = off
    min_delta: float = 0.0  # early stopping: smallest eval-loss drop that counts as improvement
    max_bad_steps: int = 3  # consecutive non-finite steps (skipped) before the run stops
    max_forward_tokens: int = -1  # split micro-batches into passes of at most this many (padded) tokens: same result, less memory; -1 = auto (512 on CPU, 16384 on GPU), 0 = no split
    group_by_length: bool = True  # unpacked batches: put examples of similar length together so little is padded
    kl_to_base: float = 0.0  # forgetting guard: add this times KL(base || tuned) on trained tokens; 0 = off
    checkpointing: bool = False  # gradient checkpointing: less memory, about a third more compute
    neftune_alpha: float = 0.0  # NEFTune (task: sft): uniform noise of alpha / sqrt(length x hidden) on the input embeddings, in training only; 0 = off (the paper tried 5-15)
    distill: DistillConfig = field(default_factory=DistillConfig)  # learn the teacher's next-token distributions


@dataclass
class EvalConfig:
    generate: bool = False  # after training, generate on data.eval and score against the references
    metric: str = "exact_match"  # exact_match (normalised) | token_f1
    compare_base: bool = True  # score the untuned model the same way, before training
    max_new_tokens: int = 64  # generation length limit
    batch_size: int = 16  # prompts per generation batch
    limit: int = 0  # score only the first N eval rows; 0 = all
    select: str = "eval_loss"  # what picks the best eval and drives early stopping: eval_loss | eval_accuracy | a generation metric (exact_match, token_f1, module:function; needs eval.generate, scored at every eval); with named eval sets the mean over them, or NAME (its eval_loss) or NAME/METRIC
    reference: str | None = "builtin"  # general text whose perplexity measures forgetting; builtin = bundled public-domain passages; null = off


@dataclass
class ClassifyConfig:
    class_weights: str | list[float] | None = None  # none | auto (inverse class frequency) | one weight per label
    metric: str = "macro_f1"  # macro_f1 | eval_loss: picks the best eval (final model) and drives early stopping
    pooling: str = "auto"  # auto (mean for sentence encoders trained so, else model) | model (the class's own) | mean


@dataclass
class RLConfig:
    loss: str = "grpo"  # grpo | dr_grpo | dapo | rloo (docs/rl.md: the normalisation of each, as TRL's loss_type)
    rewards: list[Any] = field(default_factory=list)  # [{function: number_match | module:name, weight: 1.0}, {model: REWARD_RUN}]
    num_generations: int = 8  # completions per prompt (the group whose rewards are compared)
    temperature: float = 1.0  # sampling temperature (the trained log-probs are of logits / temperature, as sampled)
    top_p: float = 1.0  # nucleus sampling
    max_new_tokens: int = 256  # longest completion
    epsilon: float = 0.2  # clip range below 1 (and above, unless epsilon_high)
    epsilon_high: float | None = None  # clip range above 1 (DAPO's clip-higher); unset = epsilon
    num_iterations: int = 1  # optimizer steps on each generation batch (> 1: the old policy's log-probs kept)
    beta: float = 0.0  # KL to the reference (k3); 0 as DAPO, Dr GRPO and TRL since 0.19: no reference pass needed
    scale_rewards: str = "group"  # group | batch | none: divide advantages by the group's (or batch's) reward std
    mask_truncated: bool = False  # completions that hit max_new_tokens without ending get no loss
    reference: str | None = None  # beta > 0: the reference model; unset = the starting model (LoRA: adapter off)
    pass_at: float = 1.0  # held out: a greedy reply passes when its weighted reward is at least this


@dataclass
class PreferenceConfig:
    loss: str = "dpo"  # dpo (sigmoid) | ipo | simpo | orpo (simpo and orpo need no reference model)
    beta: float = 0.1  # strength of the preference (dpo, ipo, simpo); orpo: weight of the odds-ratio term
    reference: str | None = None  # the reference model (dpo, ipo): unset = the starting model; or a model name / run's final/model
    sft_weight: float | None = None  # adds this times the chosen reply's NLL per token (RPO); unset = 1 for orpo, else 0
    label_smoothing: float = 0.0  # dpo only: the share of pairs taken to be mislabelled (conservative DPO)
    precompute_reference: bool = False  # compute the reference log-probs once before training: one model pass per step
    simpo_gamma: float = 0.5  # simpo: the target reward margin


@dataclass
class RewardConfig:
    objective: str = "pairs"  # data.train a review file (reviews.jsonl): pairs = Bradley-Terry over every ordered pair of each judgement, margins from grade differences | grades = regression of the reward on each reply's overall grade


@dataclass
class LogConfig:
    tensorboard: bool = False  # also write TensorBoard event files to <output_dir>/tensorboard
    mlflow: str | None = None  # MLflow tracking URI, e.g. sqlite:///mlflow.db; unset = no MLflow


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    task: str = "sft"  # sft (generate text) | classification (text + label rows) | preference (chosen/rejected pairs: DPO...) | reward (a reward model on the same pairs) | rl (generate, score, update: GRPO, RLOO)
    output_dir: str = "runs/default"  # run directory: config, metrics, checkpoints, final model

    def __post_init__(self) -> None:
        # The dotted keys a config file or an override set (not a field: never saved). A task picks its
        # own defaults for keys the user left alone (a classifier's head trains at another rate than SFT).
        self.given: set[str] = set()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """All dotted keys of a config class, e.g. `train.lr`."""
    keys = []
    for f in dataclasses.fields(cls):
        sub = _dataclass_type(f)
        if sub is not None:
            keys += valid_keys(sub, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _dataclass_type(f: dataclasses.Field) -> type | None:
    factory = f.default_factory
    return factory if isinstance(factory, type) and dataclasses.is_dataclass(factory) else None


_SECTIONS = {f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.type) or f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)}
_SUBSECTIONS = {"train.distill"}  # sections inside a section, written nested in YAML
# Keys that may change between a checkpoint and --resume: they do not alter the steps already taken.
RESUME_SAFE = {"train.max_steps", "train.epochs", "train.eval_every", "train.save_every",
               "train.keep", "train.patience", "train.min_delta", "train.max_bad_steps", "output_dir"}
RESUME_SAFE_SECTIONS = ("eval.", "log.")


def resume_conflicts(saved: dict[str, Any], current: Config) -> list[str]:
    """Keys whose change would make a resumed run differ from the run that wrote the checkpoint."""
    now = flatten_all(current.to_dict())
    before = flatten_all(saved)
    return [k for k in sorted(set(now) | set(before))
            if now.get(k) != before.get(k) and k not in RESUME_SAFE and not k.startswith(RESUME_SAFE_SECTIONS)]


def flatten_all(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and ((not prefix and k in _SECTIONS) or prefix + k in _SUBSECTIONS):
            out.update(flatten_all(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# Names users bring from other tools, mapped to ours, so the suggestion is the right key.
_PEER_NAMES = {
    "learning_rate": "lr", "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "max_seq_length": "max_length", "sequence_len": "max_length", "cutoff_len": "max_length",
    "eval_steps": "eval_every", "save_steps": "save_every",
    "warmup": "warmup_steps", "output": "output_dir", "model_name": "name",
}


def _unknown_key(key: str) -> ConfigError:
    section, _, last = key.rpartition(".")
    peer = _PEER_NAMES.get(last) or next((_PEER_NAMES[p] for p in difflib.get_close_matches(last, list(_PEER_NAMES),
                                                                                             n=1, cutoff=0.85)), None)
    if peer:  # another tool's name for one of ours: that key alone (in the section given, when it has one)
        close = [k for k in valid_keys() if k.rsplit(".", 1)[-1] == peer]
        close = [k for k in close if k.startswith(section + ".")] or close
    else:
        close = difflib.get_close_matches(key, valid_keys(), n=3, cutoff=0.5)
    if not close:  # a misspelt section still deserves a hint: match on the last part alone
        close = [k for k in valid_keys() if difflib.get_close_matches(last, [k.rsplit(".", 1)[-1]], cutoff=0.75)]
    hint = f"; did you mean {' or '.join(repr(c) for c in close[:3])}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (`sftkit config-keys` lists them all)")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the field's annotation; accept the obvious conversions."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(key, value, opt)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{key}: bad value {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, value_type = typing.get_args(hint)
        return {str(k): (v if value_type is Any else str(v)) for k, v in value.items()}
    if hint is Any:
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if hint is float:
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept it as the number it obviously is.
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _set(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(obj)}
        if part not in names:
            raise _unknown_key(key)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, part)):
                raise ConfigError(f"{key} is a section; set one of its keys, e.g. {key}.{dataclasses.fields(getattr(obj, part))[0].name}")
            setattr(obj, part, _coerce(key, value, _hints(type(obj))[part]))
            cfg.given.add(key)
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise _unknown_key(key)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-4", "peft.r=32"]` -> {"train.lr": 1e-4, "peft.r": 32} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read a YAML config (optional) and apply overrides. Unknown keys fail before any work."""
    cfg = Config()
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (model:, data:, ...)")
        values.update(flatten_all(raw))
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    values.update(overrides or {})
    for key, value in values.items():
        _set(cfg, key, value)
    return cfg


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A copy of `cfg` with dotted keys set (checked like any override)."""
    out = copy.deepcopy(cfg)
    for key, value in overrides.items():
        _set(out, key, value)
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
