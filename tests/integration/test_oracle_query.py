"""build_oracle_query with the real Gemma 3 tokenizer: the AO prompt text, token for token, and its placeholders.

The published oracles were trained on ``"Layer: {layer}\\n" + " ?" * k + " \\n" + question`` in one user turn; the
activation goes in at the ``" ?"`` tokens. A prompt that differs by one token is a different experiment.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ao_resampling.inputs.oracle import (
    PLACEHOLDER,
    OracleQueryError,
    build_oracle_query,
    oracle_prompt_text,
    placeholder_token_id,
)

QUESTION = "What is the assistant's persona?"


def test_placeholder_is_one_token(gemma_tokenizer):
    ids = gemma_tokenizer(" ?", add_special_tokens=False)["input_ids"]
    assert ids == [placeholder_token_id(gemma_tokenizer)]
    assert gemma_tokenizer.decode(ids) == " ?"


@pytest.mark.parametrize("k", [pytest.param(1, id="k1"), pytest.param(3, id="k3")])
@pytest.mark.parametrize("layer", [pytest.param(9, id="layer9"), pytest.param(31, id="layer31")])
def test_prompt_text_and_placeholder_positions(gemma_tokenizer, k, layer):
    tok = gemma_tokenizer
    query = build_oracle_query(tok, layer=layer, question=QUESTION, question_id="q7", num_positions=k)

    content = f"Layer: {layer}\n" + " ?" * k + " \n" + QUESTION
    assert oracle_prompt_text(layer=layer, question=QUESTION, num_positions=k) == content
    assert tok.decode(query.input_ids) == f"<bos><start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n"
    assert query.input_ids == tok(
        tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]

    ph = placeholder_token_id(tok)
    first = query.placeholder_positions[0]
    assert query.placeholder_positions == list(range(first, first + k))
    assert [query.input_ids[p] for p in query.placeholder_positions] == [ph] * k
    assert query.input_ids.count(ph) == k, "no other ' ?' token in the prompt"
    before = tok.decode(query.input_ids[: query.placeholder_positions[0]])
    assert before == f"<bos><start_of_turn>user\nLayer: {layer}\n"
    after = query.placeholder_positions[-1] + 1
    assert tok.decode(query.input_ids[after: after + 2]) == " \n"
    assert query.question_id == "q7"


def test_known_positions_for_gemma3(gemma_tokenizer):
    # <bos> <start_of_turn> user \n Layer : ▁ 9 \n ▁? ...
    assert build_oracle_query(gemma_tokenizer, layer=9, question=QUESTION).placeholder_positions == [9]
    assert build_oracle_query(gemma_tokenizer, layer=9, question=QUESTION, num_positions=3).placeholder_positions \
        == [9, 10, 11]


# A question may itself contain "?" and " ?"; only the k placeholder tokens may be taken for placeholders.
questions = st.text(st.characters(categories=("L", "N", "P", "Zs")), min_size=1, max_size=60).map(
    lambda s: s.strip()).filter(lambda s: s and not s.startswith("Layer:"))


@settings(max_examples=30, deadline=None)
@given(question=questions, k=st.integers(1, 4), layer=st.integers(0, 61))
def test_placeholders_are_found_for_ordinary_questions(gemma_tokenizer, question, k, layer):
    query = build_oracle_query(gemma_tokenizer, layer=layer, question=question, num_positions=k)
    ph = placeholder_token_id(gemma_tokenizer)
    assert [query.input_ids[p] for p in query.placeholder_positions] == [ph] * k
    assert gemma_tokenizer.decode(query.input_ids).endswith(f"\n{question}<end_of_turn>\n<start_of_turn>model\n")


@pytest.mark.parametrize(
    "question, message",
    [
        pytest.param("Layer: 9\n ? \nWhat is it?", "already contains the oracle prefix", id="full_oracle_prompt"),
        pytest.param("  Layer: 31 what?", "already contains the oracle prefix", id="layer_prefix_after_spaces"),
        pytest.param("Tell me ? \nabout it", "already contains the oracle prefix", id="placeholder_line_inside"),
        pytest.param("", "is empty", id="empty"),
        pytest.param(" \n\t ", "is empty", id="blank"),
    ],
)
def test_bad_questions_are_refused(gemma_tokenizer, question, message):
    with pytest.raises(OracleQueryError, match=message) as info:
        build_oracle_query(gemma_tokenizer, layer=9, question=question, question_id="q3")
    assert "'q3'" in str(info.value), "the message names the question"


def test_zero_positions_is_refused(gemma_tokenizer):
    with pytest.raises(OracleQueryError, match="num_positions"):
        build_oracle_query(gemma_tokenizer, layer=9, question=QUESTION, num_positions=0)


def test_tokenizer_without_chat_template_is_refused():
    from ao_resampling.inputs.encoding import EncodingError

    class NoTemplate:
        chat_template = None

    with pytest.raises(EncodingError, match="no chat template"):
        build_oracle_query(NoTemplate(), layer=9, question=QUESTION)


def test_placeholder_constant():
    assert PLACEHOLDER == " ?"
