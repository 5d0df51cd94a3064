"""store.py: atomic writes, the journal a killed run resumes from (torn last line tolerated, torn middle line fatal,
replay idempotent), and its typed, versioned events: built by the constructors, read back as the same events, lines
written before events had a version still replayed, and a bad line named by its file and line."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from ao_resampling import store as store_mod
from ao_resampling.errors import describe_problems
from ao_resampling.results import Decoding, Response, ResultsError, SpreadMetrics, load_results_file
from ao_resampling.events import (
    JOURNAL_VERSION, baseline_clusters_event, baseline_judge_event, baseline_responses_event, baseline_spread_event,
    judge_call_event, judge_event, responses_event, spread_event,
)
from ao_resampling.store import Journal, ResultsStore, atomic_write_text
from tests.support.results_factory import DECODING, cluster_record, judge_record, make_results

RUN = "run__t1__q1"
ANSWERS = [Response(sample_id=f"{RUN}__s00", text="an answer — ünïcode", decoding=DECODING, n_tokens=3,
                    finish_reason="eos")]
SPREAD = SpreadMetrics(embedding_model="none", distinct_fraction=0.5, mean_jaccard=0.25)


def _responses_event(run_id: str, texts: list[str], decoding: Decoding = DECODING) -> dict:
    """Answers made with the plan's decoding (the factory's), unless told otherwise."""
    return {"type": "responses", "run_id": run_id,
            "responses": [Response(sample_id=f"{run_id}__s{i:02d}", text=t, decoding=decoding).model_dump(mode="json")
                          for i, t in enumerate(texts)]}


def _judge_event(run_id: str, score: int) -> dict:
    return {"type": "judge", "run_id": run_id,
            "record": judge_record(score, call_id=f"judge__{run_id}").model_dump(mode="json")}


@pytest.fixture
def store(tmp_path):
    """A folder holding a 2 x 2 plan with no answers and no verdicts yet."""
    plan = make_results([[None, None], [None, None]], answers=lambda t, q, c: ())
    store = ResultsStore(tmp_path / "run")
    store.write(plan)
    return store


# ---------------------------------------------------------------------------------------------------------------------
# Atomic writes


@pytest.mark.parametrize("failing", ["os.replace", "os.fsync"])
def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch, failing):
    path = tmp_path / "results.json"
    path.write_text("old contents\n")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(store_mod.os, failing.split(".")[1], boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "new contents " * 10_000)
    monkeypatch.undo()

    assert path.read_text() == "old contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temp file left behind


def test_results_file_is_not_private(tmp_path):
    old = os.umask(0o022)
    try:
        store = ResultsStore(tmp_path)
        store.write(make_results([[5]]))
    finally:
        os.umask(old)
    mode = stat.S_IMODE(store.results_path.stat().st_mode)
    assert mode != 0o600  # mkstemp's default, which would hide results from the rest of a team
    assert mode == 0o644


# ---------------------------------------------------------------------------------------------------------------------
# Journal


def test_journal_replay_compact_and_idempotence(store):
    store.journal.append(_responses_event("run__t1__q1", ["a", "b"]))
    store.journal.append_many([_responses_event("run__t2__q2", ["c", "c"]), _judge_event("run__t1__q1", 7)])
    store.journal.append(_responses_event("run__t1__q1", ["a2", "b2"]))  # a redone unit: the last one wins

    loaded = store.load()
    by_id = loaded.run_by_id()
    assert [r.text for r in by_id["run__t1__q1"].responses] == ["a2", "b2"]
    assert [r.text for r in by_id["run__t2__q2"].responses] == ["c", "c"]
    assert by_id["run__t1__q1"].judge.score == 7
    assert by_id["run__t1__q2"].responses == [] and by_id["run__t1__q2"].judge is None
    assert store.load() == loaded  # reading twice is the same

    journal_text = store.journal.path.read_text()
    compacted = store.compact()
    assert compacted == loaded
    assert store.journals() == []
    assert load_results_file(store.results_path) == loaded

    # Killed after the write but before the journal was removed: replaying it over the folded file changes nothing.
    store.journal.path.write_text(journal_text)
    assert store.load() == loaded


def _repeat_event(run_id: str, call: int, score: int) -> dict:
    return {"type": "judge_repeat", "run_id": run_id,
            "record": judge_record(score, call_id=f"repeat__{run_id}__{call}").model_dump(mode="json")}


def test_judge_repeat_replay_is_idempotent(store):
    store.journal.append_many([_repeat_event("run__t1__q1", 1, 4), _repeat_event("run__t1__q1", 2, 6),
                               _repeat_event("run__t1__q1", 1, 9)])  # call 1 redone: it replaces, keeps one copy
    loaded = store.load()
    repeats = loaded.run_by_id()["run__t1__q1"].judge_repeats
    assert [(r.judge_call_id, r.score) for r in repeats] == [("repeat__run__t1__q1__2", 6),
                                                            ("repeat__run__t1__q1__1", 9)]
    journal_text = store.journal.path.read_text()
    assert store.compact() == loaded
    store.journal.path.write_text(journal_text)  # killed between the fold and the journal's removal
    assert store.load() == loaded


def test_torn_last_line_is_reported_and_skipped(store):
    store.journal.append(_responses_event("run__t1__q1", ["a", "b"]))
    torn = json.dumps(_responses_event("run__t2__q1", ["c", "d"]))[:40]
    with open(store.journal.path, "a") as f:
        f.write(torn)  # killed mid-write: no newline

    with pytest.warns(UserWarning, match=rf"{re.escape(str(store.journal.path))}.*line 2 is incomplete"):
        loaded = store.load()
    assert [r.text for r in loaded.run_by_id()["run__t1__q1"].responses] == ["a", "b"]
    assert loaded.run_by_id()["run__t2__q1"].responses == []


def test_appending_after_a_torn_line_keeps_the_journal_readable(store):
    """The resumed run appends after the fragment a kill left; that must not make the fragment a middle line."""
    store.journal.append(_responses_event("run__t1__q1", ["a", "b"]))
    with open(store.journal.path, "a") as f:
        f.write('{"type":"responses","run_id":"run__t2')
    store.journal.append(_responses_event("run__t2__q1", ["c", "d"]))

    loaded = store.load()
    assert [r.text for r in loaded.run_by_id()["run__t2__q1"].responses] == ["c", "d"]
    assert [r.text for r in loaded.run_by_id()["run__t1__q1"].responses] == ["a", "b"]


def test_complete_last_event_without_its_newline_is_kept_on_append(store):
    with open(store.journal.path, "w") as f:
        f.write(json.dumps(_responses_event("run__t1__q1", ["a", "b"])))  # killed just before the newline
    store.journal.append(_responses_event("run__t2__q1", ["c", "d"]))
    loaded = store.load()
    assert [r.text for r in loaded.run_by_id()["run__t1__q1"].responses] == ["a", "b"]
    assert [r.text for r in loaded.run_by_id()["run__t2__q1"].responses] == ["c", "d"]


def test_torn_middle_line_is_an_error(store):
    good = json.dumps(_responses_event("run__t1__q1", ["a", "b"]))
    store.journal.path.write_text(good + "\n" + good[:30] + "\n" + good + "\n")
    with pytest.raises(ResultsError, match=rf"{re.escape(str(store.journal.path))}: line 2 is not valid JSON"):
        store.load()


def test_event_for_an_unknown_run_is_an_error(store):
    store.journal.append(_responses_event("run__t9__q9", ["a"]))
    with pytest.raises(ResultsError, match=rf"{re.escape(str(store.journal.path))}.*run__t9__q9.*not in the plan"):
        store.load()


def test_malformed_event_names_the_journal(store):
    store.journal.append({"type": "responses", "run_id": "run__t1__q1", "responses": [{"text": "no id"}]})
    with pytest.raises(ResultsError, match=rf"{re.escape(str(store.journal.path))}: event 1"):
        store.load()


def test_rank_journals_are_all_replayed(store):
    Journal(store.folder / "journal.rank0.jsonl").append(_responses_event("run__t1__q1", ["a"]))
    Journal(store.folder / "journal.rank1.jsonl").append(_responses_event("run__t2__q2", ["b"]))
    by_id = store.load().run_by_id()
    assert by_id["run__t1__q1"].responses[0].text == "a"
    assert by_id["run__t2__q2"].responses[0].text == "b"


# ---------------------------------------------------------------------------------------------------------------------
# One read per command: the store's copy, kept current by record


def test_recorded_events_are_in_the_stores_copy_as_a_replay_reads_them(store):
    """Every kind of event, recorded one call at a time as the stages do: the store's one copy (read once) then holds
    what a fresh read of the folder replays, and compact writes that copy."""
    copy = store.results
    for event in [responses_event(RUN, ANSWERS), judge_call_event("judge", RUN, judge_record("timeout", call_id="j")),
                  judge_call_event("judge", RUN, judge_record(7, call_id="j")),
                  judge_call_event("judge_repeat", RUN, judge_record(6, call_id="j__rep1")),
                  spread_event(RUN, SPREAD), baseline_responses_event("baseline__t1", "t1", ANSWERS, {"n": 1}),
                  baseline_judge_event("baseline__t1", "t1", judge_record(4, call_id="b")),
                  baseline_spread_event("baseline__t1", "t1", SPREAD)]:
        store.record([event])

    assert store.results is copy  # kept current, never read again
    run = copy.run_by_id()[RUN]
    assert [a.text for a in run.responses] == ["an answer — ünïcode"] and run.spread == SPREAD
    assert run.judge.score == 7 and [f.failure.reason for f in run.judge.previous_failures] == ["timeout"]
    assert [r.score for r in run.judge_repeats] == [6] and copy.baseline.runs[0].judge.score == 4
    assert copy == ResultsStore(store.folder).load()
    assert store.compact() is copy and store.journals() == []
    assert load_results_file(store.results_path) == copy


def test_compact_keeps_the_journals_its_copy_never_saw(store):
    """A journal written by another process (a torchrun rank) after the store read the folder: compacting the stale
    copy would drop its events, so it is refused until the store reads the folder again."""
    store.record([judge_call_event("judge", RUN, judge_record(7, call_id="j"))])
    ResultsStore(store.folder, journal_name="journal.rank1.jsonl").journal.append(spread_event("run__t2__q2", SPREAD))
    with pytest.raises(RuntimeError, match=r"reload\(\) before compact"):
        store.compact()
    assert [p.name for p in store.journals()] == ["journal.jsonl", "journal.rank1.jsonl"]
    store.reload()
    store.compact()
    folded = load_results_file(store.results_path).run_by_id()
    assert folded[RUN].judge.score == 7 and folded["run__t2__q2"].spread == SPREAD and store.journals() == []


def test_cluster_calls_replay_keeping_earlier_failures_and_idempotently(store):
    """A failed cluster call, then its retry: the retry stands, the failure is kept in previous_failures; repeats
    replace their own call; the baseline's cluster call lands on its baseline run. Replaying again changes nothing."""
    failed, ok = cluster_record("invalid_json", call_id="c"), cluster_record([0, 0, 1], call_id="c")
    rep1, rep1_again = cluster_record([0, 1, 1], call_id="c__rep1"), cluster_record([0, 0, 0], call_id="c__rep1")
    three = [a.model_copy(update={"sample_id": f"{RUN}__s{i:02d}"}) for i, a in enumerate(ANSWERS * 3)]
    store.journal.append_many([
        responses_event(RUN, three),
        judge_call_event("clusters", RUN, failed), judge_call_event("clusters", RUN, ok),
        judge_call_event("clusters_repeat", RUN, rep1), judge_call_event("clusters_repeat", RUN, rep1_again),
        baseline_responses_event("baseline__t1", "t1", ANSWERS, {"n": 1}),
        baseline_clusters_event("baseline__t1", "t1", cluster_record([0])),
    ])
    loaded = store.load()
    run = loaded.run_by_id()[RUN]
    assert run.clusters.parsed.labels == [0, 0, 1] and run.clusters.previous_failures == [failed]
    assert [r.parsed.labels for r in run.cluster_repeats] == [[0, 0, 0]]
    assert loaded.baseline.runs[0].clusters.parsed.sizes == [1]
    assert run.judge is None  # a cluster call is not a verdict
    journal_text = store.journal.path.read_text()
    assert store.compact() == loaded
    store.journal.path.write_text(journal_text)  # killed between the fold and the journal's removal
    assert store.load() == loaded


