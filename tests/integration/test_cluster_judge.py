"""The cluster judge at its edge: the real ``openai`` client against the loopback server, through the one judging
loop the verdicts use. Each run's answers are shown shuffled by a recorded seed and the partition comes back in the
stored order; hostile replies (bad JSON, a number twice, a number missing, out of range) end as recorded failures
with their raw reply, counted by the exit code and re-sent by the next ``judge``; repeats reshuffle and their ARI
says how noisy the judge is; the target-model baseline gets its clusters too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ao_resampling.analysis.summary import summarize
from ao_resampling.cli import app
from ao_resampling.config import ExperimentConfig
from ao_resampling.errors import EXIT_CALLS_FAILED
from ao_resampling.results import RESULTS_NAME, dump_results, load_results_file
from ao_resampling.stages.baseline import judge_baseline
from ao_resampling.stages.common.prompts import responses_in_prompt
from ao_resampling.stages.judge import failed_calls, judge_stage
from ao_resampling.stages.common.prompts import answers_in_prompt
from ao_resampling.stages.common.judge_prompt import cluster_seed, seeded_order
from tests.integration.test_judge_client import ANSWER_SETS, make_store
from tests.support.baseline_factory import baseline_of
from tests.support.openai_server import Reply


@pytest.fixture(autouse=True)
def no_ambient_openai_env(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def config_for(server, **overrides) -> ExperimentConfig:
    settings = dict(judge_base_url=server.base_url, judge_timeout_s=2.0, judge_max_retries=0, judge_concurrency=1,
                    judge_api="chat")
    return ExperimentConfig(**(settings | overrides))


def meanings_of(texts) -> set[frozenset[int]]:
    """The loopback judge's rule worked out here: identical texts (1-based stored positions) are one meaning."""
    return {frozenset(i for i, u in enumerate(texts, 1) if u == t) for t in texts}


def partition(record) -> set[frozenset[int]]:
    return {frozenset(c.answers) for c in record.parsed.clusters}


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_each_run_is_clustered_shuffled_and_mapped_back(openai_server, tmp_path, api):
    store = make_store(tmp_path, ANSWER_SETS + [[]])
    report = judge_stage(store, config_for(openai_server, judge_api=api, judge_concurrency=4), progress=False)
    assert (report.counts("clusters").sent, report.counts("clusters").ok, report.n_sent) == (4, 4, 4)
    cluster_requests = [r for r in openai_server.requests if r.is_cluster_call]
    assert len(cluster_requests) == 4 and len(openai_server.requests) == 8
    runs = store.load().runs
    for run, texts in zip(runs, ANSWER_SETS):
        record = run.clusters
        assert record.judge_call_id == f"clusters__{run.run_id}" and record.api == api
        assert record.shuffle_seed == cluster_seed(run.run_id)
        assert record.answer_order == seeded_order(record.shuffle_seed, len(texts))
        shown = answers_in_prompt(record.prompt)
        assert shown == [texts[i - 1] for i in record.answer_order]
        assert partition(record) == meanings_of(texts)  # back in the stored order, not the shown one
    assert runs[4].clusters is None  # no answers, no call
    # The ten different answers were shown in another order than stored, so mapping back was needed.
    assert runs[2].clusters.answer_order != list(range(1, 11))


HOSTILE = [
    pytest.param(Reply(text='{"clusters": [{"meaning": "x", "answers": [1, 2'), "invalid_json", id="bad_json"),
    pytest.param(Reply(text=json.dumps({"clusters": [{"meaning": "a", "answers": [1, 2]},
                                                     {"meaning": "b", "answers": [2, 3]}]})),
                 "not_a_partition", id="a_number_twice"),
    pytest.param(Reply(text=json.dumps({"clusters": [{"meaning": "a", "answers": [1, 3]}]})),
                 "not_a_partition", id="a_number_missing"),
    pytest.param(Reply(text=json.dumps({"clusters": [{"meaning": "a", "answers": [1, 2, 3, 4]}]})),
                 "out_of_range", id="out_of_range"),
    pytest.param(Reply.http_error(500), "api_error", id="server_error"),
]


