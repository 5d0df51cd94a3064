"""The meaning clusters in summary.json, report.md, plot D and the sweep report, on hand-built results whose
numbers are recomputed here from the labels by brute force (pairs of answers, pair counting for the ARI)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from matplotlib.figure import Figure
from scipy.stats import spearmanr

from ao_resampling.analysis.cluster_report import PLOT_D, cluster_distributions
from ao_resampling.analysis.clusters import PAIRWISE_AGREEMENT_SENTENCE
from ao_resampling.analysis.report import write_report
from ao_resampling.analysis.summary import summarize
from ao_resampling.analysis.sweep_report import summarize_sweep, write_sweep_report
from ao_resampling.results import Baseline, BaselineRun, Response
from tests.support.results_factory import DECODING, cluster_record, make_results, spread_from_score
from tests.unit.test_clusters import brute_agreement, brute_ari

# Labels of the three answers of each run (t, q); "timeout": a failed cluster call; None: not asked.
LABELS = {(0, 0): [0, 0, 0], (0, 1): [0, 0, 1], (0, 2): [0, 1, 2],
          (1, 0): [0, 1, 1], (1, 1): "not_a_partition", (1, 2): [0, 0, 0],
          (2, 0): [0, 1, 0], (2, 1): [0, 0, 0], (2, 2): None}
REPEAT_LABELS = {(0, 0): [[0, 0, 1]], (1, 0): [[0, 1, 1], "invalid_json"]}


@pytest.fixture
def clustered():
    return make_results([[10, 8, 3], [6, None, 9], [7, 9, 2]], spread=spread_from_score,
                        clusters=lambda t, q, cell: LABELS[t, q],
                        cluster_repeats=lambda t, q, cell: REPEAT_LABELS.get((t, q), ()))


def agreements() -> dict[tuple[int, int], float]:
    return {k: brute_agreement(v) for k, v in LABELS.items() if isinstance(v, list)}


def test_summary_holds_the_four_numbers_recomputed_from_the_labels(clustered):
    block = summarize(clustered, n_boot=300)["clusters"]
    assert (block["n_clustered"], block["n_failures"], block["failures"], block["n_unclustered"]) == (
        7, 1, {"not_a_partition": 1}, 1)
    m = block["metrics"]
    pairs = agreements()
    assert m["pairwise_agreement"]["n"] == 7
    assert m["pairwise_agreement"]["mean"] == pytest.approx(np.mean(list(pairs.values())))
    n_meanings = [len(set(v)) for v in LABELS.values() if isinstance(v, list)]
    assert m["n_clusters"]["mean"] == pytest.approx(np.mean(n_meanings))
    assert m["modal_share"]["min"] == pytest.approx(1 / 3)
    assert m["semantic_entropy_bits"]["max"] == pytest.approx(np.log2(3))
    for metric in m.values():
        lo, hi = metric["mean_ci95"]
        assert lo <= metric["mean"] <= hi
    # per question: the mean over the targets with a partition
    assert m["pairwise_agreement"]["per_question"]["q1"]["mean"] == pytest.approx(
        np.mean([pairs[0, 0], pairs[1, 0], pairs[2, 0]]))
    assert m["pairwise_agreement"]["per_question"]["q2"]["n"] == 2


def test_summary_spearman_against_judge_and_embedding(clustered):
    block = summarize(clustered, n_boot=100)["clusters"]
    pairs = agreements()
    scores = {(0, 0): 10, (0, 1): 8, (0, 2): 3, (1, 0): 6, (1, 2): 9, (2, 0): 7, (2, 1): 9}
    both = [k for k in pairs if k in scores]
    expected = spearmanr([pairs[k] for k in both], [scores[k] for k in both]).statistic
    assert block["pairwise_agreement_vs_judge"]["n"] == len(both) == 7
    assert block["pairwise_agreement_vs_judge"]["spearman"] == pytest.approx(expected)
    assert block["pairwise_agreement_vs_embedding"]["n"] == 7  # every clustered run has a spread


def test_summary_repeats_are_the_ari_with_the_first_partition(clustered):
    rep = summarize(clustered, n_boot=100)["clusters"]["repeats"]
    expected = [brute_ari(LABELS[0, 0], [0, 0, 1]), brute_ari(LABELS[1, 0], [0, 1, 1])]  # the failure pairs with none
    assert rep["n_pairs"] == 2 and rep["mean_ari"] == pytest.approx(np.mean(expected))
    assert rep["same_partition_rate"] == 0.5
    assert rep["ari_ci95"][0] <= rep["mean_ari"] <= rep["ari_ci95"][1]


def test_summary_baseline_clusters_and_the_paired_gap(clustered):
    base_labels = {"t1": [0, 0, 0], "t2": [0, 1, 2], "t3": "timeout"}
    runs = [BaselineRun(run_id=f"baseline__{t}", target_id=t, clusters=cluster_record(lab),
                        responses=[Response(sample_id=f"b{t}{k}", text="r", decoding=DECODING) for k in range(3)])
            for t, lab in base_labels.items()]
    results = clustered.model_copy(update={"baseline": Baseline(meta={}, runs=runs)})
    base = summarize(results, n_boot=100)["clusters"]["baseline"]
    assert base["counts"]["n_clustered"] == 2 and base["counts"]["failures"] == {"timeout": 1}
    assert base["pairwise_agreement"]["mean"] == pytest.approx(0.5)
    pairs = agreements()
    ao = {0: np.mean([pairs[0, q] for q in range(3)]), 1: np.mean([pairs[1, 0], pairs[1, 2]])}
    gap = base["pairwise_agreement_ao_minus_target"]
    assert gap["n_targets"] == 2 and gap["mean"] == pytest.approx(np.mean([ao[0] - 1.0, ao[1] - 0.0]))


def test_no_cluster_records_no_block_and_no_plot_d(tmp_path):
    results = make_results([[10, 8]], spread=spread_from_score)
    assert "clusters" not in summarize(results, n_boot=100)
    paths = write_report(results, tmp_path, n_boot=100)
    assert PLOT_D not in paths.plots and "Meaning clusters" not in paths.report_md.read_text()


def test_report_md_and_plot_d(clustered, tmp_path):
    paths = write_report(clustered, tmp_path, n_boot=200)
    assert (tmp_path / PLOT_D).stat().st_size > 0
    text = paths.report_md.read_text()
    summary = json.loads(paths.summary_json.read_text())
    assert PAIRWISE_AGREEMENT_SENTENCE in text and f"![D: meaning clusters]({PLOT_D})" in text
    m = summary["clusters"]["metrics"]["pairwise_agreement"]
    lo, hi = m["mean_ci95"]
    assert f"| {m['mean']:.3f} | [{lo:.3f}, {hi:.3f}] |" in text
    assert "1 cluster calls failed (not_a_partition: 1" in text and "mean adjusted Rand index" in text


def test_plot_d_has_a_panel_per_number_and_the_per_question_means(clustered):
    fig = cluster_distributions(clustered)
    assert isinstance(fig, Figure) and len(fig.axes) == 5
    assert [ax.get_title().split(" ")[0] for ax in fig.axes[:4]] == [
        "n_clusters", "semantic_entropy_bits", "modal_share", "pairwise_agreement"]
    assert all("n=7 runs" in ax.get_title() for ax in fig.axes[:4])
    assert len(fig.axes[4].patches) == 3  # a bar per question


def test_sweep_report_pairs_pairwise_agreement_by_target_and_question(tmp_path, clustered):
    hotter = make_results([[10, 8, 3], [6, None, 9], [7, 9, 2]],
                          clusters=lambda t, q, cell: [0, 1, 2] if (t, q) != (2, 2) else None)
    manifest = {"varied": ["temperature"], "settings": {},
                "conditions": [{"name": "temperature=0.3", "folder": "a", "overrides": {"temperature": 0.3}},
                               {"name": "temperature=1.0", "folder": "b", "overrides": {"temperature": 1.0}}]}
    runs = {"temperature=0.3": clustered, "temperature=1.0": hotter}
    summary = summarize_sweep(manifest, runs, n_boot=200)
    block = summary["metrics"]["pairwise_agreement"]
    pairs = agreements()
    (paired,) = block["paired"]
    assert paired["n_pairs"] == len(pairs) == 7  # hotter's (2,2) is missing, so is clustered's (1,1) and (2,2)
    assert paired["mean_diff"] == pytest.approx(np.mean([0.0 - v for v in pairs.values()]))
    assert block["per_condition"]["temperature=1.0"]["mean"] == 0.0
    assert set(CLUSTER_METRICS_NAMES) <= set(summary["metrics"])
    report_dir = write_sweep_report(tmp_path, manifest, runs, n_boot=100)
    text = (report_dir / "sweep_report.md").read_text()
    assert "## pairwise_agreement: chance two answers mean the same" in text
    assert (report_dir / "sweep_lines.png").stat().st_size > 0


CLUSTER_METRICS_NAMES = ("n_clusters", "semantic_entropy_bits", "modal_share", "pairwise_agreement")


def test_bootstrap_resamples_targets_not_runs():
    """Nine runs of three targets whose runs agree within a target: resampling targets sees only three values."""
    results = make_results([[1, 1, 1]] * 3, clusters=lambda t, q, cell: [[0, 0, 0], [0, 1, 2], [0, 0, 1]][t])
    m = summarize(results, n_boot=2000)["clusters"]["metrics"]["pairwise_agreement"]
    lo, hi = m["mean_ci95"]
    per_target = [1.0, 0.0, 1 / 3]
    means = {np.mean(c) for c in itertools.product(per_target, repeat=3)}  # every resample of three targets
    assert min(means) <= lo <= hi <= max(means) and hi - lo > 0.4