def test_a_journal_replayed_after_its_fold_keeps_each_earlier_failure_once(store):
    """Killed between compact's write and the journal's removal: the failed call and its retry replay over a file
    that already holds them. The failure stays in previous_failures once (it was added a second time before)."""
    store.journal.append_many([judge_event(RUN, judge_record("timeout", call_id="j")),
                               judge_event(RUN, judge_record(7, call_id="j"))])
    journal_text = store.journal.path.read_text()
    folded = store.compact()
    store.journal.path.write_text(journal_text)
    again = store.load()
    assert [f.failure.reason for f in again.run_by_id()[RUN].judge.previous_failures] == ["timeout"]
    assert again == folded


def test_judge_call_event_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="not a judge call's event"):
        judge_call_event("baseline_judge", RUN, judge_record(7))


# ---------------------------------------------------------------------------------------------------------------------
# Typed events


@pytest.mark.parametrize("event, kind", [
    pytest.param(responses_event(RUN, ANSWERS), "responses", id="responses"),
    pytest.param(judge_event(RUN, judge_record(7)), "judge", id="judge"),
    pytest.param(judge_event(RUN, judge_record("timeout"), repeat=True), "judge_repeat", id="judge_repeat"),
    pytest.param(spread_event(RUN, SPREAD), "spread", id="spread"),
    pytest.param(judge_call_event("clusters", RUN, cluster_record([0, 1, 0])), "clusters", id="clusters"),
    pytest.param(judge_call_event("clusters_repeat", RUN, cluster_record("not_a_partition")), "clusters_repeat",
                 id="clusters_repeat"),
    pytest.param(baseline_clusters_event("baseline__t1", "t1", cluster_record([0, 0])), "baseline_clusters",
                 id="baseline_clusters"),
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
    decoding = ('{"temperature":0.7,"top_p":0.9,"max_new_tokens":120,"do_sample":true,"seed":0,"top_k":null,'
                '"eos_token_ids":null}')  # the plan's (the factory's)
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
    by_id = results.run_by_id()
    t1, t2 = by_id["run__t1__q1"], by_id["run__t2__q1"]
    assert [r.text for r in t1.responses] == ["old"] and t1.responses[0].decoding.top_p == 0.9
    assert t1.judge.score == 9 and t1.judge.latency_s == 0.5
    assert t2.spread.distinct_fraction == 0.5 and t2.responses == []
    assert results.baseline.meta == {"n": 2} and results.baseline.runs[0].target_id == "t1"
    store.compact(results)
    assert ResultsStore(store.folder).load() == results  # folded in: the file holds what the old journal said


@pytest.mark.parametrize("made_with, field, values", [
    pytest.param(dict(temperature=1.3), "responses.0.decoding.temperature", "1.3, but the plan (meta.decoding) has "
                 "0.7", id="other_temperature"),
    pytest.param(dict(max_new_tokens=8), "responses.0.decoding.max_new_tokens", "8, but the plan (meta.decoding) has "
                 "120", id="other_length"),
    pytest.param(dict(seed=5), "responses.0.decoding.seed", "5, but the plan (meta.decoding) has 0", id="other_seed"),
])
def test_answers_made_with_other_decoding_are_not_folded_in(store, made_with, field, values):
    store.journal.append(_judge_event("run__t2__q1", 6))
    store.journal.append(_responses_event(RUN, ["a", "b"], decoding=DECODING.model_copy(update=made_with)))
    before = store.results_path.read_text()
    with pytest.raises(ResultsError) as info:
        store.load()
    assert str(info.value).startswith(f"{store.journal.path}: event 2: field '{field}' of run_id '{RUN}': {values}")
    with pytest.raises(ResultsError):
        store.compact()
    assert store.results_path.read_text() == before and store.journal.path.exists()


def test_answers_of_another_sample_count_are_not_folded_in(store):
    results = store.load()
    results.meta.config = {"samples_per_query": 3}
    store.write(results)
    store.journal.append(_responses_event(RUN, ["a", "b", "c"]))
    assert [r.text for r in store.load().run_by_id()[RUN].responses] == ["a", "b", "c"]
    store.journal.append(_responses_event("run__t2__q1", ["a", "b"]))
    with pytest.raises(ResultsError, match=re.escape(
            f"{store.journal.path}: event 2: field 'responses' of run_id 'run__t2__q1': 2 answers, but the plan "
            "(meta.config.samples_per_query) has 3")):
        store.load()


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


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"")), chunk=st.integers(1, 64))
def test_the_last_line_is_found_from_the_end_a_chunk_at_a_time(tmp_path_factory, data, chunk):
    path = tmp_path_factory.mktemp("tail") / "journal.jsonl"
    path.write_bytes(data)
    with open(path, "rb") as f:
        assert Journal._last_line_start(f, len(data), chunk=chunk) == data.rfind(b"\n") + 1


def test_a_torn_line_longer_than_a_read_chunk_is_cut_off(store):
    store.journal.append(_responses_event("run__t1__q1", ["a", "b"]))
    with open(store.journal.path, "a") as f:
        f.write('{"type":"responses","run_id":"run__t2__q1","responses":["' + "x" * 200_000)  # > 64 KiB torn
    store.journal.append(_responses_event("run__t2__q1", ["c", "d"]))
    loaded = store.load()
    assert [r.text for r in loaded.run_by_id()["run__t2__q1"].responses] == ["c", "d"]
    assert [r.text for r in loaded.run_by_id()["run__t1__q1"].responses] == ["a", "b"]
