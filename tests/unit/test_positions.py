"""Read-position rules (positions.py), the config field that names one, and old results files without one.

Pure: no tokenizer, no model. Where the rules land in a real Gemma 3 encoding is tested in
tests/integration/test_sweep.py.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ao_resampling.config import ConfigError, build_config
from ao_resampling.inputs.positions import Landmarks, resolve
from ao_resampling.position_rules import PositionError, PositionRule, parse_rule
from ao_resampling.results import Results, SCHEMA_VERSION


@pytest.mark.parametrize("text, rule", [
    pytest.param("assistant_start", PositionRule("assistant_start"), id="assistant_start"),
    pytest.param("last_user_token", PositionRule("last_user_token"), id="last_user_token"),
    pytest.param("window:1", PositionRule("window", 1), id="window_1"),
    pytest.param(" window:12 ", PositionRule("window", 12), id="window_12_spaces"),
])
def test_parse_rule_accepts_the_three_forms(text, rule):
    assert parse_rule(text) == rule
    assert str(parse_rule(text)) == text.strip()


@pytest.mark.parametrize("text", [
    pytest.param("window:0", id="window_zero"), pytest.param("window:", id="window_no_k"),
    pytest.param("window:-2", id="window_negative"), pytest.param("window:2.5", id="window_float"),
    pytest.param("assistant", id="unknown"), pytest.param("", id="empty"),
])
def test_parse_rule_rejects_other_text_naming_it(text):
    with pytest.raises(PositionError, match="expected 'assistant_start', 'last_user_token' or 'window:K'"):
        parse_rule(text)


@st.composite
def landmarks(draw):
    n = draw(st.integers(2, 400))
    a = draw(st.integers(1, n - 1))
    return Landmarks(n_tokens=n, assistant_start_idx=a, last_user_token_idx=draw(st.integers(0, a - 1)))


rules = st.one_of(st.sampled_from([PositionRule("assistant_start"), PositionRule("last_user_token")]),
                  st.integers(1, 64).map(lambda k: PositionRule("window", k)))


@settings(max_examples=150, deadline=None)
@given(marks=landmarks(), rule=rules)
def test_every_rule_reads_inside_the_context_or_says_it_cannot(marks, rule):
    try:
        indices = resolve(rule, marks)
    except PositionError as e:  # only a window reaching before the first token may fail
        assert rule.kind == "window" and rule.k > marks.assistant_start_idx + 1
        assert "outside" in str(e)
        return
    assert all(0 <= i < marks.n_tokens for i in indices)
    assert len(indices) == rule.k
    expected = {"assistant_start": [marks.assistant_start_idx], "last_user_token": [marks.last_user_token_idx],
                "window": list(range(marks.assistant_start_idx + 1 - rule.k, marks.assistant_start_idx + 1))}
    assert indices == expected[rule.kind]


def test_window_as_long_as_the_prefix_fits_one_longer_does_not():
    marks = Landmarks(n_tokens=10, assistant_start_idx=6, last_user_token_idx=3)
    assert resolve(PositionRule("window", 7), marks) == [0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(PositionError, match="target 't1'.*window:8 reads tokens -1..6"):
        resolve(PositionRule("window", 8), marks, target_id="t1")


def test_last_user_token_not_located_is_an_error_not_a_guess():
    with pytest.raises(PositionError, match="last user token"):
        resolve(PositionRule("last_user_token"), Landmarks(10, 6, None))


def test_config_position_rule_is_validated_and_spelled_one_way():
    assert build_config(overrides={"position_rule": " window:3"}).position_rule == "window:3"
    assert build_config().position_rule == "assistant_start"
    with pytest.raises(ConfigError, match="field 'position_rule'.*window:K"):
        build_config(overrides={"position_rule": "window:zero"})


def test_a_results_file_without_position_rules_loads_as_assistant_start():
    run = {"run_id": "run__t1__q1", "target_id": "t1", "ao_question_id": "q1", "assistant_start_idx": 5,
           "context_positions": [5], "context_input_ids": [2, 3, 4, 5, 6, 7], "context_input_ids_sha256": "0" * 64,
           "oracle_input_ids": [2, 9, 9], "placeholder_positions": [1]}
    old = {"schema_version": 1, "meta": {"model": "m"}, "ao_questions": [{"id": "q1", "text": "?"}],
           "targets": [{"id": "t1", "messages": [{"role": "user", "content": "hi"}]}], "runs": [run]}
    for data in (old, {k: v for k, v in old.items() if k != "schema_version"}):  # version-1 files and the v0 format
        loaded = Results.model_validate(json.loads(json.dumps(data)))
        assert loaded.runs[0].position_rule == "assistant_start"
        assert loaded.runs[0].context_positions == [5]
        assert loaded.schema_version == SCHEMA_VERSION == 3  # migrated, and written back as the current version
