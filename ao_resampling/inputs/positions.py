"""Which tokens of a target conversation the activations are read from: the read-position rules.

A rule names token indices of the encoded target (with the generation prompt, as the base model reads it):

- ``assistant_start``: the ``<start_of_turn>`` that opens the model's turn (``assistant_start_idx``), the default;
- ``last_user_token``: the last token of the last user message's content (before ``<end_of_turn>``);
- ``window:K``: the K tokens ending at ``assistant_start`` (inclusive), read in order and injected at K placeholders
  of the oracle prompt (``" ?" * K``), vector k at placeholder k, as the AO prompt format allows.

The rules' grammar (``parse_rule``: text to ``PositionRule``) is position_rules.py, below the config that validates
a rule with it. ``resolve`` is pure; ``landmarks_of`` needs only a tokenizer (no model), like oracle.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ao_resampling.inputs.encoding import EncodedTarget, render, tokenize
from ao_resampling.position_rules import PositionError, PositionRule


@dataclass(frozen=True)
class Landmarks:
    """The token indices a rule can refer to, in one encoded target of ``n_tokens`` tokens."""

    n_tokens: int
    assistant_start_idx: int
    last_user_token_idx: int | None = None  # only worked out when a rule needs it


def resolve(rule: PositionRule, marks: Landmarks, *, target_id: str = "<target>") -> list[int]:
    """The token indices ``rule`` reads in one target, in injection order; every one inside the context."""
    if rule.kind == "assistant_start":
        indices = [marks.assistant_start_idx]
    elif rule.kind == "last_user_token":
        if marks.last_user_token_idx is None:
            raise PositionError(f"target {target_id!r}: its last user token was not located")
        indices = [marks.last_user_token_idx]
    else:
        indices = range(marks.assistant_start_idx - rule.k + 1, marks.assistant_start_idx + 1)
    # Checked on the range before it is listed: window:1000000000000 is refused, not a list of 10^12 ints.
    if indices[0] < 0 or indices[-1] >= marks.n_tokens:
        raise PositionError(f"target {target_id!r}: rule {rule} reads tokens {indices[0]}..{indices[-1]}, outside "
                            f"its {marks.n_tokens} tokens; use a smaller window")
    return list(indices)


# Stands in for the last user message's content to find where the template puts it; no real text holds it.
_CONTENT_MARK = "\x00ao-resampling:last-user-content\x00"


def last_user_token_index(tokenizer: Any, messages: Sequence[dict[str, str]], input_ids: Sequence[int], *,
                          target_id: str = "<target>") -> int:
    """Index of the last token of the last user message's content in ``input_ids`` (the encoding with the prompt).

    The content is located by the turn's boundaries, not by searching its text (an assistant reply that repeats the
    user's words would be found instead): the conversation is rendered again with that content replaced by a mark,
    and what the template puts before and after the mark is the same around the real content. The rendered text up
    to the content's end (its surrounding whitespace left out), tokenized alone, must be an exact prefix of the ids
    (as in oracle.py): then its last token is the one wanted.
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None or not messages[last]["content"].strip():
        raise PositionError(f"target {target_id!r}: no user message with content, so no last user token")
    text = render(tokenizer, messages, add_generation_prompt=True)
    marked = render(tokenizer, [*messages[:last], dict(messages[last], content=_CONTENT_MARK), *messages[last + 1:]],
                    add_generation_prompt=True)
    before, mark, after = marked.partition(_CONTENT_MARK)
    if not mark or _CONTENT_MARK in after or not (text.startswith(before) and text.endswith(after)):
        raise PositionError(f"target {target_id!r}: the chat template does not render the last user message's "
                            "content as given, so its last token cannot be located")
    content = text[len(before):len(text) - len(after)]
    if not content.strip():
        raise PositionError(f"target {target_id!r}: the template renders the last user message empty")
    end = len(before) + len(content.rstrip())
    head = tokenize(tokenizer, text[:end])
    if list(input_ids[: len(head)]) != head:
        raise PositionError(f"target {target_id!r}: the tokens up to the last user token are not a prefix of the "
                            "encoding (the tokenizer merges across the end of the user message)")
    return len(head) - 1


def landmarks_of(tokenizer: Any, messages: Sequence[dict[str, str]], enc: EncodedTarget, rule: PositionRule, *,
                 target_id: str = "<target>") -> Landmarks:
    """The landmarks ``rule`` needs (the last user token is located only when asked for: it costs a tokenization)."""
    last_user = (last_user_token_index(tokenizer, messages, enc.input_ids, target_id=target_id)
                 if rule.kind == "last_user_token" else None)
    return Landmarks(len(enc.input_ids), enc.assistant_start_idx, last_user)
