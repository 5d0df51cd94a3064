"""The real experiment, as a test: ``pytest -m gpu``.

Default: google/gemma-3-27b-it + the published AO LoRA + gpt-5-mini, 100 targets x 10 questions x 10 samples.
Artifacts (results.json, plots, summary.json, report.md) stay under ``artifacts/``. Without CUDA, weights or judge
access it fails at once, saying which is missing: the experiment never passes by being skipped.

Stand-in on a box without the real weights (scale and speed only; the answers are noise):
    AO_MODEL=synthetic:gemma-3-27b AO_LORA=random AO_TOKENIZER=DIR AO_JUDGE=loopback pytest -m gpu
Add AO_ANSWER_LENGTHS=../shared/data/ao_answer_lengths.json to make the stand-in's answers end at <end_of_turn> at
the real oracle's lengths (otherwise a random model runs every answer to max_new_tokens: ~5.7x the real decode
work); AO_EOS_RATE=0.03 ends them at a geometric rate instead. The row count is sized to the card (AO_BATCH_ROWS
defaults to 'auto'); timings.json records it with the peak memory, which must stay <= 95% of the card.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ao_resampling import pipeline
from ao_resampling.results import load_results_file
from ao_resampling.store import ResultsStore
from tests.experiments.conftest import experiment_config, option

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def judge_endpoint(request):
    """(api, base_url, server): the real OpenAI API by default, or the loopback fake server."""
    kind = option(request.config, "--ao-judge")
    if kind == "loopback":
        from tests.support.openai_server import FakeOpenAIServer

        server = FakeOpenAIServer().start()
        yield option(request.config, "--ao-judge-api"), server.base_url, server
        server.close()
    elif kind == "openai":
        yield option(request.config, "--ao-judge-api"), option(request.config, "--ao-judge-base-url"), None
    else:
        pytest.fail(f"--ao-judge / AO_JUDGE must be 'openai' or 'loopback', got {kind!r}")


def ending_answers(monkeypatch, rate: float) -> None:
    """Stand-ins only: the oracle the pipeline loads ends its answers at EOS ~``rate`` of steps (loading/end_gate.py)."""
    from ao_resampling.engine.loading.end_gate import end_answers_at_rate

    load = pipeline.load_oracle

    def load_ending(config):
        oracle = load(config)
        stop_id = end_answers_at_rate(oracle.model, (1, 106), rate)
        print(f"eos mode: token {stop_id} wins at {rate:.0%} of steps")
        return oracle

    monkeypatch.setattr(pipeline, "load_oracle", load_ending)


def eager_fallbacks(recwarn) -> list[str]:
    """The decode step's warnings that it stopped replaying CUDA graphs (decode_step.py), with the reason."""
    return [str(w.message) for w in recwarn if "without CUDA graphs" in str(w.message)]


