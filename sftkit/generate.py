"""Generation with the same rendering as training: batched replies, rejection sampling (best of N by
a scorer), streaming chat, model loading."""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from threading import Thread

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, TextIteratorStreamer

from .compat import cache_argument
from .config import Config, ConfigError, DataConfig, load_config
from .data import renderer_for
from .data.render import Renderer
from .data.sources import DataError, Normaliser, read_source
from .metrics import parse_tool_calls
from .models import load_model
from .retrieve import InContext
from .rundir import final_model_dir


def load_for_inference(target: str, adapter: str | None = None, dtype: str = "auto"):
    """MODEL is an alias, a model directory, a run directory (its final/ model), or a base plus --adapter.

    Returns (model, tokenizer, data config): a run's own data settings (template, system message)
    so a reply is asked for exactly as the model was trained to give it.
    """
    p = Path(target)
    data_cfg = DataConfig()
    if (p / "config.yaml").is_file() and (p / "final").is_dir():
        run_cfg: Config = load_config(p / "config.yaml")
        data_cfg = run_cfg.data
        if adapter is None and not final_model_dir(p).is_dir():
            raise ConfigError(f"{p}: the run has no final/model (did it finish?)")
        target = str(final_model_dir(p))
    elif (p / "config.yaml").is_file() and not (p / "final").is_dir():
        raise ConfigError(f"{p}: this run has not finished (no final/); resume it or pass a checkpoint's model")
    model, tok = load_model(target, dtype)
    if adapter is not None:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ConfigError(f"--adapter {adapter}: no adapter_config.json there (a PEFT adapter directory)")
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, tok, data_cfg


def _sampling(temperature: float, top_p: float) -> dict:
    if temperature and temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


