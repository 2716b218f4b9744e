"""Ship a tuned model: merged Hugging Face directory, GGUF file (+ Ollama Modelfile), model card.

Every export is checked by loading it back: the reloaded model's next-token logits on a few of
the run's own rendered rows are compared with the model the run produced, and the export fails
when they differ by more than the chosen type allows (EXPORT_TOLERANCE). The GGUF is written
with the `gguf` package's writer in llama.cpp's conventions and read back by transformers
(`gguf_file=`), which de-quantizes it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import torch
from huggingface_hub import HfApi
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from .config import ConfigError, load_config
from .data import read, renderer_for
from .data.pairs import read_pairs
from .data.render import TEMPLATES, build_examples
from .data.sources import ReadStats, Row
from .job import log
from .models import load_model, load_tokenizer
from .rundir import final_model_dir

# Largest absolute difference of next-token logits allowed between the run's model and its
# export, by weight type. f32 must be the same model; a merged LoRA only sums in another order.
# f16 and q8_0 round the weights; measured on SmolLM2-135M after a LoRA run (logits up to ~46,
# `benchmarks/export_check.py`, docs/benchmarks.md "Export fidelity"): f32 0, merge 3.4e-4,
# f16 0.074 (top-1 agreement 100%), q8_0 2.25 (top-1 agreement 97.6%, mean KL 0.006). The limits sit
# about 2-3x above those: they catch a broken export (a wrong permutation or tensor moves logits
# by tens), not the rounding a type implies.
EXPORT_TOLERANCE = {"f32": 1e-4, "merge": 1e-3, "f16": 0.25, "q8_0": 5.0}
GGUF_TYPES = ("f32", "f16", "q8_0")
GGUF_ARCHITECTURES = ("llama",)  # model_type -> the llama.cpp architecture of the same name


def merge_adapter(base_name: str, adapter_dir: str | Path, dtype: str = "auto", revision: str | None = None):
    """Base model (full precision) + adapter -> one merged transformers model."""
    base, _ = load_model(base_name, dtype, revision)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


# -- the GGUF file ---------------------------------------------------------------------------------
def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q and k with each head's rotary halves interleaved (transformers undoes it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor(data: np.ndarray, kind: str):
    """(array, GGML type): 1-D tensors (norms) stay f32, as llama.cpp keeps them."""
    if data.ndim == 1 or kind == "f32":
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if kind == "f16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    if data.shape[-1] % 32:  # q8_0 packs rows in blocks of 32
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    q = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(data.astype(np.float32), q), q


def _tokenizer_metadata(writer, tok) -> None:
    """Vocabulary, merges and special tokens of a byte-level BPE tokenizer (GPT-2 style)."""
    spec = json.loads(tok.backend_tokenizer.to_str()) if hasattr(tok, "backend_tokenizer") else None
    if not spec or spec.get("model", {}).get("type") != "BPE":
        raise ConfigError("--gguf: only byte-level BPE tokenizers (GPT-2 style, as SmolLM2's) are written; this "
                          "tokenizer is not one")
    vocab = tok.get_vocab()
    n = max(vocab.values()) + 1
    tokens = [""] * n
    for t, i in vocab.items():
        tokens[i] = t
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    writer.add_tokenizer_model("gpt2")
    # llama.cpp picks its pre-tokenizer regex by this name; SmolLM2's vocabulary is "smollm".
    writer.add_tokenizer_pre("smollm" if tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] else "default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(n)])  # 3 = control, 1 = normal
    merges = spec["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tok, f"{name}_token_id", None)
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)))
    writer.add_add_space_prefix(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def write_gguf(model, tok, path: Path, kind: str = "f32", name: str = "sftkit model") -> Path:
    """A llama.cpp GGUF file of a Llama-family transformers model: weights, tokenizer, chat template."""
    if kind not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type: {kind!r} is not one of {', '.join(GGUF_TYPES)}")
    c = model.config
    if c.model_type not in GGUF_ARCHITECTURES:
        raise ConfigError(f"--gguf: model type {c.model_type!r} is not supported; GGUF export supports "
                          f"{', '.join(GGUF_ARCHITECTURES)} (SmolLM2 and other Llama-family models). "
                          "Export a Hugging Face folder with --merge instead")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = getattr(c, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    _tokenizer_metadata(writer, tok)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and getattr(c, "tie_word_embeddings", False):
            continue  # tied: llama.cpp (and transformers reading GGUF) reuse token_embd
        if "rotary_emb" in hf_name:
            continue
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ConfigError(f"--gguf: no GGUF name for the tensor {hf_name} of this {c.model_type} model")
        data = t.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute_qk(data, c.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute_qk(data, c.num_key_value_heads)
        array, qtype = _tensor(data, kind)
        writer.add_tensor(target, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def load_gguf(path: Path):
    """Model and tokenizer as transformers reads a GGUF file (de-quantized to fp32)."""
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


CAUSAL_TASKS = ("sft", "preference")  # tasks whose final model is a causal LM (merge, GGUF)

# What an exported model folder holds: `--overwrite` replaces these, and refuses a folder holding anything else.
OWNED = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
         "adapter_config.json", "adapter_model.*", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja",
         "chat_template.json", "README.md", "pruning.json")


# -- checking an export ----------------------------------------------------------------------------
def probe_rows(run: Path, n: int = 4) -> list[list[int]]:
    """Token ids of a few of the run's own training rows, rendered as training rendered them (for a
    preference run: each pair's prompt and chosen reply)."""
    cfg = load_config(run / "config.yaml")
    tok_dir = final_model_dir(run)
    tok = load_tokenizer(str(tok_dir)) if (tok_dir / "tokenizer_config.json").is_file() else load_tokenizer(cfg.model.name)
    renderer = renderer_for(cfg.data, tok)
    if cfg.task == "preference":
        pairs, _ = read_pairs(cfg, ReadStats())
        rows = [Row(p.prompt + p.chosen, p.source, p.line, "prompt_completion", n_prompt=len(p.prompt))
                for p in pairs[: n * 4]]
    else:
        rows, _, _ = read(cfg.data, cfg.train.seed)
        rows = rows[: n * 4]
    exs, _ = build_examples(rows, renderer)
    return [e.input_ids[:256] for e in exs[:n]]


