"""The target-model baseline stage on the tiny random model, judged by the loopback OpenAI server.

The replies must be what the base model itself samples (adapter off, nothing injected) from each target's encoding,
batched and journaled like the AO's answers; a kill mid-stage must lose only the batch in flight, and a re-run must
sample only the targets still missing. The judge sees the conversation and the replies as delimited data; a failed call
is stored as a failure and owed again. The CLI's ``baseline`` command and ``report --baseline FILE`` close the loop.
"""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from ao_resampling import pipeline
from ao_resampling.engine.loading import models
from ao_resampling.stages import baseline as baseline_module
from ao_resampling.stages.plan import prepare
from ao_resampling.stages.baseline import BaselineError, baseline_run_id, baseline_stage, sample_baseline
from ao_resampling.stages.common.prompts import responses_in_prompt
from ao_resampling.cli import app
from ao_resampling.config import ExperimentConfig
from ao_resampling.results import dump_results
from ao_resampling.store import ResultsStore
from ao_resampling.engine.decoding.sampler import Query, Sampler
from ao_resampling.stages.baseline import baseline_decoding
from tests.support.baseline_factory import earlier_format
from tests.support.openai_server import FakeOpenAIServer, Reply, deterministic_clusters, expected_score
from tests.support.results_factory import FakeEncoder, make_results

N = 3