class RowSampler(LogitsProcessor):
    """Samples every row from its own random stream, so a reply depends on its seed alone, not on the
    rows generated beside it (task: rl: two processes sample what one would). Gumbel-max over the
    logits / temperature, cut to the top-p nucleus: the returned scores' argmax is the sample, so
    greedy decoding draws it."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device):
        self.temperature, self.top_p = temperature, top_p
        self.streams = [torch.Generator(device=device).manual_seed(s % 2**63) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:  # the nucleus: the most likely tokens whose probabilities reach top_p (at least one)
            ordered, index = scores.sort(dim=-1, descending=True)
            p = ordered.softmax(-1)
            outside = (p.cumsum(-1) - p) >= self.top_p  # the mass of the likelier tokens already reaches top_p
            drop = torch.zeros_like(outside).scatter(-1, index, outside)
            scores = scores.masked_fill(drop, float("-inf"))
        u = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.streams])
        return scores - torch.log(-torch.log(u.clamp(min=1e-20, max=1 - 1e-7)))


def shared_prefix(encoded: list[list[int]], least: int = 8) -> int:
    """Tokens every prompt starts with (the system message, few-shot examples, the template's opening),
    leaving each prompt at least one token of its own; 0 when shorter than `least`."""
    if len(encoded) < 2:
        return 0
    first, n = encoded[0], min(len(e) for e in encoded) - 1
    for e in encoded[1:]:
        n = next((i for i in range(n) if e[i] != first[i]), n)
    return n if n >= least else 0


def has_cache(model) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "use_cache", False)) and not getattr(config, "is_encoder_decoder", False)


def prefix_cache(model, ids: list[int], device):
    """The KV cache of the shared prefix, computed once and copied into each batch (None where the
    model has no cache to reuse)."""
    if not has_cache(model):
        return None
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([ids], device=device), use_cache=True, **{cache_argument(model): cache})
    return cache


def batch_cache(model, prefix, ids: torch.Tensor, mask: torch.Tensor, n_shared: int, device) -> DynamicCache | None:
    """The shared prefix's cache for a batch laid out [prefix][left padding][own tokens]. Where rows are
    the same prompt (task: rl samples each prompt num_generations times), the prompt is run once for
    all its copies: the cache is filled up to the last prompt token for the distinct rows and copied
    to the others, so generate() computes only that last token per row."""
    rows = [tuple(r) for r in ids[:, n_shared:].tolist()]
    distinct = list(dict.fromkeys(rows))
    if len(distinct) == len(rows) or ids.shape[1] - n_shared < 2 or not has_cache(model):
        if prefix is None:
            return None
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(len(rows))
        return cache
    first = [rows.index(r) for r in distinct]
    if prefix is None:
        cache = DynamicCache(config=model.config)
    else:
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(len(distinct))
    m = mask[first, :-1].to(device)
    positions = (m.cumsum(-1) - 1).clamp(min=0)[:, n_shared:]
    model(input_ids=ids[first, n_shared:-1].to(device), attention_mask=m, position_ids=positions, use_cache=True,
          **{cache_argument(model): cache})
    cache.reorder_cache(torch.tensor([distinct.index(r) for r in rows], device=device))
    return cache


@contextmanager
def merged_lora(model):
    """Runs a LoRA model with each adapter folded into a copy of its base weight (W + B A scaled):
    one matmul per layer instead of three, about a fifth faster per decoded token on a CPU. The
    base weights are swapped back untouched afterwards (no merge and unmerge round trip), so training
    goes on from exactly the weights it had. Models with other adapters (DoRA, quantized bases,
    several adapters at once) run as they are."""
    from peft.tuners.lora import Linear as LoraLinear

    layers = [m for m in model.modules() if isinstance(m, LoraLinear)] if isinstance(model, PeftModel) else []
    ok = layers and all(len(m.active_adapters) == 1 and not m.use_dora.get(m.active_adapters[0], False)
                        and type(m.base_layer) is torch.nn.Linear and m.base_layer.weight.dtype.is_floating_point
                        and not m.merged and not m.disable_adapters for m in layers)
    if not ok:
        yield
        return
    saved = []
    try:
        with torch.no_grad():
            for m in layers:
                weight = m.base_layer.weight
                delta = m.get_delta_weight(m.active_adapters[0]).to(weight.dtype)
                saved.append((m, weight))
                m.base_layer.weight = torch.nn.Parameter(weight + delta, requires_grad=False)
        with model.disable_adapter():
            yield
    finally:
        for m, weight in saved:
            m.base_layer.weight = weight


@torch.no_grad()
def generate(model, renderer: Renderer, prompts: list[list[dict[str, str]]], max_new_tokens: int = 64,
             batch_size: int = 16, progress=None, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, reuse_prefix: bool = True, tools: list | None = None) -> list[str]:
    """Replies to conversations that end with a user turn, as text; each stops at its end-of-turn token.
    `tools`: per prompt, the tool definitions the template is given (None where a prompt has none)."""
    ids = generate_ids(model, renderer, prompts, max_new_tokens, batch_size, progress, temperature, top_p, seed,
                       reuse_prefix, tools=tools)
    return [renderer.tok.decode(x, skip_special_tokens=True) for x in ids]


@torch.no_grad()
def generate_ids(model, renderer: Renderer, prompts: list[list[dict[str, str]]], max_new_tokens: int = 64,
                 batch_size: int = 16, progress=None, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, reuse_prefix: bool = True, row_seeds: list[int] | None = None,
                 fast: bool = True, tools: list | None = None) -> list[list[int]]:
    """The replies' token ids, each up to and including its first end-of-turn token (or max_new_tokens
    long where it did not end): exactly the tokens sampled, for a loss on them (task: rl). With
    `row_seeds` (one per prompt) and a temperature, each reply is sampled from its own seed
    (RowSampler) instead of one stream for the batch.

    The prefix all prompts share (system message, few-shot examples) is run once and its KV cache
    reused by every batch: rows are laid out as [prefix][left padding][own tokens], positions
    counted over the real tokens only, so each row sees what it would see alone. Copies of one prompt
    in a batch share one prompt pass (batch_cache). `fast`: a LoRA model decodes with its adapters
    folded into copies of the weights (merged_lora): the same replies up to float rounding, the
    model's weights untouched."""
    tok = renderer.tok
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    was_training = model.training
    model.eval()
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    with merged_lora(model) if fast else nullcontext():
        encoded = [renderer.prompt_ids(p, tools[i] if tools else None) for i, p in enumerate(prompts)]
        replies = _generate_ids(model, renderer, encoded, max_new_tokens, batch_size, progress, temperature, top_p,
                                reuse_prefix, row_seeds, pad, device)
    model.train(was_training)
    return replies


