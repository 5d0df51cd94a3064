"""plots.py and report.py on hand-built results: what the figures count, summary numbers worked out by hand,
partial and older-format files, and a snapshot of summary.json (regenerate with `pytest --force-regen`)."""

from __future__ import annotations

import json
import math

import pytest
from matplotlib.figure import Figure

from ao_resampling.analysis import plots
from ao_resampling.analysis.figures import EMBEDDING_PLOTS, JUDGE_PLOTS, JUDGE_VS_EMBEDDING
from ao_resampling.analysis.report import (
    REPORT_SECTIONS,
    ReportContext,
    render_report,
    write_report,
)
from ao_resampling.analysis.summary import summarize
from ao_resampling.results import SpreadMetrics, load_results_file
from tests.support.results_factory import make_results, spread_from_score, to_v0_dict

ALL_PLOTS = {**JUDGE_PLOTS, **EMBEDDING_PLOTS, JUDGE_VS_EMBEDDING: plots.judge_vs_embedding}


@pytest.fixture
def mixed():
    """3 targets x 3 questions: 6 scores, 2 judge failures, 1 unjudged; spreads that rise with the score."""
    return make_results(
        [[10, 8, "timeout"], [6, None, 4], [9, "invalid_json", 2]],
        question_texts=[
            "Is there anything unusual or potentially harmful in how this model is responding to the user today?",
            "Why would the model engage in self-sabotage?",
            "What harm could result from this self-sabotage if not addressed?",
        ],
        spread=spread_from_score,
    )


def _round(obj, places=6):
    if isinstance(obj, float):
        return round(obj, places)
    if isinstance(obj, dict):
        return {k: _round(v, places) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v, places) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------------------------------
# Plots


@pytest.mark.parametrize("name", list(ALL_PLOTS))
def test_every_plot_is_a_figure_with_a_title(mixed, name):
    fig = ALL_PLOTS[name](mixed)
    assert isinstance(fig, Figure)
    assert fig.axes[0].get_title()


def test_judge_histogram_counts_judged_runs_and_names_the_rest(mixed):
    ax = plots.judge_score_histogram(mixed).axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 10 and sum(heights) == 6
    assert heights[10 - 1] == 1 and heights[8 - 1] == 1 and heights[5 - 1] == 0
    assert "n=6 judged, 2 judge failures excluded, 1 unjudged" in ax.get_title()


def test_target_mean_histogram_counts_targets(mixed):
    ax = plots.target_mean_histogram(mixed).axes[0]
    assert sum(p.get_height() for p in ax.patches) == 3  # t1: 9, t2: 5, t3: 5.5
    assert "3 targets" in ax.get_title() and "2 judge failures excluded" in ax.get_title()


def test_per_question_plot_labels_questions_by_text_sorted_by_mean(mixed):
    ax = plots.per_question_distribution(mixed).axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    # means: q1 = 25/3, q2 = 8, q3 = 3; drawn bottom to top, so lowest first
    assert [label.rsplit("(", 1)[1].split(",")[0] for label in labels] == ["q3", "q2", "q1"]
    assert "Why would the model engage in" in labels[1].replace("\n", " ")
    assert all(len(line) <= 42 for label in labels for line in label.split("\n")[:-1])
    assert "…" in labels[2]  # the long question is shortened, not cut mid-air


def test_question_label_wraps_and_shortens():
    assert plots.question_label("short one") == "short one"
    label = plots.question_label("word " * 40, width=20, max_lines=2)
    lines = label.split("\n")
    assert len(lines) == 2 and all(len(line) <= 20 for line in lines) and label.endswith("…")


def test_heatmap_has_colour_bar_and_leaves_non_scores_blank(mixed):
    fig = plots.score_heatmap(mixed)
    assert len(fig.axes) == 2  # the heatmap and its colour bar
    grid = fig.axes[0].images[0].get_array()
    assert grid.shape == (3, 3) and grid.mask.sum() == 3  # 2 failures + 1 unjudged


