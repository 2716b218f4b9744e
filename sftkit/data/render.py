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

    def summary(self, name: str) -> str:
        drops = ", ".join(f"{n} {reason}" for reason, n in self.dropped.items()) or "none"
        frac = self.trained_tokens / max(self.tokens, 1)
        return (
            f"{name}: {self.rows} rows read, {self.kept} kept, dropped: {drops}; {self.truncated} truncated; "
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
}
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
                 mask: str = "auto", truncation: str = "truncate", system: str | None = None):
        if mask not in MASKS:
            raise DataError(f"data.mask: {mask!r} is not one of {', '.join(MASKS)}")
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

    def _text(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        """The one place a conversation becomes text: training, eval, generate, best-of, chat and the
        dashboard's chat all come here (through render or prompt_ids)."""
        messages = self.with_system(messages)
        if self.template == "plain":
            # Contents laid end to end, each reply closed by eos: what base-model SFT expects.
            eos = self.tok.eos_token or ""
            return "".join(m["content"] + (eos if m["role"] == "assistant" else "")
                           for m in messages if m["role"] != "system")
        kwargs = {"chat_template": self.chat_template} if self.chat_template else {}
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)

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

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Tokens that ask the model for the next assistant reply (used by generation)."""
        return self._encode(self._text(messages, generation_prompt=True))

    # -- labels ---------------------------------------------------------------------------------
    def _trained_turns(self, row: Row) -> list[int]:
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
        msgs = row.messages
        ids = self._encode(self._text(msgs))
        if self.mask == "none":
            return Example(ids, list(ids), row.source, row.line)
        labels = [IGNORE] * len(ids)
        for i in self._trained_turns(row):
            start = self._prefix_len(self._text(msgs[:i], generation_prompt=True), ids, row, i)
            end = self._prefix_len(self._text(msgs[: i + 1]), ids, row, i)
            # Train up to and including the last end-of-turn token inside the reply's span;
            # what a template writes after it (a newline) belongs to no reply.
            last_end = max((j for j in range(start, end) if ids[j] in self.end_ids), default=end - 1)
            labels[start : last_end + 1] = ids[start : last_end + 1]
        return Example(ids, labels, row.source, row.line)

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

    def fit(self, row: Row) -> tuple[Example | None, str | None, bool]:
        """The row's example within max_length by data.truncation: (example or None, drop reason, cut?).

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
                               n_prompt=max(row.n_prompt - cut, first + 1) if row.n_prompt else 0)


def build_examples(rows: list[Row], renderer: Renderer) -> tuple[list[Example], RenderStats]:
    """Render, truncate and filter; every drop is counted by reason."""
    stats = RenderStats(rows=len(rows))
    out = []
    for row in rows:
        ex, dropped, cut = renderer.fit(row)
        if ex is None:
            stats.dropped[dropped] += 1
            continue
        stats.truncated += cut
        if ex.n_trained == 0:
            # Nothing to learn from: passing it on would add a zero-token term to the loss.
            stats.dropped["no trained token left after truncation"] += 1
            continue
        stats.kept += 1
        stats.tokens += len(ex.input_ids)
        stats.trained_tokens += ex.n_trained
        out.append(ex)
    return out, stats
