"""Chat-template encoding of a target conversation, and where its assistant turn starts.

``assistant_start_idx`` is the length of the encoding *without* the generation prompt, i.e. the index of the
``<start_of_turn>`` that opens the model's turn in the encoding *with* it. The activation the oracle is asked about
is read there. The template already adds ``<bos>``, so text is tokenized with ``add_special_tokens=False``; a second
``<bos>`` would shift every index by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ao_resampling.errors import AOResamplingError


class EncodingError(AOResamplingError, ValueError):
    """The tokenizer cannot give a trustworthy assistant_start_idx for this conversation."""


@dataclass(frozen=True)
class EncodedTarget:
    input_ids: list[int]  # with the generation prompt: what the base model reads
    assistant_start_idx: int  # == len(encoding without the generation prompt)
    text: str  # the rendered template with the generation prompt

    @property
    def context_positions(self) -> list[int]:
        return [self.assistant_start_idx]


def require_chat_template(tokenizer: Any, where: str = "tokenizer") -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise EncodingError(
            f"{where} has no chat template; pass a tokenizer that has one (e.g. google/gemma-3-27b-it) or use "
            "'gemma3-270m-gguf', for which Gemma 3's template is supplied"
        )


def render(tokenizer: Any, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
    )


def tokenize(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_target(tokenizer: Any, messages: Sequence[dict[str, str]], *, target_id: str = "<target>") -> EncodedTarget:
    """Encode with and without the generation prompt and check the second is an exact, shorter prefix."""
    require_chat_template(tokenizer)
    text_gen = render(tokenizer, messages, add_generation_prompt=True)
    text_plain = render(tokenizer, messages, add_generation_prompt=False)
    ids_gen = tokenize(tokenizer, text_gen)
    ids_plain = tokenize(tokenizer, text_plain)
    if len(ids_gen) <= len(ids_plain):
        raise EncodingError(
            f"target {target_id!r}: the encoding with the generation prompt ({len(ids_gen)} tokens) is not longer "
            f"than without it ({len(ids_plain)}); the chat template ignores add_generation_prompt"
        )
    if ids_gen[: len(ids_plain)] != ids_plain:
        first = next(i for i, (a, b) in enumerate(zip(ids_gen, ids_plain)) if a != b)
        raise EncodingError(
            f"target {target_id!r}: the encoding without the generation prompt is not a prefix of the one with it "
            f"(first difference at token {first}); assistant_start_idx would point at the wrong token"
        )
    return EncodedTarget(input_ids=ids_gen, assistant_start_idx=len(ids_plain), text=text_gen)