def _generate_ids(model, renderer: Renderer, encoded: list[list[int]], max_new_tokens: int,
                  batch_size: int, progress, temperature: float, top_p: float, reuse_prefix: bool,
                  row_seeds: list[int] | None, pad: int, device) -> list[list[int]]:
    n_shared = shared_prefix(encoded) if reuse_prefix else 0
    cache = prefix_cache(model, encoded[0][:n_shared], device) if n_shared else None
    n_shared = n_shared if cache is not None else 0
    own = [e[n_shared:] for e in encoded]
    # Longest first keeps batches of similar length, so little compute goes to padding.
    order = sorted(range(len(own)), key=lambda i: -len(own[i]))
    replies: dict[int, list[int]] = {}
    ends = renderer.end_ids
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        width = n_shared + max(len(own[i]) for i in idx)
        # Left padding (after the shared prefix): every prompt ends at the same column, where generation starts.
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        ids[:, :n_shared] = torch.tensor(encoded[idx[0]][:n_shared])
        mask[:, :n_shared] = 1
        for row, i in enumerate(idx):
            ids[row, width - len(own[i]):] = torch.tensor(own[i])
            mask[row, width - len(own[i]):] = 1
        extra = {}
        own_cache = batch_cache(model, cache, ids, mask, n_shared, device)
        if own_cache is not None:
            extra[cache_argument(model)] = own_cache
        if row_seeds is not None and temperature and temperature > 0:
            sampler = RowSampler([row_seeds[i] for i in idx], temperature, top_p, device)
            extra["logits_processor"] = LogitsProcessorList([sampler])
            sampling = _sampling(0.0, 1.0)
        else:
            sampling = _sampling(temperature, top_p)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             eos_token_id=sorted(renderer.end_ids), pad_token_id=pad, **extra, **sampling)
        for row, i in enumerate(idx):
            out = gen[row, width:].tolist()
            stop = next((k for k, t in enumerate(out) if t in ends), None)
            replies[i] = out[: stop + 1] if stop is not None else out
        if progress is not None:
            progress(len(idx))
    return [replies[i] for i in range(len(encoded))]


