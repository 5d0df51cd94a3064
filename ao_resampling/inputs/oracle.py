"""The oracle's prompt, exactly as the published AO checkpoints were trained on it, and where its placeholders sit.

The single user turn is ``"Layer: {layer}\\n" + " ?" * k + " \\n" + question`` (``" ?"`` is one Gemma token), rendered
with the chat template and the generation prompt. The k placeholder tokens are where the collected activations
are injected. Everything here is pure: a tokenizer goes in, token ids and positions come out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ao_resampling.errors import AOResamplingError
from ao_resampling.inputs.encoding import render, require_chat_template, tokenize

PLACEHOLDER = " ?"


class OracleQueryError(AOResamplingError, ValueError):
    """The prompt cannot be built, or its placeholders cannot be located unambiguously."""


def oracle_prompt_text(*, layer: int, question: str, num_positions: int = 1) -> str:
    return f"Layer: {layer}\n" + PLACEHOLDER * num_positions + " \n" + question


@dataclass(frozen=True)
class OracleQuery:
    question_id: str
    input_ids: list[int]
    placeholder_positions: list[int]


def placeholder_token_id(tokenizer: Any) -> int:
    ids = tokenize(tokenizer, PLACEHOLDER)
    if len(ids) != 1:
        raise OracleQueryError(f"{PLACEHOLDER!r} is {len(ids)} tokens for this tokenizer; the AO format needs one")
    return ids[0]


def build_oracle_query(tokenizer: Any, *, layer: int, question: str, question_id: str = "<question>",
                       num_positions: int = 1) -> OracleQuery:
    """Token ids of the oracle prompt and the k placeholder positions, checked token by token."""
    require_chat_template(tokenizer)
    if num_positions < 1:
        raise OracleQueryError(f"num_positions must be >= 1, got {num_positions}")
    stripped = question.strip()
    if not stripped:
        raise OracleQueryError(f"question {question_id!r} is empty")
    if stripped.startswith("Layer:") or (PLACEHOLDER + " \n") in question:
        raise OracleQueryError(
            f"question {question_id!r} already contains the oracle prefix ('Layer: ...' / placeholders); "
            "pass the bare question, the prompt is built here"
        )
    content = oracle_prompt_text(layer=layer, question=question, num_positions=num_positions)
    text = render(tokenizer, [{"role": "user", "content": content}], add_generation_prompt=True)
    ids = tokenize(tokenizer, text)

    # The tokens before the placeholders, tokenized alone, must be an exact prefix: then the placeholders start at
    # its length. Checking the ids there (and the " \n" after them) catches any tokenizer that merges across.
    prefix = f"Layer: {layer}\n"
    head = text[: text.index(prefix) + len(prefix)]  # the template trims the content's ends, never its start
    start = len(tokenize(tokenizer, head))
    ph = placeholder_token_id(tokenizer)
    positions = list(range(start, start + num_positions))
    if ids[:start] != tokenize(tokenizer, head) or any(ids[p] != ph for p in positions):
        raise OracleQueryError(f"question {question_id!r}: placeholders not found where expected (tokens {positions})")
    after = tokenizer.decode(ids[start + num_positions: start + num_positions + 2])
    if after != " \n":
        raise OracleQueryError(
            f"question {question_id!r}: expected ' \\n' right after the placeholders, found {after!r}; the question "
            "text merges into the placeholder line"
        )
    return OracleQuery(question_id=question_id, input_ids=ids, placeholder_positions=positions)
