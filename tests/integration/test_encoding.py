"""encode_target with the real Gemma 3 tokenizer and chat template.

The activation the oracle is asked about is read at ``assistant_start_idx``; if that index is off by one token, every
answer in the experiment is about the wrong position. So: properties over generated conversations, template facts
on explicit examples, the refusals, and every one of the 100 real targets.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from ao_resampling.inputs.encoding import EncodingError, encode_target


@pytest.fixture(scope="module")
def special_texts(gemma_tokenizer) -> list[str]:
    return [t.content for t in gemma_tokenizer.added_tokens_decoder.values() if t.special]


def ids_of(tokenizer, token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)


# Non-blank text: unicode, surrounding whitespace and newlines included; never the text of a special token (a user
# typing "<start_of_turn>" is a template injection problem, not an encoding one).
_text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40)
_padding = st.sampled_from(["", " ", "\n", "  \n\t", "\n\n"])
content = st.tuples(_padding, _text, _padding).map("".join).filter(str.strip)


@st.composite
def conversations(draw) -> list[dict[str, str]]:
    """Optional system message, then user/assistant alternating, starting and ending with the user."""
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(content)})
    turns = 2 * draw(st.integers(0, 2)) + 1
    for i in range(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": draw(content)})
    return messages


@settings(max_examples=40, deadline=None)
@given(messages=conversations())
@example(messages=[{"role": "system", "content": " <b>sys</b>\n"},
                   {"role": "user", "content": "½ → ∞ 😀\n\n\tx"},
                   {"role": "assistant", "content": "日本語 "},
                   {"role": "user", "content": "a<"}])
def test_encoding_properties(gemma_tokenizer, special_texts, messages):
    assume(not any(special in m["content"] for m in messages for special in special_texts))
    tok = gemma_tokenizer
    encoded = encode_target(tok, messages)
    ids = encoded.input_ids
    plain = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False),
                add_special_tokens=False)["input_ids"]

    assert ids[: len(plain)] == plain, "the encoding without the generation prompt is a prefix of the one with it"
    assert encoded.assistant_start_idx == len(plain)
    assert ids[encoded.assistant_start_idx] == ids_of(tok, "<start_of_turn>")
    assert tok.decode(ids[encoded.assistant_start_idx + 1:]) == "model\n"
    assert tok.decode(ids) == encoded.text
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert encoded.context_positions == [encoded.assistant_start_idx]


# ---------------------------------------------------------------------------------------------------------------------
# Template facts on explicit examples


def test_system_text_untrimmed_then_blank_line_then_trimmed_user_content(gemma_tokenizer):
    messages = [{"role": "system", "content": "  Be a pirate. \n"}, {"role": "user", "content": "\n  Ahoy?  \n"}]
    encoded = encode_target(gemma_tokenizer, messages)
    assert encoded.text == (
        "<bos><start_of_turn>user\n  Be a pirate. \n\n\nAhoy?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_each_turn_trimmed_and_assistant_role_is_model(gemma_tokenizer):
    messages = [
        {"role": "user", "content": " first\t"},
        {"role": "assistant", "content": "\n\nreply \n"},
        {"role": "user", "content": "  second  "},
    ]
    encoded = encode_target(gemma_tokenizer, messages)
    assert encoded.text == (
        "<bos><start_of_turn>user\nfirst<end_of_turn>\n"
        "<start_of_turn>model\nreply<end_of_turn>\n"
        "<start_of_turn>user\nsecond<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert "assistant" not in encoded.text


def test_assistant_start_idx_on_a_known_example(gemma_tokenizer):
    encoded = encode_target(gemma_tokenizer, [{"role": "user", "content": "hi"}])
    tokens = gemma_tokenizer.convert_ids_to_tokens(encoded.input_ids)
    assert tokens[:3] == ["<bos>", "<start_of_turn>", "user"]
    assert tokens[encoded.assistant_start_idx:] == ["<start_of_turn>", "model", "\n"]
    assert tokens[encoded.assistant_start_idx - 2:encoded.assistant_start_idx] == ["<end_of_turn>", "\n"]


# ---------------------------------------------------------------------------------------------------------------------
# Refusals


class NoTemplateTokenizer:
    chat_template = None


class WrappedTokenizer:
    """The real tokenizer, with apply_chat_template replaced: the fakes below misbehave in one way each."""

    def __init__(self, tokenizer, render):
        self._tokenizer, self._render = tokenizer, render
        self.chat_template = tokenizer.chat_template

    def apply_chat_template(self, messages, *, tokenize, add_generation_prompt):
        return self._render(self._tokenizer, messages, add_generation_prompt)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)


def ignores_generation_prompt(tok, messages, add_generation_prompt):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def rewrites_the_end_with_the_prompt(tok, messages, add_generation_prompt):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return text.removesuffix("<end_of_turn>\n") + "!<start_of_turn>model\n" if add_generation_prompt else text


USER_ONLY = [{"role": "user", "content": "hello"}]


def test_tokenizer_without_chat_template_is_refused():
    with pytest.raises(EncodingError, match="no chat template"):
        encode_target(NoTemplateTokenizer(), USER_ONLY)


@pytest.mark.parametrize(
    "render, message",
    [
        pytest.param(ignores_generation_prompt, "ignores add_generation_prompt", id="ignores_add_generation_prompt"),
        pytest.param(rewrites_the_end_with_the_prompt, "not a prefix", id="generation_prompt_changes_earlier_tokens"),
    ],
)
def test_untrustworthy_template_is_refused(gemma_tokenizer, render, message):
    with pytest.raises(EncodingError, match=message) as info:
        encode_target(WrappedTokenizer(gemma_tokenizer, render), USER_ONLY, target_id="t42")
    assert "'t42'" in str(info.value), "the message names the target"


# ---------------------------------------------------------------------------------------------------------------------
# The real experiment's targets


def test_all_real_targets_land_on_start_of_turn(gemma_tokenizer, shared_data):
    targets = json.loads((shared_data / "target_model_queries.json").read_text())
    assert len(targets) == 100
    start_of_turn = ids_of(gemma_tokenizer, "<start_of_turn>")
    for target in targets:
        encoded = encode_target(gemma_tokenizer, target["messages"], target_id=target["id"])
        assert encoded.input_ids[encoded.assistant_start_idx] == start_of_turn, target["id"]
        assert gemma_tokenizer.decode(encoded.input_ids[encoded.assistant_start_idx:]) == "<start_of_turn>model\n"