@torch.no_grad()
def logit_agreement(a: torch.nn.Module, b: torch.nn.Module, rows: list[list[int]]) -> tuple[float, float]:
    """(largest absolute difference of the two models' next-token logits, share of positions whose
    most likely next token is the same) over the rows' positions."""
    worst, same, n = 0.0, 0, 0
    for ids in rows:
        x = torch.tensor([ids])
        la = a(input_ids=x.to(next(a.parameters()).device)).logits.float().cpu()
        lb = b(input_ids=x.to(next(b.parameters()).device)).logits.float().cpu()
        worst = max(worst, float((la - lb).abs().max()))
        same, n = same + int((la.argmax(-1) == lb.argmax(-1)).sum()), n + len(ids)
    return worst, same / max(n, 1)


def max_logit_difference(a: torch.nn.Module, b: torch.nn.Module, rows: list[list[int]]) -> float:
    return logit_agreement(a, b, rows)[0]


def check_export(reference, exported, rows: list[list[int]], kind: str, what: str) -> float:
    diff, top1 = logit_agreement(reference, exported, rows)
    tol = EXPORT_TOLERANCE[kind]
    log(f"{what}: max |logit difference| over {sum(map(len, rows))} positions of {len(rows)} training rows "
        f"= {diff:.2e} (tolerance for {kind}: {tol:g}); same most likely token at {top1:.1%} of them")
    if not diff <= tol:
        raise ExportMismatch(f"{what}: the export differs from the run's model by {diff:.3g} in the logits, more than "
                             f"the {tol:g} allowed for {kind}; the file was kept for inspection but should not be used")
    return diff


class ExportMismatch(RuntimeError):
    """The exported model does not reproduce the run's model within the tolerance of its type."""