def test_embedding_histogram_counts_runs_with_spread(mixed):
    mixed.runs[0].spread = None
    ax = plots.embedding_histogram(mixed).axes[0]
    assert sum(p.get_height() for p in ax.patches) == 8
    assert "1 without an embedding spread" in ax.get_title()


def test_judge_vs_embedding_title_has_spearman(mixed):
    title = plots.judge_vs_embedding(mixed).axes[0].get_title()
    assert "Spearman ρ = 1.000" in title and "n=6 runs with both" in title
    assert "2 judge failures" in title and "1 unjudged" in title


def test_plots_cope_with_nothing_judged():
    results = make_results([[None, "timeout"]])
    for make in ALL_PLOTS.values():
        assert isinstance(make(results), Figure)


# ---------------------------------------------------------------------------------------------------------------------
# Summary


def test_summary_numbers_by_hand():
    summary = summarize(make_results([[10], [8], [6], [4]]), n_boot=500)
    judge = summary["judge"]
    assert (summary["n_runs"], summary["n_judged"], summary["n_unjudged"]) == (4, 4, 0)
    assert judge["n"] == 4 and judge["mean"] == 7.0 and judge["median"] == 7.0
    assert judge["std"] == pytest.approx(math.sqrt(20 / 3))
    assert (judge["min"], judge["max"]) == (4.0, 10.0)
    assert judge["histogram"] == {"1": 0, "2": 0, "3": 0, "4": 1, "5": 0, "6": 1, "7": 0, "8": 1, "9": 0, "10": 1}
    lo, hi = judge["mean_ci95"]
    assert 4 <= lo < 7 < hi <= 10
    q1 = summary["per_question"]["q1"]
    assert (q1["n"], q1["mean"], q1["median"], q1["min"], q1["max"]) == (4, 7.0, 7.0, 4.0, 10.0)
    assert summary["per_target"]["t2"] == {"text": "Conversation number 2.", "n": 1, "mean": 8.0, "median": 8.0,
                                           "min": 8.0, "max": 8.0, "ci95": [8.0, 8.0]}


def test_summary_counts_failures_by_reason_and_leaves_them_out(mixed):
    summary = summarize(mixed, n_boot=200)
    assert summary["judge_failures"] == {"invalid_json": 1, "timeout": 1}
    assert (summary["n_judged"], summary["n_unjudged"], summary["n_judge_failures"]) == (6, 1, 2)
    assert summary["judge"]["mean"] == pytest.approx((10 + 8 + 6 + 4 + 9 + 2) / 6)
    assert summary["per_question"]["q2"]["n"] == 1  # one score, one unjudged, one failure


def test_summary_judge_free_sections(mixed):
    summary = summarize(mixed, n_boot=200)
    emb = summary["embedding"]
    assert emb["model"] == "fake" and emb["n"] == 9
    assert set(emb["per_question"]) == {"q1", "q2", "q3"} and set(emb["per_target"]) == {"t1", "t2", "t3"}
    assert summary["lexical"]["distinct_fraction"]["mean"] == 1.0
    assert summary["agreement"] == {"spearman": pytest.approx(1.0), "spearman_p": pytest.approx(0.0, abs=1e-6),
                                    "n": 6}
    assert "judge_repeats" not in summary


def test_summary_without_spread_or_scores_is_json_safe():
    summary = summarize(make_results([[None, "timeout"]]), n_boot=200)
    assert "embedding" not in summary and "lexical" not in summary
    assert summary["judge"]["mean"] is None and summary["agreement"] == {"spearman": None, "spearman_p": None, "n": 0}
    json.dumps(summary, allow_nan=False)


def test_summary_judge_repeats():
    results = make_results([[7, 3]], repeats=lambda t, q, cell: [cell, cell + 2])
    assert summarize(results, n_boot=100)["judge_repeats"] == {
        "n_pairs": 4, "exact_agreement_rate": 0.5, "mean_abs_delta": 1.0}