def test_full_experiment(request, judge_endpoint, monkeypatch, recwarn):
    api, base_url, server = judge_endpoint
    cfg = request.config
    eos_rate = float(option(cfg, "--ao-eos-rate"))
    model = option(cfg, "--ao-model")
    config = experiment_config(request, api, base_url)
    if eos_rate:
        if config.stand_in_reason() is None:
            pytest.fail("--ao-eos-rate / AO_EOS_RATE is for stand-ins (synthetic model or random LoRA) only")
        ending_answers(monkeypatch, eos_rate)
    slug = model.replace("/", "_").replace(":", "_")
    out = Path(option(cfg, "--ao-out") or REPO / "artifacts" / "gpu-experiment" / slug)

    try:  # CUDA, weights, LoRA, data, judge: all checked before any long work
        pipeline.preflight(config, judge=True)
    except pipeline.PipelineError as e:
        pytest.fail(str(e), pytrace=False)

    fresh = not (out / "results.json").exists()  # else a resume: what is stored came from an earlier session
    t = time.perf_counter()
    report = pipeline.run_experiment(config, out, judge=True, progress=True)
    wall = time.perf_counter() - t
    timings = {"total_s": round(wall, 1), "n_samples": report.n_samples,
               **{f"{k}_s": round(v, 1) for k, v in report.stage_seconds.items()}, "decode_layout": report.layout}
    (out / "timings.json").write_text(json.dumps(timings, indent=1))  # kept with the artifacts
    print(f"\nstage seconds: {timings}; out {out}")
    assert not eager_fallbacks(recwarn), "decode steps fell back to eager: the stage's speed is not the real one"
    if report.layout and report.layout["peak_memory_bytes"]:  # a fresh run folder: the stage decoded here
        import torch

        card = torch.cuda.get_device_properties(torch.device(config.device)).total_memory
        peak = report.layout["peak_memory_bytes"]
        print(f"rows {report.layout['batch_rows']} ({report.layout['batch_rows_setting']}), peak "
              f"{peak / 2**30:.1f} GiB of {card / 2**30:.1f} GiB ({peak / card:.0%})")
        assert peak <= 0.95 * card, "the rows sized to the card left less than 5% of it free"

    results = load_results_file(out / "results.json")  # validates against the schema
    assert ResultsStore(out).journals() == [], "every journal was folded into results.json"
    n_targets, n_questions, n = config.num_targets, config.num_questions, config.samples_per_query
    assert len(results.runs) == n_targets * n_questions
    assert len({r.run_id for r in results.runs}) == len(results.runs)
    for run in results.runs:
        assert len(run.responses) == n, run.run_id
        assert all(resp.n_tokens for resp in run.responses), f"{run.run_id}: an answer with no tokens"
        if not config.model.startswith("synthetic:"):  # random weights often draw tokens that decode to nothing
            assert all(resp.text.strip() for resp in run.responses), f"{run.run_id}: empty answer"
        assert run.judge is not None, f"{run.run_id}: neither a verdict nor a recorded failure"
        if run.judge.parsed is not None:
            assert 1 <= run.judge.parsed.similarity_1_to_10 <= 10
        assert run.clusters is not None, f"{run.run_id}: neither a partition nor a recorded cluster failure"
        if run.clusters.parsed is not None:
            assert sorted(i for c in run.clusters.parsed.clusters for i in c.answers) == list(range(1, n + 1))
        if server is not None and fresh:  # the loopback rule: identical answers, and only those, are one meaning
            texts = [resp.text for resp in run.responses]
            assert run.clusters.failure is None, run.clusters.failure
            assert {frozenset(c.answers) for c in run.clusters.parsed.clusters} == {
                frozenset(i for i, u in enumerate(texts, 1) if u == t) for t in texts}, run.run_id
    if eos_rate:  # answers ended on their own, at many lengths: the early-stop paths ran at full size
        answers = [resp for run in results.runs for resp in run.responses]
        lengths = sorted(resp.n_tokens for resp in answers)
        print(f"eos mode: {sum(r.finish_reason == 'eos' for r in answers)} of {len(answers)} answers ended at eos; "
              f"lengths min {lengths[0]} median {lengths[len(lengths) // 2]} max {lengths[-1]}, "
              f"{len(set(lengths))} distinct")
        assert sum(resp.finish_reason == "eos" for resp in answers) > len(answers) // 2
        assert len({resp.n_tokens for resp in answers}) > config.max_new_tokens // 4
    if server is not None and fresh:
        assert len(server.requests) >= 2 * len(results.runs)  # a verdict and a cluster call per run
    for name in ("A_judge_scores.png", "B_target_means.png", "C_per_question.png", "heatmap.png", "D_clusters.png",
                 "summary.json", "report.md"):
        assert (report.report_dir / name).stat().st_size > 0, name
    clusters = json.loads((report.report_dir / "summary.json").read_text())["clusters"]
    report_md = (report.report_dir / "report.md").read_text()
    for metric in ("n_clusters", "semantic_entropy_bits", "modal_share", "pairwise_agreement"):
        block = clusters["metrics"][metric]
        assert block["n"] and block["mean_ci95"] is not None, metric
        assert f"| {metric} (" in report_md and f"{block['mean']:.3f}" in report_md, metric
    agreement = clusters["metrics"]["pairwise_agreement"]
    print(f"clusters: {clusters['n_clustered']} runs, pairwise agreement {agreement['mean']:.3f} "
          f"{agreement['mean_ci95']}")
