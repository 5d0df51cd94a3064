"""results.py: the versioned schema (snapshotted; regenerate with `pytest --force-regen`), migration of the older
single-script format, and errors that name the file and the field. Atomic writes and the journal: test_store.py."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from ao_resampling import results as results_mod
from ao_resampling.results import (
    SCHEMA_VERSION,
    Baseline,
    BaselineRun,
    Decoding,
    JudgeFailure,
    JudgeRecord,
    Meta,
    Response,
    Results,
    ResultsError,
    SpreadMetrics,
    Verdict,
    dump_results,
    load_results_file,
    results_json_schema,
)
from tests.support.results_factory import cluster_record, judge_record, make_results, to_v0_dict


# ---------------------------------------------------------------------------------------------------------------------
# Schema


def test_json_schema_snapshot(data_regression):
    schema = results_json_schema()
    assert list(schema["properties"])[0] == "schema_version"
    data_regression.check(schema)


def test_round_trip_with_every_optional_field_set():
    full = make_results([[7, "timeout"]], repeats=lambda t, q, c: [8, "invalid_json"],
                        spread=lambda t, q, c: SpreadMetrics(embedding_model="m", embedding_mean_cosine=0.5,
                                                             distinct_fraction=1.0, mean_jaccard=0.25))
    decoding = Decoding(temperature=0.7, top_p=0.9, max_new_tokens=120, do_sample=True, seed=3, top_k=50)
    for run in full.runs:
        run.oracle_input_ids = [2, 105, 7]
        run.placeholder_positions = [1]
        run.responses = [Response(sample_id=f"{run.run_id}__s00", text="x", decoding=decoding, n_tokens=4,
                                  finish_reason="eos")]
        run.judge = run.judge.model_copy(update={"api": "chat", "answer_order": [1], "latency_s": 0.25,
                                                 "created_at": "2025-01-01T00:00:00Z"})
    full.meta = Meta(
        tool_version="0.1.0", git_commit="abc", created_at="2025-01-01T00:00:00+00:00", updated_at="later",
        model="m", oracle_lora="random", tokenizer="tok", num_layers=4, layer=2, injection_layer=1,
        steering_coefficient=1.0, decoding=decoding, question_seed=0, decode_seed=0, judge_model="j", stand_in=True,
        note="stand-in", config={"model": "m"}, extra_key_from_an_older_tool="kept",
    )
    full.baseline = Baseline(meta={"max_new_tokens": 240}, runs=[
        BaselineRun(run_id="baseline__t1", target_id="t1", responses=full.runs[0].responses,
                    judge=judge_record(6, call_id="judge__baseline__t1")),
    ])
    back = Results.model_validate(json.loads(dump_results(full)))
    assert back == full
    assert back.meta.extra_key_from_an_older_tool == "kept"
    assert back.runs[0].responses[0].decoding.top_k == 50


def test_a_judge_record_holds_exactly_one_outcome():
    common = dict(judge_call_id="c", model="m", prompt="p")
    with pytest.raises(ValueError, match="exactly one"):
        JudgeRecord(**common)
    with pytest.raises(ValueError, match="exactly one"):
        JudgeRecord(**common, parsed=Verdict(similarity_1_to_10=5, rationale="r"),
                    failure=JudgeFailure(reason="timeout", detail="d"))


# ---------------------------------------------------------------------------------------------------------------------
# Older files and bad files


def test_older_format_is_migrated(tmp_path):
    data = to_v0_dict(make_results([[9, 4], [2, None]]))
    data["runs"][1]["judge"]["parsed"] = None  # the old script stored an unparseable reply as parsed: null
    assert "schema_version" not in data and "failure" not in data["runs"][0]["judge"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))

    loaded = load_results_file(path)

    assert loaded.schema_version == SCHEMA_VERSION
    assert [r.judge.score if r.judge else None for r in loaded.runs] == [9, None, 2, None]
    unparsed = loaded.runs[1].judge
    assert unparsed.parsed is None and unparsed.failure is not None
    assert unparsed.failure.reason == "invalid_json"  # a recorded failure, never a score
    assert loaded.runs[3].judge is None
    # Once written back it is a current file, and reading it again changes nothing.
    path.write_text(dump_results(loaded))
    assert load_results_file(path) == loaded


def test_newer_schema_version_is_refused(tmp_path):
    data = make_results([[5]]).model_dump(mode="json")
    data["schema_version"] = SCHEMA_VERSION + 1
    path = tmp_path / "future.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ResultsError, match=rf"future\.json.*schema_version {SCHEMA_VERSION + 1} is newer"):
        load_results_file(path)


@pytest.mark.parametrize("version, problem", [
    pytest.param("1", "schema_version must be an integer", id="string"),
    pytest.param(None, "schema_version must be an integer", id="null"),
    pytest.param(0, "schema_version 0 is not a version of this format", id="zero"),
    pytest.param(-1, "schema_version -1 is not a version of this format", id="negative"),
])
def test_a_schema_version_that_is_no_version_is_a_results_error(tmp_path, version, problem):
    data = make_results([[5]]).model_dump(mode="json")
    data["schema_version"] = version
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ResultsError, match=rf"odd\.json.*{problem}"):
        load_results_file(path)


@pytest.mark.parametrize("score", [pytest.param(True, id="true"), pytest.param("7", id="string"),
                                   pytest.param(7.0, id="float")])
def test_a_score_that_is_not_an_integer_is_refused(tmp_path, score):
    data = make_results([[5, 6]]).model_dump(mode="json")
    data["runs"][1]["judge"]["parsed"]["similarity_1_to_10"] = score
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ResultsError, match=r"field 'runs\.1\.judge\.parsed\.similarity_1_to_10'"):
        load_results_file(path)


@pytest.mark.parametrize("field, edit", [
    pytest.param("targets", lambda d: d["targets"].append(
        {"id": "t1", "messages": [{"role": "user", "content": "Another conversation."}]}), id="target"),
    pytest.param("ao_questions", lambda d: d["ao_questions"].append({"id": "q2", "text": "Another question?"}),
                 id="question"),
])
def test_one_id_for_two_different_targets_or_questions_is_refused(tmp_path, field, edit):
    data = make_results([[5, 6], [7, 8]]).model_dump(mode="json")
    path = tmp_path / "r.json"
    same = json.loads(json.dumps(data))
    same[field].append(same[field][0])  # the same one listed twice: harmless
    path.write_text(json.dumps(same))
    load_results_file(path)
    edit(data)
    path.write_text(json.dumps(data))
    index = len(data[field]) - 1
    with pytest.raises(ResultsError, match=rf"r\.json: .*duplicate id in '{field}': {field}\[{index}\] "):
        load_results_file(path)


@pytest.mark.parametrize("edit, where", [
    pytest.param(lambda d: d["runs"][1]["responses"][2]["decoding"].update(temperature="hot"),
                 "runs.1.responses.2.decoding.temperature", id="bad_temperature"),
    pytest.param(lambda d: d["runs"][0]["judge"]["parsed"].update(similarity_1_to_10=11),
                 "runs.0.judge.parsed.similarity_1_to_10", id="score_out_of_range"),
    pytest.param(lambda d: d["targets"][0].pop("messages"), "targets.0.messages", id="missing_field"),
    pytest.param(lambda d: d["runs"][0].update(colour="red"), "runs.0.colour", id="unknown_field"),
])
def test_bad_field_names_the_file_and_the_path(tmp_path, edit, where):
    data = make_results([[5, 6]]).model_dump(mode="json")
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ResultsError) as info:
        load_results_file(path)
    assert str(path) in str(info.value)
    assert f"field '{where}'" in str(info.value)


def test_several_bad_fields_are_all_named_with_the_count(tmp_path):
    data = make_results([[5, 6]]).model_dump(mode="json")
    data["runs"][0]["colour"] = "red"
    data["runs"][1]["judge"]["parsed"]["similarity_1_to_10"] = 11
    for run in data["runs"]:
        run.pop("context_input_ids")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ResultsError) as info:
        load_results_file(path)
    message = str(info.value)
    # The first three of the four problems, each naming its field, then how many there are in all.
    assert message.startswith(f"{path}: field 'runs.0.context_input_ids': Field required; field 'runs.0.colour': ")
    assert "; field 'runs.1.context_input_ids': Field required (4 problems in all)" in message


def test_not_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"schema_version": 1,\n "meta": ')
    with pytest.raises(ResultsError, match=r"broken\.json: not valid JSON \(line 2"):
        load_results_file(path)


def test_runs_must_name_known_targets_and_questions(tmp_path):
    data = make_results([[5]]).model_dump(mode="json")
    data["runs"][0]["ao_question_id"] = "q_nowhere"
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ResultsError, match="q_nowhere"):
        load_results_file(path)


def _with_oracle_ids(d: dict) -> None:
    d["runs"][0].update(oracle_input_ids=[2, 5, 6, 7], placeholder_positions=[1, 2])


@pytest.mark.parametrize("edit, message", [
    pytest.param(lambda d: d["runs"][0].update(context_input_ids_sha256="not-a-hash"),
                 "field 'context_input_ids_sha256': expected 64 lower-case hex digits, got 'not-a-hash'",
                 id="not_a_hash"),
    pytest.param(lambda d: d["runs"][0]["context_input_ids"].__setitem__(1, 9999),
                 "field 'context_input_ids_sha256': does not match 'context_input_ids'", id="ids_changed_under_hash"),
    pytest.param(lambda d: d["runs"][0].update(assistant_start_idx=999),
                 "field 'assistant_start_idx': 999 is outside the 4 context_input_ids", id="start_past_the_end"),
    pytest.param(lambda d: d["runs"][0].update(assistant_start_idx=-1),
                 "field 'assistant_start_idx': -1 is outside", id="negative_start"),
    pytest.param(lambda d: d["runs"][0].update(context_positions=[0, 4]),
                 "field 'context_positions': [4] outside the 4 context_input_ids", id="context_position_past_end"),
    pytest.param(lambda d: (_with_oracle_ids(d), d["runs"][0].update(placeholder_positions=[-4])),
                 "field 'placeholder_positions': [-4] outside the 4 oracle_input_ids", id="negative_placeholder"),
    pytest.param(lambda d: (_with_oracle_ids(d), d["runs"][0].update(placeholder_positions=[1, 4])),
                 "field 'placeholder_positions': [4] outside", id="placeholder_past_end"),
    pytest.param(lambda d: d["runs"][0].update(oracle_input_ids=None),
                 "field 'placeholder_positions': set, but 'oracle_input_ids' is missing", id="placeholder_without_ids"),
])
def test_damaged_ids_and_indices_name_the_run_and_field(tmp_path, edit, message):
    data = make_results([[5, 6]]).model_dump(mode="json")
    _with_oracle_ids(data)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    assert load_results_file(path).runs[0].placeholder_positions == [1, 2]  # the undamaged file loads
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ResultsError) as info:
        load_results_file(path)
    assert f"{path}: runs[0] (run__t1__q1): {message}" in str(info.value)


@pytest.mark.parametrize("field", ["clusters", "cluster_repeats"])
def test_a_partition_of_another_number_of_answers_names_the_run_and_field(tmp_path, field):
    """The run has 3 answers; a partition of 1..2 (a hand-edited file, or one mixed with other answers) is refused."""
    record = cluster_record([0, 1]).model_dump(mode="json")
    data = make_results([[5, 6]]).model_dump(mode="json")
    data["runs"][0][field] = record if field == "clusters" else [record]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    where = "clusters" if field == "clusters" else "cluster_repeats[0]"
    with pytest.raises(ResultsError, match=re.escape(
            f"runs[0] (run__t1__q1): field '{where}': a partition of 2 answers, but the run has 3")):
        load_results_file(path)
    data["runs"][0][field] = cluster_record([0, 1, 0]).model_dump(mode="json") if field == "clusters" else []
    path.write_text(json.dumps(data))
    assert load_results_file(path).runs[0].run_id == "run__t1__q1"


def test_duplicate_run_id_is_refused(tmp_path):
    data = make_results([[5, 6]]).model_dump(mode="json")
    data["runs"][1] = dict(data["runs"][0])
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ResultsError, match=r"r\.json: .*duplicate run_id in 'runs': runs\[1\] \(run__t1__q1\) is "
                                           r"also runs\[0\]"):
        load_results_file(path)


def test_the_ids_hash_is_sha256_of_compact_json():
    # Files in the wild hold this hash: the format is pinned here, independently of sha256_of_ids.
    assert results_mod.sha256_of_ids([2, 105, 2364]) == hashlib.sha256(b"[2,105,2364]").hexdigest()
    assert results_mod.sha256_of_ids(iter([])) == hashlib.sha256(b"[]").hexdigest()


def test_a_file_of_the_original_script_hashed_comma_joined_ids_is_read_and_says_so(tmp_path):
    """The original resampling script hashed ``",".join(str(i) for i in ids)``: its files are not tampered with."""
    data = to_v0_dict(make_results([[5, 6]]))
    for run in data["runs"]:
        run["context_input_ids_sha256"] = hashlib.sha256(
            ",".join(str(i) for i in run["context_input_ids"]).encode("utf-8")).hexdigest()
    path = tmp_path / "original.json"
    path.write_text(json.dumps(data))

    loaded = load_results_file(path)

    assert [r.context_input_ids_hashing for r in loaded.runs] == ["comma_joined", "comma_joined"]
    path.write_text(dump_results(loaded))  # written back, it still says which hashing it holds
    assert load_results_file(path).runs[0].context_input_ids_hashing == "comma_joined"
    # Changed ids under that hash are still refused.
    data["runs"][0]["context_input_ids"][1] = 9999
    path.write_text(json.dumps(data))
    with pytest.raises(ResultsError, match=r"runs\[0\].*does not match 'context_input_ids'"):
        load_results_file(path)


def test_a_file_of_this_tool_records_compact_json_hashing(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(dump_results(make_results([[5]])))
    assert json.loads(path.read_text())["runs"][0]["context_input_ids_hashing"] == "compact_json"


def test_a_version_1_file_is_migrated_to_the_current_version():
    """Version 1 stored answers stripped and read every run at assistant_start: both are said once migrated."""
    data = json.loads(dump_results(make_results([[9, 4], [2, None]])))
    data["schema_version"] = 1
    for run in data["runs"]:
        run.pop("position_rule", None)
        for response in run["responses"]:
            response.pop("text_stripped", None)
    loaded = Results.model_validate(data)
    assert loaded.schema_version == 3
    assert all(r.position_rule == "assistant_start" for r in loaded.runs)
    assert all(resp.text_stripped for r in loaded.runs for resp in r.responses)
    assert json.loads(dump_results(loaded))["schema_version"] == 3


def test_a_version_2_file_loads_with_no_clusters(tmp_path):
    """Version 2 had no cluster judge: its runs and baseline runs load with none, its verdicts as they were, and
    the file is written back as version 3."""
    data = json.loads(dump_results(make_results([[9, 4], [2, None]])))
    data["schema_version"] = 2
    for run in data["runs"]:
        run.pop("clusters"), run.pop("cluster_repeats")
    data["baseline"] = {"meta": {}, "runs": [{"run_id": "baseline__t0", "target_id": "t0", "responses": [],
                                              "judge": None, "spread": None}]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    loaded = results_mod.load_results_file(path)
    assert loaded.schema_version == 3
    assert len(loaded.runs) == len(data["runs"]) > 0
    assert all(r.clusters is None and r.cluster_repeats == [] for r in loaded.runs)
    assert loaded.baseline.runs[0].clusters is None
    assert [r.judge.score if r.judge else None for r in loaded.runs] == [
        r["judge"]["parsed"]["similarity_1_to_10"] if r["judge"] and r["judge"]["parsed"] else None
        for r in data["runs"]]
    assert json.loads(dump_results(loaded))["schema_version"] == 3