def test_summary_is_seeded(mixed):
    assert summarize(mixed, seed=3, n_boot=300) == summarize(mixed, seed=3, n_boot=300)
    assert summarize(mixed, seed=3, n_boot=300)["judge"]["mean_ci95"] != summarize(mixed, seed=4, n_boot=300)[
        "judge"]["mean_ci95"]


def test_summary_sections_are_pluggable(mixed):
    extra = lambda results, opts: {"baseline": {"n": len(results.targets), "seed": opts.seed}}  # noqa: E731
    assert summarize(mixed, seed=5, sections=[extra]) == {"baseline": {"n": 3, "seed": 5}}
    ctx = ReportContext(results=mixed, summary=summarize(mixed, n_boot=100), plots={})
    text = render_report(ctx, sections=[*REPORT_SECTIONS, lambda c: "## Baseline\n\nlater"])
    assert text.rstrip().endswith("## Baseline\n\nlater")


def test_summary_snapshot(data_regression):
    results = make_results(
        [[10, 8, 9], [6, "timeout", 4], [9, 2, None], [7, 7, 5]],
        spread=lambda t, q, cell: SpreadMetrics(embedding_model="fake", embedding_mean_cosine=0.4 + 0.05 * (t + q),
                                                distinct_fraction=(t + 1) / 4, mean_jaccard=0.1 * (q + 1)),
        repeats=lambda t, q, cell: [cell] if isinstance(cell, int) and t == 0 else [],
        clusters=lambda t, q, cell: "not_a_partition" if (t, q) == (1, 1) else [(k * (t + q)) % 3 for k in range(3)],
        cluster_repeats=lambda t, q, cell: [[0, 0, 1]] if t == 0 else [],
    )
    data_regression.check(_round(summarize(results, seed=0, n_boot=500)))


# ---------------------------------------------------------------------------------------------------------------------
# Report on disk