# -- Ollama ---------------------------------------------------------------------------------------
_GO_TEMPLATES = {
    "chatml": ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
               '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n',
               ["<|im_end|>"]),
    "llama-3": ('<|begin_of_text|>{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>'
                '{{ end }}{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
                '{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n', ["<|eot_id|>"]),
}


def template_family(tok) -> str | None:
    """chatml or llama-3 when the tokenizer's chat template renders a conversation as that format does."""
    probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    try:
        mine = tok.apply_chat_template(probe, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this is no known family
        return None
    for family in _GO_TEMPLATES:
        if tok.apply_chat_template(probe, tokenize=False, chat_template=TEMPLATES[family]) == mine:
            return family
    return None


def default_system(tok, family: str) -> str | None:
    """The system message the tokenizer's template writes when a conversation has none (SmolLM2's
    own, or the data.system a run baked in), read by rendering with and without one."""
    mark = "\x00SYSTEM\x00"
    user = [{"role": "user", "content": "U"}]
    try:
        before, after = tok.apply_chat_template([{"role": "system", "content": mark}, *user], tokenize=False,
                                                chat_template=TEMPLATES[family]).split(mark)
        mine = tok.apply_chat_template(user, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this writes no default we can read
        return None
    if not mine.startswith(before) or after not in mine[len(before):]:
        return None
    return mine[len(before):].split(after, 1)[0]


def modelfile(gguf_name: str, tok, system: str | None) -> str:
    """An Ollama Modelfile for the GGUF beside it: template, stop tokens, and the system message the
    model was trained with (data.system, else the one its template writes by default)."""
    lines = ["# Ollama: ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_name}"]
    family = template_family(tok)
    if family:
        template, stops = _GO_TEMPLATES[family]
        lines.append(f'TEMPLATE """{template}"""')
        system = system or default_system(tok, family)
    else:
        lines.append("# the chat template is not one Ollama's Go templates are written for here; Ollama reads the "
                     "GGUF's own tokenizer.chat_template")
        stops = []
    stops = list(dict.fromkeys(stops + ([tok.eos_token] if tok.eos_token else [])))
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    if system and '"""' in system:
        log('the system message contains """, which a Modelfile cannot quote: the Modelfile has no SYSTEM line; '
            "give it at run time (ollama run NAME, then /set system ...)")
        lines.append('# the system message the model was trained with contains """ and cannot be written here; '
                     "set it at run time: /set system ...")
    elif system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


# -- model card -------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _table(rows: list[tuple[str, object]]) -> list[str]:
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def model_card(run: Path) -> str:
    """README.md for a run's final model, written from the run's own files (config.yaml, summary.json,
    data_quality.json, compare/*/eval.json): no number in it is typed by hand."""
    cfg = load_config(run / "config.yaml")
    summary = _read_json(run / "summary.json")
    quality = _read_json(run / "data_quality.json")
    lora = cfg.peft.method in ("lora", "qlora")
    base = cfg.model.name
    hub_id = "/" in base and not Path(base).exists()  # the hub's base_model field takes hub ids only
    lines = ["---", "library_name: transformers", *([f"base_model: {base}"] if hub_id else []),
             "tags:", "- sftkit", f"- {cfg.peft.method}", "---", "", f"# {run.name}", "",
             f"Fine-tuned from `{base}` with sftkit ({cfg.task}, method `{cfg.peft.method}`)."]
    lines += ["", "## Training", ""]
    settings = [("method", cfg.peft.method), ("steps", summary.get("steps", "?")),
                ("stopped", summary.get("stopped", "?")), ("final weights", summary.get("final_weights", "last")),
                ("learning rate", cfg.train.lr), ("schedule", f"{cfg.train.schedule}, warmup {cfg.train.warmup_steps or cfg.train.warmup_ratio}"),
                ("batch", f"{cfg.train.batch_size} x {cfg.train.grad_accum} accumulation"),
                ("max length", cfg.data.max_length), ("packing", cfg.data.pack), ("template", cfg.data.template),
                ("loss mask", cfg.data.mask), ("seed", cfg.train.seed)]
    if lora:
        settings[1:1] = [("LoRA", f"r={cfg.peft.r}, alpha={cfg.peft.alpha}, dropout={cfg.peft.dropout}, "
                                  f"targets={cfg.peft.target_modules}")]
    if summary.get("trainable_parameters"):
        settings.append(("trainable parameters", f"{summary['trainable_parameters']:,} of {summary['total_parameters']:,}"))
    if cfg.data.system:
        settings.append(("system message", cfg.data.system))
    lines += _table(settings)
    data = summary.get("data", {})
    lines += ["", "## Data", ""]
    for name in ("train", "eval"):
        d = data.get(name)
        if d:
            lines.append(f"- {name}: " + ", ".join(f"{src} ({n} rows)" for src, n in d.get("sources", {}).items())
                         + f"; {d['kept']} of {d['rows']} rows kept, {d['truncated']} truncated, "
                           f"{d['trained_tokens']:,} trained tokens of {d['tokens']:,}"
                         + (f"; dropped: {', '.join(f'{n} {r}' for r, n in d['dropped'].items())}" if d.get("dropped") else ""))
    if data.get("skipped"):
        lines.append("- skipped while reading: " + ", ".join(f"{n} {r}" for r, n in data["skipped"].items()))
    if quality:
        lines.append(f"- data quality ({quality['rows']} training rows): {quality['exact_duplicates']} exact and "
                     f"{quality['near_duplicates']} near duplicates, {quality['contaminated']} sharing 13-grams with the "
                     "eval rows" + "".join(f", {n} {k}" for k, n in quality.get("lint", {}).items()))
    lines += ["", "## Evaluation", ""]
    results = [("eval loss (held out)", summary.get("eval_loss")), ("best eval loss", summary.get("best_eval_loss"))]
    if summary.get("forgetting") is not None:
        results.append(("forgetting (reference-text perplexity rise)", f"{summary['forgetting']:+.2%}"))
    for who, v in (summary.get("scores") or {}).items():
        results.append((f"{summary.get('metric')} ({who} model)", v))
    lines += _table([(k, _fmt(v)) for k, v in results if v is not None])
    compared = {p.parent.name: _read_json(p).get("metrics", {}) for p in sorted((run / "compare").glob("*/eval.json"))}
    if compared:
        keys = [k for k in next(iter(compared.values()))]
        lines += ["", "`sftkit compare` on the held-out rows:", "", "| metric | " + " | ".join(compared) + " |",
                  "|---|" + "---|" * len(compared)]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(_fmt(m.get(k, "-")) for m in compared.values()) + " |")
    auto = "AutoModelForCausalLM" if cfg.task in CAUSAL_TASKS else "AutoModelForSequenceClassification"
    lines += ["", "## How to load", "", "```python", f"from transformers import {auto}, AutoTokenizer",
              f'model = {auto}.from_pretrained("PATH/final/model")',
              'tokenizer = AutoTokenizer.from_pretrained("PATH/final/model")  # carries the chat template trained',
              "```"]
    if cfg.task not in CAUSAL_TASKS:
        mean = _read_json(run / "final" / "model" / "config.json").get("sftkit_pooling") == "mean"
        if mean:  # the class's own forward pools over [CLS]; this head was trained on the mean of the tokens
            lines += ["", "Its head reads the **mean** of the last hidden states over the real tokens (the encoder was "
                      "trained to pool so; `sftkit_pooling: mean` in config.json). `sftkit predict` does this; with "
                      "plain transformers:", "", "```python",
                      "h = model.base_model(**batch).last_hidden_state",
                      'm = batch["attention_mask"].unsqueeze(-1).to(h.dtype)',
                      "logits = model.classifier(model.dropout((h * m).sum(1) / m.sum(1)))", "```"]
        lines += ["", "A classifier (a reward model: one output, the score); it has no GGUF export.", ""]
        return "\n".join(lines)
    if lora:
        lines += ["", "The LoRA adapter alone (peft):", "", "```python", "from peft import PeftModel",
                  f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "PATH/final/adapter")',
                  "```"]
    lines += ["", "GGUF for llama.cpp / Ollama: `sftkit export PATH --gguf model.gguf` writes the file (checked by "
              "reloading it) and a `Modelfile` beside it: `ollama create NAME -f Modelfile`.", ""]
    return "\n".join(lines)


