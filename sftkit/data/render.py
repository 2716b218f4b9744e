"""Render a conversation to (input_ids, labels): the one place where masks are decided.

A token is trained when its label is not -100. Every assistant reply is trained together with
the end-of-turn token that closes it (so the model learns to stop), nothing else is.

Templates rarely mark where a reply starts and ends, so spans are found by rendering prefixes:
the conversation up to a reply with the generation prompt gives the reply's start, the
conversation including the reply gives its end. Both must tokenize to a prefix of the whole
conversation's tokens; a template for which that fails is reported, never guessed around.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from .sources import DataError, Row

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


class Renderer:
    """Turns Rows into Examples with one tokenizer and template, the same way everywhere."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str = "auto", max_length: int = 1024):
        if template not in ("auto", "plain"):
            raise DataError(f"data.template: {template!r} is not one of auto, plain")
        if template == "auto" and not tokenizer.chat_template:
            raise DataError(
                "data.template=auto needs a tokenizer with a chat template, and this one has none; "
                "use data.template=plain (prompt + completion + eos) for a base model"
            )
        self.tok = tokenizer
        self.template = template
        self.max_length = max_length
        # The tokens that end a turn. Padding may share the id (pad == eos is common): labels are
        # built here, before padding, so the end of a reply stays trained either way.
        self.end_ids = {tokenizer.eos_token_id} - {None}
        self.template_name = getattr(tokenizer, "name_or_path", "") or "tokenizer"

    # -- tokenization ---------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        # The template writes its own BOS where it wants one; letting the tokenizer add another
        # would give a duplicated BOS.
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        bos = self.tok.bos_token_id
        if bos is not None and getattr(self.tok, "add_bos_token", False) and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def _chat(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Tokens that ask the model for the next assistant reply (used by generation)."""
        if self.template == "plain":
            return self._encode("".join(m["content"] for m in messages if m["role"] != "system"))
        return self._encode(self._chat(messages, generation_prompt=True))

    # -- labels ---------------------------------------------------------------------------------
    def render(self, row: Row) -> Example:
        """Full-length (untruncated) example with assistant replies and their end token trained."""
        if self.template == "plain":
            return self._render_plain(row)
        msgs = row.messages
        ids = self._encode(self._chat(msgs))
        labels = [IGNORE] * len(ids)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start = self._prefix_len(self._chat(msgs[:i], generation_prompt=True), ids, row, i)
            end = self._prefix_len(self._chat(msgs[: i + 1]), ids, row, i)
            # Train up to and including the last end-of-turn token inside the reply's span;
            # what a template writes after it (a newline) belongs to no reply.
            last_end = max((j for j in range(start, end) if ids[j] in self.end_ids), default=end - 1)
            for j in range(start, last_end + 1):
                labels[j] = ids[j]
        return Example(ids, labels, row.source, row.line)

    def _prefix_len(self, text: str, full: list[int], row: Row, turn: int) -> int:
        ids = self._encode(text)
        if full[: len(ids)] != ids:
            raise DataError(
                f"{row.source}:{row.line}: messages[{turn}]: the chat template of {self.template_name} is not "
                "prefix-consistent (rendering the conversation up to this turn does not give a prefix of the "
                "whole conversation), so the reply's tokens cannot be located; use data.template=plain or "
                "a tokenizer whose template renders earlier turns unchanged"
            )
        return len(ids)

    def _render_plain(self, row: Row) -> Example:
        ids: list[int] = []
        labels: list[int] = []
        for m in row.messages:
            if m["role"] == "system":
                continue
            part = self._encode(m["content"]) if not ids else self.tok(m["content"], add_special_tokens=False)["input_ids"]
            if m["role"] == "assistant":
                part = part + [self.tok.eos_token_id]
                labels += part
            else:
                labels += [IGNORE] * len(part)
            ids += part
        return Example(ids, labels, row.source, row.line)

    def truncate(self, ex: Example) -> tuple[Example, bool]:
        """Fit max_length: drop prompt tokens from the left first, then cut the reply's tail."""
        n = len(ex.input_ids)
        if n <= self.max_length:
            return ex, False
        excess = n - self.max_length
        first_trained = next((j for j, x in enumerate(ex.labels) if x != IGNORE), n)
        left = min(excess, first_trained)
        ids, labels = ex.input_ids[left:], ex.labels[left:]
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        return Example(ids, labels, ex.source, ex.line), True


def build_examples(rows: list[Row], renderer: Renderer) -> tuple[list[Example], RenderStats]:
    """Render, truncate and filter; every drop is counted by reason."""
    stats = RenderStats(rows=len(rows))
    out = []
    for row in rows:
        ex, cut = renderer.truncate(renderer.render(row))
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