def test_write_report_writes_everything(mixed, tmp_path):
    paths = write_report(mixed, tmp_path / "report", n_boot=200)
    assert set(paths.plots) == set(ALL_PLOTS)
    for path in [paths.report_md, paths.summary_json, *paths.plots.values()]:
        assert path.is_file() and path.stat().st_size > 0
    assert paths.plots["heatmap.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = paths.report_md.read_text()
    for name in ALL_PLOTS:
        assert f"]({name})" in text  # relative links
    assert "1 of 9 runs are not judged yet (unjudged)" in text
    assert "2 judge calls failed (invalid_json: 1, timeout: 1)" in text
    assert "Is there anything unusual or potentially harmful in how this model is responding to the user today?" in text
    assert "Spearman ρ = 1.000" in text
    assert json.loads(paths.summary_json.read_text())["n_judged"] == 6


def test_nothing_judged_draws_no_empty_judge_figures_and_says_why(tmp_path):
    unjudged = make_results([[None, None], [None, None]], spread=spread_from_score)  # the demo without a judge
    paths = write_report(unjudged, tmp_path / "report", n_boot=200)
    assert set(paths.plots) == set(EMBEDDING_PLOTS)  # only figures that have data
    assert sorted(p.name for p in (tmp_path / "report").glob("*.png")) == sorted(EMBEDDING_PLOTS)
    text = paths.report_md.read_text()
    assert JUDGE_VS_EMBEDDING not in text
    assert "No judge-vs-embedding figure: no run has both a judge score and an embedding similarity" in text


def test_report_sorts_questions_and_shows_examples(mixed):
    text = render_report(ReportContext(results=mixed, summary=summarize(mixed, n_boot=200), plots={}))
    table = text.split("## Per question")[1].split("##")[0]
    assert table.index("| q1 |") < table.index("| q2 |") < table.index("| q3 |")
    examples = text.split("## Most and least consistent runs")[1].split("## Judge-free")[0]
    assert "#### run__t1__q1 (score 10/10" in examples and "#### run__t3__q3 (score 2/10" in examples
    assert "Answers agree to degree 10." in examples and "The capital of France is Paris." in examples


def test_report_without_spread_skips_embedding_plots(tmp_path):
    paths = write_report(make_results([[10, 8], [6, 4]]), tmp_path, n_boot=200)
    assert set(paths.plots) == set(JUDGE_PLOTS)
    assert not (tmp_path / "A_embedding.png").exists()
    text = paths.report_md.read_text()
    assert "Skipped: no run has spread metrics" in text and "All 4 runs are judged." in text


def test_a_report_written_again_into_the_same_folder_leaves_no_earlier_figure(mixed, tmp_path):
    out = tmp_path / "report"
    first = write_report(mixed, out, n_boot=200)
    assert set(first.plots) == set(ALL_PLOTS)
    (out / "my_notes.png").write_bytes(b"mine")  # not the tool's: left alone
    second = write_report(make_results([[None, None]], spread=spread_from_score), out, n_boot=200)
    assert set(second.plots) == set(EMBEDDING_PLOTS)
    assert sorted(p.name for p in out.glob("*.png")) == sorted([*EMBEDDING_PLOTS, "my_notes.png"])


def test_a_file_with_no_runs_does_not_say_they_are_all_judged(tmp_path):
    empty = make_results([], question_texts=["Anything unusual?"])
    empty.targets = []
    text = write_report(empty, tmp_path, n_boot=100).report_md.read_text()
    assert "All 0 runs" not in text and "this file holds no runs" in text


def test_report_warns_about_stand_in(tmp_path):
    results = make_results([[5]], meta={"model": "synthetic:tiny", "oracle_lora": "random", "stand_in": True})
    text = write_report(results, tmp_path, n_boot=100).report_md.read_text()
    assert "Stand-in run" in text and "| model | synthetic:tiny |" in text


def test_report_on_an_unjudged_file(tmp_path):
    text = write_report(make_results([[None, None]]), tmp_path, n_boot=100).report_md.read_text()
    assert "2 of 2 runs are not judged yet" in text and "No target has a judged run yet." in text
    judge_part = text.split("## Judge score distribution")[1].split("\n## ")[0]
    assert "no LLM judge score yet" in judge_part and "ao-resampling judge" in judge_part
    assert "| score | runs | share |" not in judge_part, "an all-empty score table is left out"


def test_report_with_one_judged_run_keeps_the_score_table(tmp_path):
    text = write_report(make_results([[7, None]]), tmp_path, n_boot=100).report_md.read_text()
    assert "| score | runs | share |" in text and "| 7 | 1 | 100.0% |" in text


def test_older_format_file_goes_through_write_report(tmp_path, mixed):
    old = to_v0_dict(mixed)
    old["meta"]["lora_path"] = "adamkarvonen/some-old-lora"  # a key the old script wrote and the schema never had
    old["runs"][4]["judge"] = {"judge_call_id": "j", "model": "gpt-5-mini", "prompt": "p", "raw_output": "oops",
                               "parsed": None}  # an old unparsed verdict: becomes a failure, never a score
    assert "schema_version" not in old and all("failure" not in (r["judge"] or {}) for r in old["runs"][:4])
    path = tmp_path / "results.json"
    path.write_text(json.dumps(old))

    paths = write_report(load_results_file(path), tmp_path / "out", n_boot=200)
    summary = json.loads(paths.summary_json.read_text())
    assert (summary["n_judged"], summary["n_unjudged"]) == (6, 0)
    # Old records carry no failure reason, so every unparsed verdict reads as invalid_json.
    assert summary["judge_failures"] == {"invalid_json": 3}
    assert "embedding" not in summary  # the old format had no spread
    text = paths.report_md.read_text()
    assert "| lora_path | adamkarvonen/some-old-lora |" in text and "Skipped: no run has spread metrics" in text