@pytest.fixture(autouse=True)
def no_ambient_openai_env(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def baseline_verdict(request) -> Reply:
    """The fake server's scoring rule (10 when all agree, one less per extra distinct reply), on baseline prompts
    (and on the AO judge's, for the whole run); its cluster calls get the default rule (identical texts, one
    meaning)."""
    if request.is_cluster_call:
        return deterministic_clusters(request)
    replies = responses_in_prompt(request.prompt) or request.answers
    return Reply.verdict(expected_score(replies), f"{len(set(replies))} distinct of {len(replies)}")


@pytest.fixture
def server(openai_server: FakeOpenAIServer) -> FakeOpenAIServer:
    openai_server.behaviour = baseline_verdict
    return openai_server


@pytest.fixture(scope="module")
def loaded(tiny_oracle, gemma_tokenizer) -> models.LoadedOracle:
    n = models.num_layers(tiny_oracle)
    return models.LoadedOracle(tiny_oracle, gemma_tokenizer, n, models.layer_at_percent(n, 50), 1)


def config_for(base_url: str = "http://127.0.0.1:9/v1", **overrides) -> ExperimentConfig:
    # merge_lora off: merging into the shared, read-only tiny_oracle and back leaves round-off in its base weights.
    settings = dict(model="synthetic:tiny", oracle_lora="random", dtype="float32", device="cpu", num_targets=3,
                    num_questions=2, samples_per_query=N, max_new_tokens=6, baseline_max_new_tokens=8,
                    judge_api="chat", judge_base_url=base_url, judge_max_retries=0, judge_timeout_s=5.0,
                    embedding_model="fake-encoder", merge_lora=False)
    return ExperimentConfig(**(settings | overrides))


@pytest.fixture
def planned(tmp_path, gemma_tokenizer) -> ResultsStore:
    store, _ = prepare(config_for(), tmp_path / "run", tokenizer=gemma_tokenizer)
    return store


@pytest.fixture(scope="module")
def sampled_folder(tmp_path_factory, gemma_tokenizer, loaded):
    """A planned folder whose baseline is sampled but not judged (copied by each test that starts from it)."""
    folder = tmp_path_factory.mktemp("sampled") / "run"
    store, _ = prepare(config_for(), folder, tokenizer=gemma_tokenizer)
    assert sample_baseline(store, config_for(), oracle=loaded, progress=False) == (3, 0)
    return folder


@pytest.fixture
def sampled(sampled_folder, tmp_path) -> ResultsStore:
    shutil.copytree(sampled_folder, tmp_path / "run")
    return ResultsStore(tmp_path / "run")


def reference(loaded, store: ResultsStore, *, use_adapter: bool) -> dict[str, list[str]]:
    """What the sampler gives for every target's own encoding, directly, with the plan's decoding."""
    results = store.load()
    contexts = {r.target_id: r.context_input_ids for r in results.runs}
    decoding = baseline_decoding(results.meta.decoding, config_for())
    queries = [Query(key=baseline_run_id(t), input_ids=tuple(ids), n=N) for t, ids in contexts.items()]
    out = Sampler(loaded.model, loaded.tokenizer, decoding=decoding, injection_layer=1, coefficient=1.0,
                  use_adapter=use_adapter).run(queries, progress=False)
    return {key: [s.text for s in samples] for key, samples in out.items()}


# ---------------------------------------------------------------------------------------------------------------------
# The stage end to end


def test_baseline_stage_end_to_end(planned, loaded, server):
    config = config_for(server.base_url)
    encoder = FakeEncoder()
    report = baseline_stage(planned, config, oracle=loaded, judge=True, progress=False, encoder=encoder)
    assert (report.n_sampled, report.n_judge_sent, report.n_judge_ok, report.n_spread) == (3, 3, 3, 3)
    assert not planned.journals()  # folded into results.json

    results = ResultsStore(planned.folder).load()
    target_ids = [t.id for t in results.targets]
    runs = results.baseline.runs
    assert [r.target_id for r in runs] == target_ids
    assert [r.run_id for r in runs] == [f"baseline__{t}" for t in target_ids]
    assert results.baseline.meta["decoding"]["max_new_tokens"] == 8
    assert results.baseline.meta["samples_per_query"] == N
    for run in runs:
        assert [r.sample_id for r in run.responses] == [f"{run.run_id}__s{i:02d}" for i in range(N)]
        assert all(r.decoding.max_new_tokens == 8 and 0 < r.n_tokens <= 8 for r in run.responses)
        # the decoding the replies were drawn with: the stand-in's generation_config top-k 64, its stop ids
        assert all((r.decoding.top_k, r.decoding.eos_token_ids) == (64, (1, 106)) for r in run.responses)
        assert run.judge.score == expected_score([r.text for r in run.responses])
        assert run.judge.judge_call_id == f"judge__{run.run_id}" and run.judge.raw_output
        assert run.spread.embedding_model == "fake-encoder" and run.spread.embedding_mean_cosine is not None

    # The base model itself, on the target's own encoding: exactly the adapter-off sampler, not the oracle's.
    texts = {r.run_id: [x.text for x in r.responses] for r in runs}
    assert texts == reference(loaded, planned, use_adapter=False)
    assert texts != reference(loaded, planned, use_adapter=True)

    # One verdict call per target, showing its conversation and its replies as delimited data, and one cluster call
    # showing them shuffled, whose partition comes back in the stored order.
    verdicts = [r for r in server.requests if not r.is_cluster_call]
    assert len(verdicts) == 3 and len(server.requests) == 6
    prompts = {tuple(responses_in_prompt(r.prompt)): r.prompt for r in verdicts}
    for run in runs:
        replies = texts[run.run_id]
        assert responses_in_prompt(run.clusters.prompt) == [replies[i - 1] for i in run.clusters.answer_order]
        assert {frozenset(c.answers) for c in run.clusters.parsed.clusters} == {
            frozenset(i for i, u in enumerate(replies, 1) if u == t) for t in replies}
    for target, run in zip(results.targets, runs):
        prompt = prompts[tuple(texts[run.run_id])]
        assert prompt == run.judge.prompt
        user = next(m.content for m in target.messages if m.role == "user")
        assert f'<message role="user">{user.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")}' \
               f"</message>" in prompt
    assert server.requests[0].body["response_format"]["json_schema"]["strict"] is True

    # A second run owes nothing.
    again = baseline_stage(planned, config, oracle=loaded, judge=True, progress=False, encoder=encoder)
    assert (again.n_sampled, again.n_already_sampled, again.n_judge_sent, again.n_already_judged, again.n_spread) \
        == (0, 3, 0, 6, 0)  # a verdict and a cluster call per target
    assert len(server.requests) == 6


def test_judge_off_gives_replies_only_and_judging_later_samples_nothing(sampled, server, monkeypatch):
    config = config_for(server.base_url, embedding_model="none")
    report = baseline_stage(sampled, config, oracle=None, judge=False, progress=False)
    assert report.n_judge_sent == 0 and server.requests == []
    assert all(r.responses and r.judge is None for r in sampled.load().baseline.runs)

    def no_model(*args, **kwargs):
        raise AssertionError("nothing is left to sample, so no model may be loaded")

    monkeypatch.setattr(baseline_module, "load_oracle", no_model)  # the name sample_baseline loads with
    report = baseline_stage(sampled, config, judge=True, progress=False)
    assert (report.n_sampled, report.n_judge_ok) == (0, 3)


def test_a_failed_judge_call_is_stored_never_scored_and_owed_again(sampled, server):
    config = config_for(server.base_url, embedding_model="none", judge_concurrency=1)
    server.script(Reply(text="The replies look similar, 8/10."))
    report = baseline_stage(sampled, config, judge=True, progress=False)
    assert (report.n_judge_sent, report.n_judge_ok, report.n_judge_failed) == (3, 2, {"invalid_json": 1})
    failed = [r for r in sampled.load().baseline.runs if r.judge.failure is not None]
    assert len(failed) == 1 and failed[0].judge.score is None
    assert failed[0].judge.raw_output == "The replies look similar, 8/10." and failed[0].judge.prompt

    report = baseline_stage(sampled, config, judge=True, progress=False)
    assert (report.n_judge_sent, report.n_judge_ok, report.n_already_judged) == (1, 1, 5)  # 2 verdicts, 3 clusters
    assert responses_in_prompt(server.requests[-1].prompt) == [r.text for r in failed[0].responses]
    assert all(r.judge.score is not None for r in sampled.load().baseline.runs)


# ---------------------------------------------------------------------------------------------------------------------
# Resume after a kill


def test_resume_after_a_kill_samples_only_the_missing_targets(planned, loaded, monkeypatch):
    config = config_for(batch_rows=N, embedding_model="none")  # one target's samples in the rows at a time
    real_run = Sampler.run
    sampled_keys: list[str] = []

    def killed_after_first_target(self, queries, *, on_answers, **kwargs):
        def journal_then_die(key, samples):
            on_answers(key, samples)
            sampled_keys.append(key)
            raise KeyboardInterrupt("killed")
        return real_run(self, queries, on_answers=journal_then_die, **kwargs)

    monkeypatch.setattr(Sampler, "run", killed_after_first_target)
    with pytest.raises(KeyboardInterrupt):
        baseline_stage(planned, config, oracle=loaded, judge=False, progress=False)
    survived = planned.load().baseline
    assert [r.run_id for r in survived.runs] == sampled_keys and len(survived.runs[0].responses) == N

    # Other decoding settings may not be mixed into a partly sampled baseline.
    with pytest.raises(BaselineError, match="max_new_tokens"):
        baseline_stage(planned, config.model_copy(update={"baseline_max_new_tokens": 5}), oracle=loaded,
                       judge=False, progress=False)

    resumed: list[str] = []

    def recording(self, queries, **kwargs):
        resumed.extend(q.key for q in queries)
        return real_run(self, queries, **kwargs)

    monkeypatch.setattr(Sampler, "run", recording)
    report = baseline_stage(planned, config, oracle=loaded, judge=False, progress=False)
    results = planned.load()
    all_ids = [baseline_run_id(t.id) for t in results.targets]
    assert sorted(resumed) == sorted(set(all_ids) - set(sampled_keys)) and report.n_already_sampled == 1
    runs = results.baseline.runs
    assert sorted(r.run_id for r in runs) == sorted(all_ids)  # each target once
    assert all(len(r.responses) == N for r in runs)
    by_id = {r.run_id: r for r in runs}
    assert by_id[sampled_keys[0]].responses == survived.runs[0].responses  # the survivor was not re-sampled


def test_run_experiment_with_baseline(tmp_path, loaded, server):
    # the module's oracle is given, not loaded by the run: a model the run loads is merged for good by generate
    config = config_for(server.base_url, baseline=True, embedding_model="none")
    report = pipeline.run_experiment(config, tmp_path / "run", judge=True, progress=False, log=lambda _: None,
                                     oracle=loaded)
    assert "baseline" in report.stage_seconds
    results = ResultsStore(tmp_path / "run").load()
    assert len(results.baseline.runs) == 3 and all(r.judge.score is not None for r in results.baseline.runs)
    summary = json.loads((report.report_dir / "summary.json").read_text())["baseline"]
    assert summary["n_targets"] == 3 and summary["only_in_results"] == [] and summary["only_in_baseline"] == []
    assert summary["embedding"]["skipped"]
    assert (report.report_dir / "baseline_vs_ao.png").exists()


# ---------------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_baseline_command(sampled_folder, tmp_path, loaded, server, monkeypatch):
    folder = tmp_path / "run"
    shutil.copytree(sampled_folder, folder)
    store = ResultsStore(folder)
    results = store.load()
    results.baseline.runs = results.baseline.runs[:2]  # one target still to sample
    store.write(results)
    monkeypatch.setattr(baseline_module, "load_oracle", lambda config: loaded)
    out = CliRunner().invoke(app, ["baseline", str(folder), "--judge-base-url", server.base_url,
                                   "--embedding-model", "none", "--quiet"])
    assert out.exit_code == 0, out.output
    assert "1 targets sampled (2 already were), 3 of 3 judge calls scored" in out.output
    assert "clusters: 3 call(s) sent, 3 partitioned" in out.output
    assert len(store.load().baseline.runs) == 3
    report = (folder / "report" / "report.md").read_text()
    assert "## Target-model baseline" in report and "3 baseline targets, 3 replies each" in report


def test_cli_baseline_without_a_judge_says_how_to_go_on(sampled_folder):
    out = CliRunner().invoke(app, ["baseline", str(sampled_folder), "--judge-base-url", "", "--quiet"])
    assert out.exit_code == 2 and "--no-judge" in out.output


def test_cli_report_with_a_separate_baseline_file(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.json").write_text(dump_results(make_results([[8, 6], [5, 5], [9, 9], [3, 4]])))
    baseline_file = tmp_path / "baseline.json"
    baseline_file.write_text(json.dumps(earlier_format(["t1", "t2", "t3", "t9"])))
    out = CliRunner().invoke(app, ["report", str(folder), "--baseline", str(baseline_file),
                                   "--embedding-model", "none", "--quiet"])
    assert out.exit_code == 0, out.output
    summary = json.loads((folder / "report" / "summary.json").read_text())["baseline"]
    assert summary["only_in_results"] == ["t4"] and summary["only_in_baseline"] == ["t9"]
    assert summary["n_targets"] == 3
    assert "t9" in (folder / "report" / "report.md").read_text()
    assert ResultsStore(folder).load().baseline is None  # the run folder itself is left as it was

    baseline_file.write_text(json.dumps({"meta": {}, "runs": [{"run_id": "b", "target_id": "t1", "responses": "?"}]}))
    out = CliRunner().invoke(app, ["report", str(folder), "--baseline", str(baseline_file),
                                   "--embedding-model", "none", "--quiet"])
    assert out.exit_code == 2
    assert "baseline.json" in out.output and "field 'runs.0.responses'" in out.output