def write_card(run: Path) -> None:
    """The card into each final model directory of the run."""
    card = model_card(run)
    for d in (run / "final" / "model", run / "final" / "adapter"):
        if d.is_dir():
            (d / "README.md").write_text(card, encoding="utf-8")


# -- the hub ----------------------------------------------------------------------------------------
def hub_folder(run: Path, exported: Path | None = None, gguf_file: Path | None = None) -> Path:
    """The folder `--push-to-hub` uploads: the exported model folder (or the run's final model) with its
    card, plus the GGUF file and Modelfile when one was written. Built here, uploaded by the caller."""
    folder = exported if exported is not None else run / "hub"
    if exported is None:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(run / "final" / "model", folder)
    if not (folder / "README.md").is_file():
        (folder / "README.md").write_text(model_card(run), encoding="utf-8")
    if gguf_file is not None:
        shutil.copy2(gguf_file, folder / gguf_file.name)
        if (gguf_file.parent / "Modelfile").is_file():
            shutil.copy2(gguf_file.parent / "Modelfile", folder / "Modelfile")
    return folder


# -- `sftkit export` --------------------------------------------------------------------------------
def export_run(run: Path, out: Path | None, merge: bool, gguf_file: Path | None, gguf_type: str,
               push_to_hub: str | None, overwrite: bool) -> None:
    """A run's model as a Hugging Face folder (`merge`: the adapter merged in) and/or a GGUF file,
    each written aside, checked by loading it back and comparing logits with the run's model, and
    only then moved into place; `push_to_hub` uploads the result with its card. Every refusal comes
    before anything is written."""
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"export: {run} is not a run directory (no config.yaml)")
    if not final_model_dir(run).is_dir():
        raise ConfigError(f"export: {run} has no final model (did the run finish?)")
    if not (out or gguf_file or push_to_hub):
        raise ConfigError("export: say where: --out DIR (a Hugging Face folder), --gguf FILE.gguf, and/or --push-to-hub REPO")
    cfg = load_config(run / "config.yaml")
    if gguf_file is not None:
        if cfg.task not in CAUSAL_TASKS:
            raise ConfigError(f"export --gguf: {run} is a task: {cfg.task} run, whose model is a classifier "
                              "(AutoModelForSequenceClassification); GGUF is for causal language models. Use --out")
        check_gguf_target(gguf_file, overwrite)
    if out is not None:
        owned_entries(out, overwrite)
        owned_entries(out.with_name(out.name + ".partial"), overwrite=True)  # an interrupted export's, or refused
    written = export_gguf(run, cfg, gguf_file, gguf_type) if gguf_file else None
    if out:
        export_folder(run, cfg, out, merge)
    if push_to_hub:
        upload(push_to_hub, hub_folder(run, out, written))