@pytest.mark.parametrize("reply, reason", HOSTILE)
def test_a_hostile_cluster_reply_is_a_recorded_failure_retried_by_the_next_judge(openai_server, tmp_path, reply,
                                                                                 reason):
    store = make_store(tmp_path, [["Yes.", "Yes.", "No."]])
    openai_server.script(reply, kind="clusters")
    report = judge_stage(store, config_for(openai_server), progress=False)
    assert report.counts("clusters").failed == {reason: 1} and report.n_ok == 1  # the verdict is unaffected
    (run,) = store.load().runs
    failed = run.clusters
    assert failed.parsed is None and failed.failure.reason == reason and failed.prompt
    if reply.text is not None:
        assert failed.raw_output == reply.text
    assert run.judge.score is not None and failed_calls(store.load()) == 1

    openai_server.reset()
    again = judge_stage(store, config_for(openai_server), progress=False)
    (request,) = openai_server.requests  # only the failed cluster call is owed
    assert request.is_cluster_call and again.counts("clusters").ok == 1
    (run,) = store.load().runs
    assert partition(run.clusters) == {frozenset({1, 2}), frozenset({3})}
    assert [f.failure.reason for f in run.clusters.previous_failures] == [reason]
    assert failed_calls(store.load()) == 0


def test_judge_command_exits_3_on_a_failed_cluster_call_and_no_clusters_sends_none(openai_server, tmp_path):
    store = make_store(tmp_path / "run", [["a", "b", "a"], ["c", "c", "c"]])
    args = ["judge", str(store.folder), "--judge-api", "chat", "--judge-base-url", openai_server.base_url, "--quiet"]
    openai_server.script(Reply(text='{"clusters": "all the same"}'), kind="clusters")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == EXIT_CALLS_FAILED, result.output
    assert "clusters: 2 call(s) sent, 1 partitioned, 1 failed (schema_mismatch 1)" in result.output
    assert "1 judge call(s) failed" in result.output

    openai_server.reset()
    result = CliRunner().invoke(app, [*args, "--no-clusters"])
    assert result.exit_code == EXIT_CALLS_FAILED and openai_server.requests == []  # owed, but not asked for
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(openai_server.requests) == 1 and openai_server.requests[0].is_cluster_call


def test_cluster_repeats_reshuffle_and_their_agreement_is_summarised(openai_server, tmp_path):
    store = make_store(tmp_path, ANSWER_SETS)
    report = judge_stage(store, config_for(openai_server, judge_repeats=2, judge_concurrency=4), progress=False)
    assert report.counts("clusters_repeat").sent == 8 and report.counts("clusters_repeat").ok == 8
    runs = store.load().runs
    for run in runs:
        assert sorted(r.judge_call_id for r in run.cluster_repeats) == [
            f"clusters__{run.run_id}__rep1", f"clusters__{run.run_id}__rep2"]
        seeds = {run.clusters.shuffle_seed} | {r.shuffle_seed for r in run.cluster_repeats}
        assert len(seeds) == 3  # each call its own shuffle
        assert all(partition(r) == partition(run.clusters) for r in run.cluster_repeats)
    repeats = summarize(store.load(), n_boot=200)["clusters"]["repeats"]
    # The loopback judge ignores the order, so the partitions agree exactly (ARI 1) every time.
    assert repeats == {"n_pairs": 8, "mean_ari": 1.0, "ari_ci95": [1.0, 1.0], "same_partition_rate": 1.0}
    openai_server.reset()
    again = judge_stage(store, config_for(openai_server, judge_repeats=2), progress=False)
    assert openai_server.requests == [] and again.counts("clusters_repeat").skipped == 8


def test_the_baseline_gets_the_same_clusters(openai_server, tmp_path):
    store = make_store(tmp_path, [["x", "y"], ["z", "z"]])
    results = store.load()
    results.baseline = baseline_of({"t0": None, "t1": None})  # replies "reply 0", "reply 1", "reply 2"
    results.baseline.runs[1].responses[2].text = "reply 0"
    store.write(results)
    report = judge_baseline(store, config_for(openai_server, judge_concurrency=2), progress=False)
    assert (report.n_judge_ok, report.clusters.ok) == (2, 2)
    runs = store.load().baseline.runs
    for run in runs:
        texts = [r.text for r in run.responses]
        assert run.clusters.judge_call_id == f"clusters__{run.run_id}"
        assert responses_in_prompt(run.clusters.prompt) == [texts[i - 1] for i in run.clusters.answer_order]
        assert partition(run.clusters) == meanings_of(texts)
    assert [len(r.clusters.parsed.clusters) for r in runs] == [3, 2]
    again = judge_baseline(store, config_for(openai_server), progress=False)
    assert again.n_already_judged == 4 and again.clusters.sent == 0
