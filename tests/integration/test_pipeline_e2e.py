"""The whole pipeline, end to end: the tiny random-weight Gemma 3 + a random LoRA generates, the loopback fake
OpenAI server judges (chat and Responses APIs), MiniLM measures spread, and the report is written. Then: a re-run
does no new work, a folder made with other settings is refused, ``judge=False`` stops before the judge. Real
Gemma 3 270M runs once, as the no-argument demo through the CLI (on a smaller grid than the preset's).

The fake server's verdict is a function of the answers it is shown (``expected_score``), and its clusters group
identical answers (``expected_clusters``), so every stored score, partition and cluster number can be checked
against the answers stored beside it.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ao_resampling import config as config_mod
from ao_resampling import pipeline
from ao_resampling.stages.common import spreads
from ao_resampling.cli import app
from ao_resampling.config import build_config
from ao_resampling.results import Results, load_results_file
from ao_resampling.stages.common.prompts import answers_in_prompt
from ao_resampling.stages.common.judge_prompt import seeded_order
from ao_resampling.store import ResultsStore
from tests.support.openai_server import FakeOpenAIServer, expected_score

PLOTS = ("A_judge_scores.png", "B_target_means.png", "C_per_question.png", "heatmap.png", "A_embedding.png",
         "D_clusters.png")


@pytest.fixture(scope="module", autouse=True)
def offline_judge_env_and_shared_loads():
    """No developer key or base URL may reach these tests. MiniLM (~5 s), which every run would load again, is
    loaded once: it is read-only, and its own loading is tested elsewhere (the tokenizer: conftest.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("OPENAI_API_KEY", raising=False)
        mp.delenv("OPENAI_BASE_URL", raising=False)
        mp.setattr(spreads, "load_embedder", functools.cache(spreads.load_embedder))
        yield


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer() as fake:
        yield fake


def tiny_config(server: FakeOpenAIServer, **overrides):
    # Random weights give a nearly flat next-token distribution, whose 0.9 nucleus spans most of the 262k vocabulary
    # (the sampler's slow exact path, ~1 s a step here). A tiny top_p keeps the nucleus to a few tokens: decoded on
    # the fast path, and with 3 tokens per answer some samples of a run repeat and some do not, so the fake judge's
    # scores differ between runs (a verdict stored under the wrong run would show). Top-k off: the model's
    # generation_config top-k would leave that tiny nucleus one token wide (greedy: every score 10).
    settings = dict(model="synthetic:tiny", oracle_lora="random", dtype="float32", device="cpu", num_targets=3,
                    num_questions=2, samples_per_query=3, max_new_tokens=3, top_p=2e-5, top_k=0, judge_api="chat",
                    judge_base_url=server.base_url, bootstrap_resamples=200)
    return build_config(preset="experiment", overrides={**settings, **overrides})


def run(config, out: Path, **kwargs) -> pipeline.RunReport:
    return pipeline.run_experiment(config, out, progress=False, log=lambda _: None, **kwargs)


def answers(run) -> tuple[str, ...]:
    return tuple(r.text for r in run.responses)


def runs_json(results: Results) -> list[dict]:
    return [r.model_dump(mode="json") for r in results.runs]


def meanings_of(texts) -> set[frozenset[int]]:
    """The partition the loopback judge's rule gives, worked out here: 1-based positions of identical texts."""
    return {frozenset(i for i, u in enumerate(texts, 1) if u == t) for t in texts}


def stored_partition(record) -> set[frozenset[int]]:
    return {frozenset(c.answers) for c in record.parsed.clusters}


def numbers_from_answers(texts) -> dict[str, float]:
    """The four numbers of one run straight from its stored answers (identical text = one meaning)."""
    n, sizes = len(texts), [texts.count(t) for t in dict.fromkeys(texts)]
    return {"n_clusters": len(sizes), "modal_share": max(sizes) / n,
            "semantic_entropy_bits": -sum(s / n * math.log2(s / n) for s in sizes),
            "pairwise_agreement": sum(s * (s - 1) for s in sizes) / (n * (n - 1))}


def check_clusters(results: Results, summary: dict, report_md: str) -> None:
    """Every run's cluster record is the loopback rule's partition of its stored answers, shown shuffled by the
    recorded seed; summary.json's four means are those of the numbers worked out from the answers."""
    expected = {k: [] for k in ("n_clusters", "modal_share", "semantic_entropy_bits", "pairwise_agreement")}
    for run in results.runs:
        texts = list(answers(run))
        record = run.clusters
        assert record is not None and record.failure is None, run.run_id
        assert stored_partition(record) == meanings_of(texts), run.run_id
        assert record.answer_order == seeded_order(record.shuffle_seed, len(texts))
        assert answers_in_prompt(record.prompt) == [texts[i - 1] for i in record.answer_order]
        for k, v in numbers_from_answers(texts).items():
            expected[k].append(v)
    block = summary["clusters"]
    assert block["n_clustered"] == len(results.runs) and block["n_failures"] == 0
    for k, values in expected.items():
        m = block["metrics"][k]
        assert m["mean"] == pytest.approx(sum(values) / len(values)), k
        assert m["mean_ci95"][0] <= m["mean"] + 1e-12 and m["mean"] <= m["mean_ci95"][1] + 1e-12
        assert f"| {k} (" in report_md and f"{m['mean']:.3f}" in report_md
    assert "Pairwise agreement is the chance that two different answers" in report_md


@pytest.fixture(scope="module")
def chat_run(server, tmp_path_factory):
    """One full run judged over the chat API; (config, folder, report, the server requests it made)."""
    out = tmp_path_factory.mktemp("e2e") / "chat"
    config = tiny_config(server)
    first = len(server.requests)
    report = run(config, out)
    return config, out, report, server.requests[first:]


def test_full_run_output_is_complete_and_consistent(chat_run):
    config, out, report, requests = chat_run
    results = load_results_file(out / "results.json")
    assert ResultsStore(out).journals() == []  # everything folded into results.json

    assert len(results.runs) == 3 * 2 == report.n_runs
    assert report.n_samples == 6 * 3 and report.judged
    assert all(len(r.responses) == 3 for r in results.runs)
    assert len({r.sample_id for run in results.runs for r in run.responses}) == 18
    assert results.meta.stand_in and results.meta.layer == 2 and results.meta.config["model"] == "synthetic:tiny"

    # Every run judged once, over the chat API, with the verdict the server gives for exactly its answers, and
    # clustered once (its answers shuffled).
    verdicts = [r for r in requests if not r.is_cluster_call]
    assert len(verdicts) == 6 and len(requests) == 12 and {r.path for r in requests} == {"/v1/chat/completions"}
    assert sorted(tuple(r.answers) for r in verdicts) == sorted(answers(run) for run in results.runs)
    for run in results.runs:
        assert run.judge.api == "chat" and run.judge.failure is None
        assert run.judge.score == expected_score(list(answers(run))), run.run_id
        assert run.spread.embedding_model == config.embedding_model
        assert -1.0 <= run.spread.embedding_mean_cosine <= 1.0 + 1e-6

    summary = json.loads((report.report_dir / "summary.json").read_text())
    assert summary["n_runs"] == 6 and summary["n_judged"] == 6 and summary["n_unjudged"] == 0
    assert sum(summary["judge"]["histogram"].values()) == summary["n_judged"]
    histogram = {int(k): v for k, v in summary["judge"]["histogram"].items() if v}
    scores = [r.judge.score for r in results.runs]
    assert len(set(scores)) > 1, f"seeded answers should give runs different scores, got {scores}"
    assert histogram == {s: scores.count(s) for s in set(scores)}
    assert summary["judge"]["mean"] == pytest.approx(sum(scores) / len(scores))
    assert (report.report_dir / "report.md").read_text().strip()
    for name in PLOTS:
        assert (report.report_dir / name).stat().st_size > 0, name
    check_clusters(results, summary, (report.report_dir / "report.md").read_text())
    rates = [numbers_from_answers(list(answers(r)))["pairwise_agreement"] for r in results.runs]
    assert len(set(rates)) > 1, f"seeded answers should give runs different agreement, got {rates}"


def test_rerun_does_no_new_work(chat_run, server, monkeypatch):
    config, out, _, _ = chat_run
    before = load_results_file(out / "results.json")
    n_requests = len(server.requests)
    loads = []
    monkeypatch.setattr(pipeline, "load_oracle", lambda cfg: loads.append(cfg) or pytest.fail("model loaded"))

    report = run(config, out)

    assert loads == [], "nothing left to generate, so no weights are loaded"
    assert len(server.requests) == n_requests
    assert runs_json(load_results_file(out / "results.json")) == runs_json(before)
    assert report.n_runs == 6 and report.n_samples == 18


def test_changed_settings_against_the_same_folder_are_refused(chat_run, server, monkeypatch):
    config, out, _, _ = chat_run
    before = (out / "results.json").read_text()
    monkeypatch.setattr(pipeline, "load_oracle", lambda cfg: pytest.fail("refused only after loading the model"))
    changed = tiny_config(server, decode_seed=1, temperature=0.5, batch_rows=2)  # batch_rows is only plumbing
    with pytest.raises(pipeline.PipelineError) as info:
        run(changed, out)
    message = str(info.value)
    assert "decode_seed: 0 -> 1" in message and "temperature: 0.7 -> 0.5" in message
    assert "batch_rows" not in message
    assert (out / "results.json").read_text() == before


def test_no_judge_then_judge_over_the_responses_api(server, tmp_path, folder_reads):
    config = tiny_config(server, judge_api="responses", num_targets=2, samples_per_query=2, max_new_tokens=4)
    out = tmp_path / "run"
    first = len(server.requests)

    report = run(config, out, judge=False)
    # Planned, sampled, analysed and reported on one read of the folder (the plan it wrote, read back once).
    assert folder_reads == ["replay", "file"]

    assert len(server.requests) == first  # the judge was never called
    assert not report.judged and "judge" not in report.stage_seconds
    unjudged = load_results_file(out / "results.json")
    assert len(unjudged.runs) == 4
    assert all(len(r.responses) == 2 and r.judge is None and r.spread is not None for r in unjudged.runs)
    summary = json.loads((report.report_dir / "summary.json").read_text())
    assert (summary["n_runs"], summary["n_judged"], summary["n_unjudged"]) == (4, 0, 4)
    assert "embedding" in summary
    assert (report.report_dir / "report.md").exists()

    # The same folder, now judged over the Responses API: the answers are kept, only the judge runs.
    folder_reads.clear()
    run(config, out)
    assert folder_reads == ["replay", "file"]  # checked against the plan, judged, analysed: one read
    requests = server.requests[first:]
    judged = load_results_file(out / "results.json")
    assert len(requests) == 8 and {r.path for r in requests} == {"/v1/responses"}
    assert sum(r.is_cluster_call for r in requests) == 4
    assert all(stored_partition(r.clusters) == meanings_of(list(answers(r))) for r in judged.runs)
    assert [answers(r) for r in judged.runs] == [answers(r) for r in unjudged.runs]
    for r in judged.runs:
        assert r.judge.api == "responses" and r.judge.score == expected_score(list(answers(r)))


def test_sequential_sampler_gives_the_batched_samplers_greedy_answers(server, tmp_path):
    """``sampler = "sequential"`` (one HF generate call per sample, the original experiment's way) through the
    whole pipeline: greedily, every answer is the fast sampler's."""
    greedy = dict(num_targets=2, samples_per_query=2, max_new_tokens=5, temperature=0.0)
    batched = run(tiny_config(server, **greedy), tmp_path / "batched", judge=False)
    sequential = run(tiny_config(server, sampler="sequential", **greedy), tmp_path / "sequential", judge=False)

    fast, slow = (load_results_file(r.out_dir / "results.json") for r in (batched, sequential))
    assert [r.run_id for r in fast.runs] == [r.run_id for r in slow.runs]
    assert [[x.n_tokens for x in r.responses] for r in slow.runs] == [[5, 5]] * 4
    assert [answers(r) for r in slow.runs] == [answers(r) for r in fast.runs]
    assert sum(bool(text) for r in fast.runs for text in answers(r)) >= 4, "compared on real text, not blanks"


# ---------------------------------------------------------------------------------------------------------------------
# The demo: `ao-resampling run` with no arguments, which is also the run on real Gemma 3 270M

# The demo's grid made smaller (the preset: 4 targets x 3 questions x 4 samples x 24 tokens). Everything else is the
# preset's: the command, real 270M, the random LoRA, CPU, float32, one batch of rows. What the tests prove (the
# no-argument command runs the whole pipeline on real weights and gives real text) needs no more than a few answers
# of a dozen tokens: 12 rows x 12 steps instead of 48 x 24, an eighth of the decode work.
SMALLER_DEMO_GRID = {"num_targets": 2, "num_questions": 2, "samples_per_query": 3, "max_new_tokens": 12}


def invoke_demo(home: Path, mp: pytest.MonkeyPatch):
    """``ao-resampling run`` (the demo preset, on the smaller grid) from ``home``: its folder is home/artifacts/demo.
    The same call on a folder it made continues it (a test that adds a judge samples nothing again)."""
    mp.chdir(home)
    for field, value in SMALLER_DEMO_GRID.items():
        mp.setitem(config_mod.DEMO, field, value)
    return CliRunner().invoke(app, ["run"], catch_exceptions=False)


@pytest.fixture(scope="module")
def demo_run(offline_judge_env_and_shared_loads, tmp_path_factory):
    """The no-argument demo (no judge: no OpenAI variable is set), run once for the tests that read it: (the CLI's
    result, its run folder)."""
    home = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        result = invoke_demo(home, mp)
    return result, home / "artifacts" / "demo"


@pytest.mark.slow
def test_demo_with_no_arguments_on_real_gemma3_270m(demo_run):
    """The demo as a user gets it, on a smaller grid (about 5 s on 2 idle CPU cores; the full grid, about 30 s)."""
    result, folder = demo_run
    assert result.exit_code == 0, result.output
    assert "LLM judge is skipped" in result.output
    assert "a random LoRA stands in for the trained oracle adapter" in result.output
    assert "STAND-IN" in (folder / "report" / "report.md").read_text()
    results = load_results_file(folder / "results.json")
    assert results.meta.model == "gemma3-270m-gguf" and results.meta.oracle_lora == "random" and results.meta.stand_in
    assert (results.meta.num_layers, results.meta.layer) == (18, 9)
    assert len(results.runs) == SMALLER_DEMO_GRID["num_targets"] * SMALLER_DEMO_GRID["num_questions"]
    assert results.meta.config["max_new_tokens"] == SMALLER_DEMO_GRID["max_new_tokens"]
    texts = []
    for run_ in results.runs:
        assert run_.judge is None and run_.spread is not None
        assert len(run_.responses) == SMALLER_DEMO_GRID["samples_per_query"]
        for response in run_.responses:
            assert response.n_tokens and response.finish_reason in ("eos", "length")
            texts.append(response.text)
    # Real weights give real text, even through a random LoRA; some samples do degenerate into " \n" repeats,
    # which strip to nothing, so this asks for most answers, not all.
    assert sum(bool(t.strip()) for t in texts) >= 0.75 * len(texts), texts
    assert sum(len(t.split()) >= 3 for t in texts) >= 0.5 * len(texts), texts


@pytest.mark.slow
def test_demo_with_a_loopback_judge_clusters_every_run(demo_run, tmp_path, monkeypatch, server):
    """The demo on real Gemma 3 270M (random LoRA) with a judge to talk to (OPENAI_BASE_URL, the loopback server),
    continuing the demo folder above (its answers are not sampled again): every run has a verdict and a partition
    into meanings, which are the stored answers' (identical text, one meaning); summary.json and report.md hold the
    four numbers with CIs, and plot D is drawn."""
    shutil.copytree(demo_run[1], tmp_path / "artifacts" / "demo")
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    result = invoke_demo(tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "artifacts" / "demo"
    results = load_results_file(folder / "results.json")
    assert results.meta.model == "gemma3-270m-gguf" and results.meta.stand_in
    assert len(results.runs) == SMALLER_DEMO_GRID["num_targets"] * SMALLER_DEMO_GRID["num_questions"]
    assert all(r.judge.score == expected_score(list(answers(r))) for r in results.runs)
    summary = json.loads((folder / "report" / "summary.json").read_text())
    check_clusters(results, summary, (folder / "report" / "report.md").read_text())
    assert (folder / "report" / "D_clusters.png").stat().st_size > 0