def owned_entries(out: Path, overwrite: bool) -> list[Path]:
    """What of `out` an export replaces: nothing when it is absent or empty; with --overwrite, the
    files an exported model folder holds. Refused when it holds anything else (nothing is deleted)."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise ConfigError(f"export: --out {out} is a file, not a folder")
    found = sorted(out.iterdir())
    if found and not overwrite:
        raise ConfigError(f"export: {out} is not empty; pass --overwrite to replace the model in it")
    foreign = [p.name for p in found if p.is_dir() or not any(fnmatch.fnmatch(p.name, pat) for pat in OWNED)]
    if foreign:
        raise ConfigError(f"export --overwrite: {out} holds {', '.join(foreign[:5])}"
                          + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                          + ", which an exported model folder does not; nothing was deleted. Choose another --out")
    return found


def _aside(out: Path) -> Path:
    """`<out>.partial`, where the folder is written and checked before it moves into place: emptied of
    an interrupted export's files (owned_entries refuses it, deleting nothing, if it holds others)."""
    tmp = out.with_name(out.name + ".partial")
    for p in owned_entries(tmp, overwrite=True):
        p.unlink()
    if tmp.exists():
        tmp.rmdir()
    return tmp


def _into_place(tmp: Path, out: Path) -> None:
    """The checked folder replaces what an export owns in `out` (checked by owned_entries)."""
    for p in owned_entries(out, overwrite=True):
        p.unlink()
    if out.exists():
        out.rmdir()
    tmp.rename(out)


