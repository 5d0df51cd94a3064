"""The journal's typed, versioned events (store.py): built by the constructors, read back as the same events, lines
written before events had a version still replayed, and a bad line named by its file and line."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import BaseModel, ValidationError

from ao_resampling.errors import describe_problems
from ao_resampling.results import Decoding, Response, ResultsError, SpreadMetrics
from ao_resampling.store import (
    JOURNAL_VERSION, Journal, ResultsStore, baseline_judge_event, baseline_responses_event, baseline_spread_event,
    judge_event, responses_event, spread_event,
)
from tests.support.results_factory import judge_record, make_results

RUN = "run__t1__q1"
DECODING = Decoding(temperature=0.7, top_p=0.9, max_new_tokens=8, seed=0)
ANSWERS = [Response(sample_id=f"{RUN}__s00", text="an answer — ünïcode", decoding=DECODING, n_tokens=3,
                    finish_reason="eos")]
SPREAD = SpreadMetrics(embedding_model="none", distinct_fraction=0.5, mean_jaccard=0.25)


@pytest.fixture
def store(tmp_path):
    """A folder holding a 2 x 1 plan with no answers and no verdicts yet."""
    store = ResultsStore(tmp_path / "run")
    store.write(make_results([[None], [None]], answers=lambda t, q, c: ()))
    return store


# ---------------------------------------------------------------------------------------------------------------------
# Typed events


@pytest.mark.parametrize("event, kind", [
    pytest.param(responses_event(RUN, ANSWERS), "responses", id="responses"),
    pytest.param(judge_event(RUN, judge_record(7)), "judge", id="judge"),
    pytest.param(judge_event(RUN, judge_record("timeout"), repeat=True), "judge_repeat", id="judge_repeat"),
    pytest.param(spread_event(RUN, SPREAD), "spread", id="spread"),
    pytest.param(baseline_responses_event("baseline__t1", "t1", ANSWERS, {"n": 2}), "baseline_responses",
                 id="baseline_responses"),
    pytest.param(baseline_judge_event("baseline__t1", "t1", judge_record(4)), "baseline_judge", id="baseline_judge"),
    pytest.param(baseline_spread_event("baseline__t1", "t1", SPREAD), "baseline_spread", id="baseline_spread"),
])
def test_every_event_is_versioned_and_reads_back_as_itself(tmp_path, event, kind):
    journal = Journal(tmp_path / "journal.jsonl")
    journal.append(event)
    line = json.loads(journal.path.read_text())
    assert line["type"] == kind and line["v"] == JOURNAL_VERSION == 1
    assert list(journal.events()) == [event]


def test_journal_lines_written_before_events_had_a_version_still_replay(store):
    # Lines exactly as the tool wrote them before typed events (no "v"), one with a key replay then ignored.
    decoding = ('{"temperature":0.7,"top_p":0.9,"max_new_tokens":8,"do_sample":true,"seed":0,"top_k":null,'
                '"eos_token_ids":null}')
    record = ('{"judge_call_id":"judge__run__t1__q1","model":"gpt-5-mini","prompt":"p","raw_output":"{}",'
              '"parsed":{"similarity_1_to_10":9,"rationale":"close"},"failure":null,"api":"chat",'
              '"answer_order":null,"latency_s":0.5,"created_at":null,"previous_failures":[]}')
    old_lines = [
        '{"type":"responses","run_id":"run__t1__q1","responses":[{"sample_id":"run__t1__q1__s00","text":"old",'
        f'"decoding":{decoding},"n_tokens":3,"finish_reason":"eos"}}]}}',
        f'{{"type":"judge","run_id":"run__t1__q1","record":{record},"written_by":"an older version"}}',
        '{"type":"spread","run_id":"run__t2__q1","spread":{"embedding_model":"none","embedding_mean_cosine":null,'
        '"distinct_fraction":0.5,"mean_jaccard":0.25}}',
        '{"type":"baseline_responses","run_id":"baseline__t1","target_id":"t1","responses":[],"meta":{"n":2}}',
    ]
    store.journal.path.write_text("\n".join(old_lines) + "\n")

    results = store.load()
    t1, t2 = results.runs
    assert [r.text for r in t1.responses] == ["old"] and t1.responses[0].decoding.top_p == 0.9
    assert t1.judge.score == 9 and t1.judge.latency_s == 0.5
    assert t2.spread.distinct_fraction == 0.5 and t2.responses == []
    assert results.baseline.meta == {"n": 2} and results.baseline.runs[0].target_id == "t1"
    store.compact(results)
    assert ResultsStore(store.folder).load() == results  # folded in: the file holds what the old journal said


@pytest.mark.parametrize("line, problem", [
    pytest.param({"type": "judge", "run_id": RUN, "record": {**judge_record(7).model_dump(mode="json"),
                                                             "parsed": {"similarity_1_to_10": 11, "rationale": "x"}}},
                 "field 'record.parsed.similarity_1_to_10'", id="score_out_of_range"),
    pytest.param({"type": "spread", "spread": SPREAD.model_dump(mode="json")}, "field 'run_id': Field required",
                 id="missing_run_id"),
    pytest.param({"type": "verdict", "run_id": RUN}, "'verdict'", id="unknown_type"),
    pytest.param({"v": 1, "type": "spread", "run_id": RUN, "spread": {}, "colour": "red"}, "field 'colour'",
                 id="unknown_key_in_a_versioned_line"),
    pytest.param({"v": 2, "type": "spread", "run_id": RUN, "spread": {}}, "version 2 is not one this tool reads",
                 id="newer_version"),
    pytest.param({"v": "1", "type": "spread", "run_id": RUN, "spread": {}}, "field 'v'", id="version_not_int"),
    pytest.param([1, 2], "expected a JSON object", id="not_an_object"),
])
def test_a_bad_line_is_named_by_file_and_line(store, line, problem):
    store.journal.append(responses_event(RUN, ANSWERS))
    text = store.journal.path.read_text() + "\n" + json.dumps(line) + "\n"  # a blank line: event 2 is on line 3
    store.journal.path.write_text(text)
    with pytest.raises(ResultsError) as info:
        store.load()
    message = str(info.value)
    assert message.startswith(f"{store.journal.path}: event 2 (line 3): ")
    assert problem in message


def test_constructors_refuse_what_replay_would_refuse():
    with pytest.raises(ValidationError, match="sample_id"):
        responses_event(RUN, [{"text": "no id", "decoding": DECODING.model_dump()}])


# ---------------------------------------------------------------------------------------------------------------------
# One wording of a ValidationError


class _Three(BaseModel):
    a: int
    b: int
    c: int


def test_describe_problems_names_every_field_up_to_the_limit():
    with pytest.raises(ValidationError) as info:
        _Three(a="x", b="y", c="z")
    assert describe_problems(info.value) == (
        "field 'a': Input should be a valid integer, unable to parse string as an integer; "
        "field 'b': Input should be a valid integer, unable to parse string as an integer; "
        "field 'c': Input should be a valid integer, unable to parse string as an integer")
    assert re.fullmatch(r"field 'a': [^;]*; field 'b': [^;]* \(3 problems in all\)",
                        describe_problems(info.value, limit=2))
    with pytest.raises(ValidationError) as info:
        _Three.model_validate([1])
    assert describe_problems(info.value, root="<config>").startswith("field '<config>': ")
