"""The pure decisions behind a trustworthy run folder: which journals are the tool's, how a re-judge keeps the
failures it replaces, what of a judge URL may be written, how the lock names its holder, what ``judge`` reports."""

from __future__ import annotations

import json

import pytest

from ao_resampling.config import ExperimentConfig
from ao_resampling.ranks import rank_journal_name
from ao_resampling.errors import AOResamplingError
from ao_resampling.stages.common.judge_calls import CallCounts
from ao_resampling.stages.judge import JudgeStageReport, failed_calls, with_judge_settings
from ao_resampling.redaction import redact, redact_url
from ao_resampling.results import Baseline, BaselineRun, JudgeRecord, Results, dump_results
from ao_resampling.store import TOOL_JOURNAL_RE, holder_description, supersede
from tests.support.results_factory import cluster_record, judge_record, make_results, to_v0_dict


@pytest.mark.parametrize("name, ours", [
    pytest.param("journal.jsonl", True, id="main"),
    pytest.param("journal.rank0.jsonl", True, id="rank0"),
    pytest.param("journal.rank17.jsonl", True, id="rank17"),
    pytest.param("journal.backup.jsonl", False, id="user_backup"),
    pytest.param("journal.jsonl.jsonl", False, id="doubled"),
    pytest.param("journal.rank01.jsonl", False, id="leading_zero"),
    pytest.param("journal.rank.jsonl", False, id="rank_without_number"),
    pytest.param("journal-old.jsonl", False, id="dash"),
    pytest.param("myjournal.jsonl", False, id="prefix"),
])
def test_only_exact_tool_journal_names_are_ours(name, ours):
    assert bool(TOOL_JOURNAL_RE.fullmatch(name)) is ours


@pytest.mark.parametrize("rank", [0, 1, 7, 10, 255])
def test_every_rank_journal_name_is_one_of_ours(rank):
    assert TOOL_JOURNAL_RE.fullmatch(rank_journal_name(rank))


def _record(cell, created_at: str) -> JudgeRecord:
    return judge_record(cell, call_id="judge__run__t1__q1").model_copy(update={"created_at": created_at})


def test_a_retry_keeps_every_earlier_failure_oldest_first():
    timeout, bad_json, ok = _record("timeout", "1"), _record("invalid_json", "2"), _record(8, "3")
    after = supersede(supersede(supersede(None, timeout), bad_json), ok)
    assert after.score == 8
    assert after.previous_failures == [timeout, bad_json]


def test_replaying_the_same_event_changes_nothing():
    timeout, ok = _record("timeout", "1"), _record(8, "2")
    folded = supersede(timeout, ok)
    assert supersede(folded, ok) == folded  # compact died before deleting the journal: replayed over its own result
    assert supersede(timeout, timeout) == timeout


def test_files_without_the_history_field_still_load():
    results = make_results([[7, "timeout"]])
    data = results.model_dump(mode="json")
    for run in data["runs"]:
        run["judge"].pop("previous_failures")
    loaded = Results.model_validate(data)
    assert [r.judge.previous_failures for r in loaded.runs] == [[], []]
    assert Results.model_validate(to_v0_dict(results)).runs[0].judge.previous_failures == []


@pytest.mark.parametrize("url, written", [
    pytest.param("https://user:secret@api.example.com/v1", "https://REDACTED@api.example.com/v1", id="user_password"),
    pytest.param("https://sk-abc@api.example.com:8443/v1", "https://REDACTED@api.example.com:8443/v1", id="token_user"),
    pytest.param("https://h/v1?api-key=sk-1&region=eu", "https://h/v1?api-key=REDACTED&region=eu", id="query_key"),
    pytest.param("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1", id="nothing_secret"),
    pytest.param("https://h/v1#token=sk-9&x=1", "https://h/v1#token=REDACTED&x=1", id="fragment_token"),
    pytest.param("https://h/v1#sk-bare-9", "https://h/v1#REDACTED", id="bare_fragment"),
    pytest.param("https://h/v1;key=sk-9;lang=en/x", "https://h/v1;key=REDACTED;lang=en/x", id="path_param_key"),
    pytest.param("https://h/v1?access=ak-9&code=oc-9&page=2", "https://h/v1?access=REDACTED&code=REDACTED&page=2",
                 id="access_and_code_queries"),
])
def test_redact_url(url, written):
    assert redact_url(url) == written