def export_folder(run: Path, cfg, out: Path, merge: bool) -> None:
    """full / freeze runs and classifiers: the final model copied; LoRA: the adapter, or with `merge`
    the base with the adapter merged in, checked against base + adapter as training ran it."""
    adapter = run / "final" / "adapter"
    tmp = _aside(out)
    if not adapter.is_dir() or not merge:
        src = final_model_dir(run) if not adapter.is_dir() else adapter
        shutil.copytree(src, tmp)
        _into_place(tmp, out)
        print(f"copied {src} to {out}" + ("" if not adapter.is_dir() else " (add --merge for a standalone model)"))
        return
    merged = merge_adapter(cfg.model.name, adapter, "float32", cfg.model.revision)
    merged.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(tmp)  # the tokenizer the run saved, with its template
    card = final_model_dir(run) / "README.md"
    (tmp / "README.md").write_text(card.read_text() if card.is_file() else model_card(run))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    qlora = cfg.peft.method == "qlora"
    base, _ = load_model(cfg.model.name, "float32" if not qlora else cfg.model.dtype, cfg.model.revision, qlora)
    unmerged = PeftModel.from_pretrained(base, str(adapter)).eval()
    rows = probe_rows(run)
    if qlora:  # merged into full precision vs the 4-bit model it trained with: report, do not hide
        diff = max_logit_difference(unmerged, reloaded, rows)
        log(f"QLoRA: merged into the full-precision base vs the 4-bit training model: max |logit difference| "
            f"{diff:.3g} (the 4-bit rounding of the base; not a fault of the export)")
    else:
        check_export(unmerged, reloaded, rows, "merge", f"merged model {out}")
    _into_place(tmp, out)
    print(f"merged {adapter} into {cfg.model.name} -> {out} (loads with AutoModelForCausalLM.from_pretrained)")


def check_gguf_target(path: Path, overwrite: bool) -> None:
    if path.suffix != ".gguf":
        raise ConfigError(f"--gguf {path}: the file name must end in .gguf")
    if path.exists() and not overwrite:
        raise ConfigError(f"--gguf {path} exists; pass --overwrite to replace it")
    if (path.parent / "Modelfile").exists() and not overwrite:
        raise ConfigError(f"--gguf {path}: {path.parent / 'Modelfile'} exists (another export's?); pass --overwrite to "
                          "replace it, or write the GGUF into another folder")


def export_gguf(run: Path, cfg, path: Path, kind: str) -> Path:
    """The final model as a GGUF file with an Ollama Modelfile beside it: written aside, checked by
    reading it back, then moved into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    src = final_model_dir(run)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    tmp = path.with_name(path.stem + ".partial.gguf")
    write_gguf(model, tok, tmp, kind, name=run.name)
    reloaded, _ = load_gguf(tmp)
    check_export(model, reloaded, probe_rows(run), kind, f"GGUF {path} ({kind})")
    os.replace(tmp, path)
    (path.parent / "Modelfile.partial").write_text(modelfile(path.name, tok, cfg.data.system))
    os.replace(path.parent / "Modelfile.partial", path.parent / "Modelfile")
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {kind}) and {path.parent / 'Modelfile'}")
    return path


def upload(repo: str, folder: Path) -> None:
    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder))
    except Exception as e:  # noqa: BLE001 - offline, no token, no rights: one line whatever the cause
        raise ConfigError(f"--push-to-hub {repo}: upload failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}); the folder it would upload is "
                          f"{folder}") from None
    print(f"uploaded {folder} to {repo}")
