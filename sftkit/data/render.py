"""Render a conversation to (input_ids, labels): the one place where masks are decided.

A token is trained when its label is not -100. Every assistant reply is trained together with
the end-of-turn token that closes it (so the model learns to stop), nothing else is.

Templates rarely mark where a reply starts and ends, so spans are found by rendering prefixes:
the conversation up to a reply with the generation prompt gives the reply's start, the
conversation including the reply gives its end. Both must tokenize to a prefix of the whole
conversation's tokens; a template for which that fails is reported, never guessed around.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .sources import DataError, Row

if TYPE_CHECKING:  # the type only: `sftkit --help` and a config error answer without loading transformers
    from transformers import PreTrainedTokenizerBase

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where not trained
    source: str = ""
    line: int = 0

    @property
    def n_trained(self) -> int:
        # The first token is never predicted (nothing comes before it), so its label never
        # reaches the loss: counting it would let a one-token remnant pass as trainable.
        return sum(1 for x in self.labels[1:] if x != IGNORE)


@dataclass
class RenderStats:
    rows: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    split: int = 0  # text rows longer than max_length, split into blocks
    blocks: int = 0  # the blocks they became
    expanded: int = 0  # reasoning rows made into one example per trained turn (the template drops earlier traces)
    per_turn: int = 0  # the examples they became

    def summary(self, name: str) -> str:
        drops = ", ".join(f"{n} {reason}" for reason, n in self.dropped.items()) or "none"
        frac = self.trained_tokens / max(self.tokens, 1)
        split = f"; {self.split} long documents split into {self.blocks} blocks" if self.split else ""
        if self.expanded:
            split += (f"; {self.expanded} rows with reasoning made into {self.per_turn} examples, one per trained turn "
                      "(the template leaves out earlier turns' reasoning)")
        return (
            f"{name}: {self.rows} rows read, {self.kept} kept, dropped: {drops}; {self.truncated} truncated{split}; "
            f"{self.tokens} tokens, {self.trained_tokens} trained ({frac:.0%})"
        )


TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama-3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% else %}"
        "{{ 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n' }}"
        "{% endif %}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '### Instruction:\n' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
        "{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    # ChatML with tools in the Hermes layout (as Qwen2.5 and Qwen3 write them) and reasoning traces: the
    # <think> block of the replies after the last user message is kept, earlier ones are left out (as
    # Qwen3's template does). Replies sit in {% generation %} blocks (transformers' assistant mask).
    "qwen3": (
        "{%- if tools %}{{- '<|im_start|>system\n' }}{%- if messages[0]['role'] == 'system' %}"
        "{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
        "{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
        "function signatures within <tools></tools> XML tags:\n<tools>' }}"
        "{%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}"
        "{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n' }}"
        "{%- elif messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
        "{%- endif %}"
        "{%- set ns = namespace(last_user=-1) %}{%- for m in messages %}{%- if m['role'] == 'user' %}"
        "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
        "{%- for message in messages %}"
        "{%- if message['role'] == 'user' %}{{- '<|im_start|>user\n' + message['content'] + '<|im_end|>\n' }}"
        "{%- elif message['role'] == 'assistant' %}"
        "{%- set content = message['content'] or '' %}{%- set reasoning = message['reasoning_content'] or '' %}"
        "{%- if not reasoning and '</think>' in content %}"
        "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}"
        "{%- set content = content.split('</think>')[-1] %}{%- endif %}"
        "{{- '<|im_start|>assistant\n' }}{% generation %}"
        "{%- if loop.index0 > ns.last_user and reasoning %}"
        "{{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' }}{%- endif %}"
        "{{- content.lstrip('\n') }}"
        "{%- for call in message['tool_calls'] or [] %}{%- set f = call['function'] %}"
        "{%- if content or not loop.first %}{{- '\n' }}{%- endif %}"
        "{{- '<tool_call>\n{\"name\": \"' + f['name'] + '\", \"arguments\": ' + (f['arguments'] | tojson) "
        "+ '}\n</tool_call>' }}{%- endfor %}"
        "{{- '<|im_end|>' }}{% endgeneration %}{{- '\n' }}"
        "{%- elif message['role'] == 'tool' %}"
        "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
        "{{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
        "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
        "{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
    ),
}
# Templates sftkit ships that render tools, tool calls and tool results (named where a template cannot).
TOOL_TEMPLATES = ("qwen3",)
REASONING = ("train", "mask", "drop")
THINK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)
# data.template=plain as a chat template, for exported tokenizers: contents end to end, each reply
# closed by eos, system messages left out (what Renderer._text does for plain).
PLAIN_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endif %}{% endfor %}"
)
# Tokens that close a turn in common templates; the eos token always does.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")
MASKS = ("auto", "completion", "assistant", "last_assistant", "none")
TRUNCATION = ("truncate", "drop", "error")


class Renderer:
    """Turns Rows into Examples with one tokenizer, template and masking mode, the same way everywhere."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str = "auto", max_length: int = 1024,
                 mask: str = "auto", truncation: str = "truncate", system: str | None = None, chunk_overlap: int = 0,
                 reasoning: str = "train"):
        if mask not in MASKS:
            raise DataError(f"data.mask: {mask!r} is not one of {', '.join(MASKS)}")
        if reasoning not in REASONING:
            raise DataError(f"data.reasoning: {reasoning!r} is not one of {', '.join(REASONING)}")
        self.reasoning = reasoning
        self._support: dict[str, bool] = {}
        if chunk_overlap < 0 or (chunk_overlap and chunk_overlap >= max_length - 1):
            raise DataError(f"data.chunk_overlap: expected 0 <= chunk_overlap < data.max_length - 1 = {max_length - 1}, "
                            f"got {chunk_overlap}")
        self.chunk_overlap = chunk_overlap
        if truncation not in TRUNCATION:
            raise DataError(f"data.truncation: {truncation!r} is not one of {', '.join(TRUNCATION)}")
        self.tok = tokenizer
        self.template = template
        self.max_length = max_length
        self.mask = mask
        self.truncation = truncation
        self.system = system  # data.system: given to every conversation that has no system message
        self.chat_template = self._resolve_template(template)
        # The tokens that end a turn. Padding may share the id (pad == eos is common): labels are
        # built here, before padding, so the end of a reply stays trained either way.
        vocab = tokenizer.get_vocab()
        self.end_ids = ({tokenizer.eos_token_id} | {vocab[t] for t in END_OF_TURN if t in vocab}) - {None}
        self.template_name = template if template != "auto" else f"the tokenizer of {getattr(tokenizer, 'name_or_path', '?')}"

    def _resolve_template(self, template: str) -> str | None:
        if template == "plain":
            return None
        if template == "auto":
            if not self.tok.chat_template:
                raise DataError(
                    "data.template=auto needs a tokenizer with a chat template, and this one has none; use "
                    "data.template=plain (prompt + completion + eos) for a base model, or chatml / llama-3 / alpaca"
                )
            return None  # the tokenizer's own
        if template in TEMPLATES:
            return TEMPLATES[template]
        if template.endswith((".jinja", ".j2")) or "/" in template:
            try:
                return open(template, encoding="utf-8").read()
            except OSError as e:
                raise DataError(f"data.template: cannot read the Jinja file {template!r}: {e.strerror}") from None
        raise DataError(f"data.template: {template!r} is not auto, plain, {', '.join(TEMPLATES)} or a .jinja file")

    # -- tokenization ---------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        # The template writes its own BOS where it wants one; letting the tokenizer add another
        # would give a duplicated BOS.
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        bos = self.tok.bos_token_id
        if bos is not None and getattr(self.tok, "add_bos_token", False) and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The conversation as every part of sftkit renders it: with data.system first when it has no
        system message of its own (as the data reader gives it to each training row)."""
        if self.system is not None and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.system}, *messages]
        return messages

    def _text(self, messages: list[dict], generation_prompt: bool = False, tools: list[dict] | None = None,
              as_given: bool = False) -> str:
        """The one place a conversation becomes text: training, eval, generate, best-of, chat and the
        dashboard's chat all come here (through render or prompt_ids). Reasoning traces are handled
        by data.reasoning first (`as_given`: not, for probing the template)."""
        messages = self.with_system(messages)
        if not as_given:
            messages = self.with_reasoning(messages)
        if self.template == "plain":
            # Contents laid end to end, each reply closed by eos: what base-model SFT expects.
            eos = self.tok.eos_token or ""
            return "".join(m["content"] + (eos if m["role"] == "assistant" else "")
                           for m in messages if m["role"] != "system")
        kwargs = {"chat_template": self.chat_template} if self.chat_template else {}
        if tools:
            kwargs["tools"] = tools
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)

    # -- reasoning traces and tools -------------------------------------------------------------
    def supports(self, what: str) -> bool:
        """Whether the template renders `what`: tools (the definitions), tool_calls, tool (results) or
        reasoning_content. Found by rendering a probe and looking for it in the text."""
        if what not in self._support:
            probe, user = "sftkitprobe", {"role": "user", "content": "u"}
            call = {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": probe if what == "tool_calls" else "f", "arguments": {}}}]}
            fn = {"type": "function", "function": {"name": probe, "description": "", "parameters": {"type": "object",
                                                                                                    "properties": {}}}}
            msgs, tools = {"tools": ([user], [fn]), "tool_calls": ([user, call], None),
                           "tool": ([user, call, {"role": "tool", "content": probe}], None),
                           "reasoning_content": ([user, {"role": "assistant", "content": "a",
                                                         "reasoning_content": probe}], None)}[what]
            try:
                text = "" if self.template == "plain" else self._text(msgs, tools=tools, as_given=True)
            except Exception:  # a template that raises on the probe does not render it either
                text = ""
            self._support[what] = probe in text
        return self._support[what]

    def with_reasoning(self, messages: list[dict]) -> list[dict]:
        """Assistant turns' reasoning traces (`reasoning_content`, or a <think> block in the content) as
        data.reasoning says: `drop` removes them; `train` and `mask` keep them, written by the template
        where it renders reasoning_content, else put before the reply as `<think>\n...\n</think>\n\n`."""
        out = []
        for m in messages:
            if m["role"] != "assistant" or not ("reasoning_content" in m or "<think>" in m["content"]):
                out.append(m)
                continue
            m = dict(m)
            if self.reasoning == "drop":
                m.pop("reasoning_content", None)
                m["content"] = THINK.sub("", m["content"])
            elif "reasoning_content" in m and not self.supports("reasoning_content"):
                trace = m.pop("reasoning_content").strip()
                m["content"] = f"<think>\n{trace}\n</think>\n\n{m['content'].lstrip()}" if trace else m["content"]
            out.append(m)
        return out

    def check_tools(self, row: Row) -> None:
        """A row with tools, tool calls or tool results needs a template that renders each: else the run
        stops here (at the start), naming the templates that can."""
        present = (("tools", bool(row.tools)), ("tool_calls", any(m.get("tool_calls") for m in row.messages)),
                   ("tool", any(m["role"] == "tool" for m in row.messages)))
        missing = [what for what, there in present if there and not self.supports(what)]
        if missing:
            names = {"tools": "the tools' definitions", "tool_calls": "tool calls", "tool": "tool results"}
            raise DataError(
                f"{row.source}:{row.line}: the chat template ({self.template_name}) cannot render "
                f"{' or '.join(names[w] for w in missing)} (it leaves them out, so the model would train on a "
                f"conversation it never sees); set data.template to {' or '.join(TOOL_TEMPLATES)} (shipped with "
                "sftkit) or a .jinja template that renders tools", "template cannot render tools")

    def _think_mask(self, text: str, ids: list[int], labels: list[int]) -> None:
        """data.reasoning=mask: the tokens of every <think>...</think> block are not trained."""
        spans = [(m.start(), m.end()) for m in THINK.finditer(text)]
        if not spans:
            return
        if not getattr(self.tok, "is_fast", False):
            raise DataError("data.reasoning=mask needs a fast tokenizer (its offsets locate the trace's tokens)")
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        shift = len(ids) - len(enc["input_ids"])  # a BOS _encode put in front
        for j, (a, b) in enumerate(enc["offset_mapping"]):
            if any(a < e and b > s for s, e in spans):
                labels[j + shift] = IGNORE

    def trained_template(self, system: str | None = None) -> str | None:
        """The chat template this renderer trains with, as one Jinja template for the saved tokenizer:
        the named or file template (or the tokenizer's own), with `data.system` added to a conversation
        that has no system message, as the data reader adds it. Inference then renders the same text."""
        body = PLAIN_TEMPLATE if self.template == "plain" else (self.chat_template or self.tok.chat_template)
        if body is None or system is None or self.template == "plain":
            return body
        literal = json.dumps(system, ensure_ascii=False)
        return ("{%- if messages|length == 0 or messages[0]['role'] != 'system' %}"
                "{%- set messages = [{'role': 'system', 'content': " + literal + "}] + messages %}{%- endif %}" + body)

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Tokens that ask the model for the next assistant reply (used by generation)."""
        return self._encode(self._text(messages, generation_prompt=True, tools=tools))

    # -- labels ---------------------------------------------------------------------------------
    def _trained_turns(self, row: Row) -> list[int]:
        if row.trained is not None:  # a row expanded into one example per trained turn
            return row.trained
        mask = self.mask
        if mask == "auto":
            mask = "completion" if row.kind in ("prompt_completion", "alpaca") else "assistant"
        assistant = [i for i, m in enumerate(row.messages) if m["role"] == "assistant"]
        if mask == "assistant":
            return assistant
        if mask == "last_assistant":
            return assistant[-1:]
        if mask == "completion":
            # The completion part of prompt/completion rows; the final reply of a conversation.
            return [i for i in assistant if i >= row.n_prompt] if row.n_prompt else assistant[-1:]
        return []

    def render(self, row: Row) -> Example:
        """Full-length (untruncated) example: trained replies with their end token, nothing else."""
        if row.text is not None:  # plain text: every token, closed by eos so documents end
            ids = self._encode(row.text) + ([self.tok.eos_token_id] if self.tok.eos_token_id is not None else [])
            return Example(ids, list(ids), row.source, row.line)
        msgs, tools = row.messages, row.tools
        self.check_tools(row)
        text = self._text(msgs, tools=tools)
        ids = self._encode(text)
        if self.mask == "none":
            labels = list(ids)
        else:
            labels = [IGNORE] * len(ids)
            for i in self._trained_turns(row):
                start = self._prefix_len(self._text(msgs[:i], generation_prompt=True, tools=tools), ids, row, i)
                end = self._prefix_len(self._text(msgs[: i + 1], tools=tools), ids, row, i)
                # Train up to and including the last end-of-turn token inside the reply's span;
                # what a template writes after it (a newline) belongs to no reply.
                last_end = max((j for j in range(start, end) if ids[j] in self.end_ids), default=end - 1)
                labels[start : last_end + 1] = ids[start : last_end + 1]
        if self.reasoning == "mask":
            self._think_mask(text, ids, labels)
        return Example(ids, labels, row.source, row.line)

    def per_turn(self, row: Row) -> list[Row]:
        """The row as one row per trained turn, each ending with that turn and training it alone: for
        templates that render an earlier reply otherwise than when it was the last (Qwen3-style ones
        leave out the reasoning of replies before the last user message), so each turn is trained as
        the template writes it at inference, when that turn is the one generated."""
        out = []
        for i in self._trained_turns(row):
            n_prompt = i if row.n_prompt else 0
            out.append(dataclasses.replace(row, messages=row.messages[: i + 1], trained=[i], n_prompt=n_prompt))
        return out

    def _prefix_len(self, text: str, full: list[int], row: Row, turn: int) -> int:
        ids = self._encode(text)
        if full[: len(ids)] == ids:
            return len(ids)
        if self.template == "plain":
            # Without a template, BPE may merge the prompt's last characters with the reply's
            # first: the merged token carries reply text, so the reply starts there.
            return next(j for j, (a, b) in enumerate(zip(ids, full)) if a != b)
        raise DataError(
            f"{row.source}:{row.line}: messages[{turn}]: the chat template ({self.template_name}) is not "
            "prefix-consistent: rendering the conversation up to this turn does not give a prefix of the whole "
            "conversation, so the reply's tokens cannot be located; use another data.template",
            "template not prefix-consistent",
        )

    def blocks(self, ex: Example) -> list[Example]:
        """A long document (a text row) as consecutive blocks of at most max_length tokens in which
        every token of it is trained exactly once, in order. Each block after the first opens with
        data.chunk_overlap tokens of the one before as context, never trained (at least one: the
        token its first trained token is predicted from)."""
        n, size, context = len(ex.input_ids), self.max_length, max(self.chunk_overlap, 1)
        out = [Example(ex.input_ids[:size], ex.labels[:size], ex.source, ex.line)]
        untrained = size  # the first token no block has trained yet
        while untrained < n:
            start = untrained - context
            ids = ex.input_ids[start : start + size]
            out.append(Example(ids, [IGNORE] * context + ex.labels[untrained : start + size], ex.source, ex.line))
            untrained = start + size
        return out

    def fit(self, row: Row) -> tuple[Example | None, str | None, bool]:
        """The row's example within max_length by data.truncation: (example or None, drop reason, cut?).
        (build_examples splits a long text row into blocks instead; this cuts one where one example is needed.)

        `truncate` never cuts the template's opening (BOS, system message, role header) nor the last
        user turn: it cuts the tail of the last trained reply; if that reply's prompt alone leaves
        no room for one reply token, it removes earlier turns of the chat, whole and oldest first;
        if the prompt still does not fit, the row is dropped under its own reason."""
        ex = self.render(row)
        n = len(ex.input_ids)
        if n <= self.max_length:
            return ex, None, False
        if self.truncation == "error":
            raise DataError(f"{ex.source}:{ex.line}: {n} tokens, longer than data.max_length={self.max_length} "
                            "(data.truncation=error)", "longer than max_length")
        if self.truncation == "drop":
            return None, f"longer than max_length={self.max_length}", True
        while True:
            if row.text is not None or self.mask == "none" or _last_reply_start(ex.labels) < self.max_length:
                keep = self.max_length
                return Example(ex.input_ids[:keep], ex.labels[:keep], ex.source, ex.line), None, True
            shorter = _without_oldest_turn(row, self._trained_turns(row))
            if shorter is None:
                return None, "prompt longer than data.max_length", True
            row = shorter
            ex = self.render(row)
            if len(ex.input_ids) <= self.max_length:
                return ex, None, True


def _last_reply_start(labels: list[int]) -> int:
    """Position of the first token of the last trained reply (len(labels) when none is trained)."""
    j = len(labels)
    while j > 0 and labels[j - 1] == IGNORE:
        j -= 1
    while j > 0 and labels[j - 1] != IGNORE:
        j -= 1
    return j if any(x != IGNORE for x in labels) else len(labels)


def _without_oldest_turn(row: Row, trained: list[int]) -> Row | None:
    """The row without its oldest exchange (a user turn and the replies up to the next user turn);
    None when only the last user turn and its reply are left. The system message stays."""
    msgs = row.messages
    first = 1 if msgs and msgs[0]["role"] == "system" else 0
    last_user = max(i for i, m in enumerate(msgs[: trained[-1]]) if m["role"] == "user") if trained else first
    nxt = next((i for i in range(first + 1, len(msgs)) if msgs[i]["role"] == "user"), None)
    if nxt is None or nxt > last_user:
        return None
    cut = nxt - first
    return dataclasses.replace(row, messages=msgs[:first] + msgs[nxt:],
                               n_prompt=max(row.n_prompt - cut, first + 1) if row.n_prompt else 0,
                               trained=[t - cut for t in row.trained] if row.trained is not None else None)


def build_examples(rows: list[Row], renderer: Renderer) -> tuple[list[Example], RenderStats]:
    """Render, truncate and filter; every drop is counted by reason."""
    stats = RenderStats(rows=len(rows))
    out = []
    for row in rows:
        if row.text is not None and renderer.truncation == "truncate" and renderer.max_length > 1:
            # A long document is split, not cut: every token of it is trained once (Renderer.blocks).
            ex = renderer.render(row)
            if len(ex.input_ids) > renderer.max_length:
                parts = renderer.blocks(ex)
                stats.split += 1
                stats.blocks += len(parts)
                stats.kept += 1
                stats.tokens += sum(len(b.input_ids) for b in parts)
                stats.trained_tokens += sum(b.n_trained for b in parts)
                out += parts
                continue
        try:
            fitted = [renderer.fit(row)]
        except DataError as e:
            # A reasoning row whose earlier replies the template writes otherwise than it wrote them
            # as the last one: one example per trained turn, each as generated (Renderer.per_turn).
            if e.reason != "template not prefix-consistent" or not has_reasoning(row):
                raise
            parts = renderer.per_turn(row)
            stats.expanded += 1
            stats.per_turn += len(parts)
            fitted = [renderer.fit(part) for part in parts]
        kept = False
        for ex, dropped, cut in fitted:
            if ex is None:
                stats.dropped[dropped] += 1
                continue
            stats.truncated += cut
            if ex.n_trained == 0:
                # Nothing to learn from: passing it on would add a zero-token term to the loss.
                stats.dropped["no trained token left after truncation"] += 1
                continue
            kept = True
            stats.tokens += len(ex.input_ids)
            stats.trained_tokens += ex.n_trained
            out.append(ex)
        stats.kept += kept
    return out, stats


def has_reasoning(row: Row) -> bool:
    return any(m["role"] == "assistant" and ("reasoning_content" in m or "<think>" in m["content"]) for m in row.messages)