def chat(model, tok, data_cfg: DataConfig, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
         stdin=None, stdout=None, tools: list[dict] | None = None, context: InContext | None = None) -> None:
    """Interactive chat that streams tokens. Commands: /reset, /system TEXT, /exit. With `tools`, the
    template is given them and each tool call in a reply is printed parsed. With `context` (shots,
    retrieval), each turn's prompt is built by it, as eval and generate build theirs (the history
    keeps the turns as typed; the documents are looked up for the newest question)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    renderer = renderer_for(data_cfg, tok)
    system = data_cfg.system
    history: list[dict[str, str]] = []
    device = next(model.parameters()).device
    print("chat: /reset clears the conversation, /system TEXT sets the system message, /exit quits", file=stdout)
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = []
            print("(conversation cleared)", file=stdout)
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            history = []
            state = "set" if system else ("back to the run's data.system" if renderer.system else "cleared")
            print(f"(system message {state}; conversation cleared)", file=stdout)
            continue
        history.append({"role": "user", "content": text})
        msgs = ([{"role": "system", "content": system}] if system else []) + history
        if context is not None and context.active:
            (msgs,), (info,) = context.apply([msgs], renderer, data_cfg)
            for h in info.get("retrieved", []):
                print(f"(retrieved {h['id']} from {h['source']}, score {h['score']:.3f})", file=stdout)
            if info.get("shots"):
                print(f"(examples: {', '.join(info['shots'])})", file=stdout)
        ids = torch.tensor([renderer.prompt_ids(msgs, tools)], device=device)
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                      eos_token_id=sorted(renderer.end_ids), pad_token_id=tok.pad_token_id, streamer=streamer,
                      **_sampling(temperature, top_p))
        worker = Thread(target=model.generate, kwargs=kwargs)
        worker.start()
        print("model> ", end="", file=stdout, flush=True)
        reply = ""
        for piece in streamer:
            reply += piece
            print(piece, end="", file=stdout, flush=True)
        worker.join()
        print(file=stdout)
        if tools:
            calls, bad = parse_tool_calls(reply)
            for c in calls:
                print(f"(tool call: {c['name']} {json.dumps(c['arguments'], ensure_ascii=False)})", file=stdout)
            for b in bad:
                print(f"(not a tool call: {b!r})", file=stdout)
        history.append({"role": "assistant", "content": reply.strip()})


# -- prompts from a file, and the best of N ---------------------------------------------------------
def prompt_of(obj, path: str, line: int) -> list[dict[str, str]]:
    """An input row for generation as the conversation to reply to: `messages` (a trailing reply is
    dropped) ending with a user turn, or `prompt` (a string or a message list)."""
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        msgs = [m for m in obj["messages"] if isinstance(m, dict)]
        while msgs and msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
        if msgs and msgs[-1].get("role") in ("user", "tool"):  # a tool's result: the reply goes on from it
            return Normaliser(path).raw_messages(msgs, line, "messages")
    elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
        return [{"role": "user", "content": obj["prompt"]}]
    elif isinstance(obj, dict) and isinstance(obj.get("prompt"), list):
        return obj["prompt"]
    raise DataError(f"{path}:{line}: expected `messages` ending with a user turn, or `prompt`")


def read_prompts(path: str) -> list[tuple[dict, list[dict[str, str]]]]:
    """(row as read, its conversation) for every row of a prompts file; a bad row stops, naming its line."""
    out = []
    for line, obj in read_source(path):
        if isinstance(obj, DataError):
            raise obj
        row_tools(obj, path, line)  # a bad `tools` column stops here too
        out.append((obj, prompt_of(obj, path, line)))
    return out


def generate_file(model, renderer: Renderer, rows: list[tuple[dict, list]], output: str, max_new_tokens: int,
                  batch_size: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                  tools: list[dict] | None = None, context: InContext | None = None,
                  data_cfg: DataConfig | None = None) -> int:
    """Each row plus `generated` (its reply) into `output` (JSONL); returns the rows written. The
    template is given a row's own `tools` column, else `tools` (--tools); where it has tools, the
    row also gets `tool_calls`, the calls parsed from its reply (and `tool_call_errors`, blocks that are not).
    With `context` the prompts get shots / retrieved chunks, and each row records them (`shots`:
    where each example came from; `retrieved`: chunk id, source and score)."""
    per_row = [row_tools(obj, "input", i + 1) or tools for i, (obj, _) in enumerate(rows)]  # read_prompts checked them
    prompts, info = [p for _, p in rows], [{} for _ in rows]
    if context is not None and context.active:
        prompts, info = context.apply(prompts, renderer, data_cfg)
    with tqdm(total=len(rows), desc="generate", file=sys.stderr) as bar:
        replies = generate(model, renderer, prompts, max_new_tokens, batch_size, bar.update,
                           temperature=temperature, top_p=top_p, seed=seed,
                           tools=per_row if any(per_row) else None)
    with open(output, "w", encoding="utf-8") as f:
        for (obj, _), reply, t, extra in zip(rows, replies, per_row, info):
            out = {**obj, "generated": reply, **extra}
            if t:
                out["tool_calls"], bad = parse_tool_calls(reply)
                if bad:
                    out["tool_call_errors"] = bad
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
    return len(replies)


def row_tools(obj, path: str, line: int) -> list[dict] | None:
    """A prompt row's `tools` column (a list, or its JSON string), read as the training data's is."""
    if not isinstance(obj, dict) or obj.get("tools") in (None, "", []):
        return None
    return Normaliser(path).tools_of(obj, line)


def read_tools(path: str) -> list[dict]:
    """--tools FILE: a JSON list of function definitions."""
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"--tools: cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--tools: {path}:{e.lineno}: not JSON: {e.msg}") from None
    try:
        return Normaliser(path).tools_of({"tools": tools}, 1)
    except DataError as e:
        raise ConfigError(f"--tools: {e}") from None


def write_candidates(sources: list[tuple[str, Callable[[], tuple]]], rows: list[tuple[dict, list]], output: str,
                     n: int, max_new_tokens: int, batch_size: int, temperature: float, top_p: float = 1.0,
                     seed: int = 0) -> int:
    """Candidates for people to judge (the review page): `n` sampled replies per prompt from each
    source (name, a loader of (model, tokenizer, data config)), one model in memory at a time. Each
    reply is sampled from its own seed, so a candidate can be made again alone. A prompt's
    candidates are shuffled by seed, so their place says nothing of their source; each keeps its
    model, run, seed and sampling settings in the file (the page shows the reply only). One line per
    prompt: the input row, `id` (its `id` column, else its line number) and `candidates`."""
    import random

    if n < 1:
        raise ConfigError(f"--n {n}: expected at least 1")
    if n > 1 and temperature <= 0:
        raise ConfigError("--n samples several replies: give --temperature > 0 (e.g. 0.8), or they are the same")
    prompts = [p for _, p in rows]
    found: list[list[dict]] = [[] for _ in rows]
    for s_i, (name, load) in enumerate(sources):
        model, tok, data_cfg = load()
        renderer = renderer_for(data_cfg, tok)
        seeds = [seed + 1_000_003 * s_i + n * i + k for i in range(len(rows)) for k in range(n)]
        with tqdm(total=len(seeds), desc=f"candidates ({name})", file=sys.stderr) as bar:
            ids = generate_ids(model, renderer, [p for p in prompts for _ in range(n)], max_new_tokens, batch_size,
                               bar.update, temperature, top_p, row_seeds=seeds if temperature > 0 else None)
        run = name if (Path(name) / "config.yaml").is_file() else None
        for j, reply in enumerate(ids):
            i = j // n
            found[i].append({"reply": tok.decode(reply, skip_special_tokens=True), "model": name, "run": run,
                             "seed": seeds[j], "temperature": temperature, "top_p": top_p,
                             "max_new_tokens": max_new_tokens})
        del model
    with open(output + ".tmp", "w", encoding="utf-8") as f:
        for line, ((obj, _), cands) in enumerate(zip(rows, found), 1):
            pid = str(obj.get("id", line)) if isinstance(obj, dict) else str(line)
            random.Random(f"{seed}:{pid}").shuffle(cands)
            out = {**obj, "id": pid, "candidates": [{"id": f"{pid}-c{k}", **c} for k, c in enumerate(cands)]}
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
    Path(output + ".tmp").replace(output)
    return sum(len(c) for c in found)


def best_of_n(model, renderer: Renderer, rows: list[tuple[dict, list]], score: Callable[[list], list[float]],
              n: int, output: str, pairs_out: str | None, max_new_tokens: int, batch_size: int,
              temperature: float, top_p: float = 1.0, seed: int = 0) -> int:
    """Rejection sampling: `n` sampled replies per prompt, scored by `score` (a list of (prompt
    messages, reply messages) -> a list of floats, e.g. a reward model's); the best is kept with every
    candidate's score, and `pairs_out` gets (best, worst) as preference pairs. Returns the pairs written."""
    if n < 2:
        raise ConfigError("--best-of N needs N >= 2")
    if temperature <= 0:
        raise ConfigError("--best-of samples: give --temperature > 0 (e.g. 0.8), or the N replies are the same")
    prompts = [p for _, p in rows]
    samples: list[list[str]] = [[] for _ in prompts]
    with tqdm(total=len(prompts) * n, desc=f"generate (best of {n})", file=sys.stderr) as bar:
        for k in range(n):  # the k-th sample of every prompt, with its own seed
            for i, reply in enumerate(generate(model, renderer, prompts, max_new_tokens, batch_size, bar.update,
                                               temperature=temperature, top_p=top_p, seed=seed + k)):
                samples[i].append(reply)
    scores = score([(p, [{"role": "assistant", "content": r}]) for p, rs in zip(prompts, samples) for r in rs])
    pairs = 0
    with open(output, "w", encoding="utf-8") as out, \
            (open(pairs_out, "w", encoding="utf-8") if pairs_out else nullcontext()) as pairs_file:
        for i, ((obj, prompt), replies) in enumerate(zip(rows, samples)):
            s = scores[i * n : (i + 1) * n]
            best, worst = max(range(n), key=s.__getitem__), min(range(n), key=s.__getitem__)
            out.write(json.dumps({**obj, "generated": replies[best], "score": s[best],
                                  "candidates": [{"reply": r, "score": x} for r, x in zip(replies, s)]},
                                 ensure_ascii=False) + "\n")
            if pairs_file is not None and s[best] > s[worst] and replies[best] != replies[worst]:
                pairs_file.write(json.dumps({"prompt": prompt, "chosen": replies[best], "rejected": replies[worst],
                                             "margin": s[best] - s[worst]}, ensure_ascii=False) + "\n")
                pairs += 1
    return pairs