def test_redact_finds_every_url_in_a_command_line():
    line = ("ao-resampling sweep --judge-base-url https://u:hunter2@h/v1#token=t0k --set "
            "judge_base_url=http://h2/v1?api_key=k3y --vary temperature=0.3,1")
    assert redact(line) == ("ao-resampling sweep --judge-base-url https://REDACTED@h/v1#token=REDACTED --set "
                            "judge_base_url=http://h2/v1?api_key=REDACTED --vary temperature=0.3,1")
    assert redact({"a": [line], "n": 3}) == {"a": [redact(line)], "n": 3}
    assert redact("x=https://a:1@h/v1,https://b:2@h/v2") == "x=https://REDACTED@h/v1,https://REDACTED@h/v2"


def test_dump_results_never_writes_url_credentials():
    results = make_results([[7]])
    results.meta.config = {"judge_base_url": "https://user:hunter2@api.example.com/v1", "judge_timeout_s": 5}
    text = dump_results(results)
    assert "hunter2" not in text and "user:" not in text
    assert json.loads(text)["meta"]["config"]["judge_base_url"] == "https://REDACTED@api.example.com/v1"
    assert results.meta.config["judge_base_url"] == "https://user:hunter2@api.example.com/v1"  # used as given


def test_judge_settings_recorded_are_the_ones_used():
    config = ExperimentConfig(judge_timeout_s=7.5, judge_max_retries=0, judge_api="chat", judge_concurrency=3)
    old = {"model": "m", "judge_timeout_s": 120.0, "judge_max_retries": 5, "judge_model": "gpt-5-mini"}
    new = with_judge_settings(old, config)
    assert (new["judge_timeout_s"], new["judge_max_retries"], new["judge_api"], new["judge_concurrency"]) == (
        7.5, 0, "chat", 3)
    assert new["model"] == "m" and new["judge_model"] == "gpt-5-mini"  # result-changing settings untouched


def test_lock_holder_is_named_from_the_lock_file():
    info = json.dumps({"pid": 4242, "command": "ao-resampling judge run", "started_at": "2026-01-01T00:00:00+00:00"})
    assert holder_description(info) == "pid 4242 (ao-resampling judge run, since 2026-01-01T00:00:00+00:00)"
    assert holder_description("") == "another process (it has not said which yet)"


def test_judge_summary_is_readable_and_failed_calls_counts_latest_failures():
    report = JudgeStageReport(calls={"judge": CallCounts(sent=20, ok=0, failed={"api_error": 20}, skipped=1)})
    assert report.summary() == ("judge: 20 call(s) sent, 0 scored, 20 failed (api_error 20); skipped 1 already "
                                "judged, 0 without answers")
    assert report.n_calls_failed == 20
    report.calls["clusters"] = CallCounts(sent=3, ok=2, failed={"not_a_partition": 1}, skipped=4)
    assert report.summary().endswith("\nclusters: 3 call(s) sent, 2 partitioned, 1 failed (not_a_partition 1); "
                                     "4 already judged")
    assert report.n_calls_failed == 21
    results = make_results([[7, "timeout", None]], repeats=lambda t, q, cell: ["invalid_json"] if q == 0 else [])
    assert failed_calls(results) == 2  # the main call that timed out and the repeat that did not parse


def test_failed_cluster_calls_count_as_failed_calls():
    """Exit code 3 counts a failed cluster call, its failed repeats and the baseline's failed cluster call."""
    results = make_results([[7, 8]], clusters=lambda t, q, cell: [[0, 0, 1], "not_a_partition"][q],
                           cluster_repeats=lambda t, q, cell: ["invalid_json", [0, 1, 1]] if q == 0 else [])
    assert failed_calls(results) == 2
    base = BaselineRun(run_id="baseline__t1", target_id="t1", clusters=cluster_record("out_of_range"))
    assert failed_calls(results.model_copy(update={"baseline": Baseline(runs=[base])})) == 3


def test_every_tool_error_is_one_catchable_class():
    from ao_resampling import config, pipeline, results, store
    from ao_resampling.stages import baseline
    from ao_resampling.inputs import data
    from ao_resampling.inputs import encoding
    from ao_resampling.stages.common import judge_calls
    from ao_resampling.engine.loading import models
    from ao_resampling.inputs import oracle

    for error in (config.ConfigError, results.ResultsError, models.ModelLoadError, pipeline.PipelineError,
                  judge_calls.JudgeConfigError, encoding.EncodingError, data.DataError, oracle.OracleQueryError,
                  baseline.BaselineError, store.FolderBusyError, store.NotAFolderError):
        assert issubclass(error, AOResamplingError), error
