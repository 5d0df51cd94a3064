"""The grammar of ``position_rule``: which target tokens the activations are read from, as text.

``assistant_start`` (the default), ``last_user_token``, or ``window:K``. Parsing is pure and needs no tokenizer, so it
sits in the foundation: config.py validates a rule with it (one spelling per rule, so resumes compare equal) and
inputs/positions.py resolves a parsed rule in an encoded target.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ao_resampling.errors import AOResamplingError

DEFAULT_RULE = "assistant_start"
RULE_FORMS = "'assistant_start', 'last_user_token' or 'window:K' (K a whole number >= 1)"
_WINDOW = re.compile(r"window:([0-9]+)")


class PositionError(AOResamplingError, ValueError):
    """A rule that cannot be parsed, or that names tokens outside a target's context."""


@dataclass(frozen=True)
class PositionRule:
    kind: str  # "assistant_start" | "last_user_token" | "window"
    k: int = 1  # how many tokens (and oracle placeholders): 1 except for window:K

    def __str__(self) -> str:
        return f"window:{self.k}" if self.kind == "window" else self.kind


def parse_rule(text: str) -> PositionRule:
    text = str(text).strip()
    if text in ("assistant_start", "last_user_token"):
        return PositionRule(text)
    match = _WINDOW.fullmatch(text)
    if match and int(match.group(1)) >= 1:
        return PositionRule("window", int(match.group(1)))
    raise PositionError(f"read position rule {text!r}: expected {RULE_FORMS}")
