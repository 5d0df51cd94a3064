"""The meaning clusters in the report: plot D (the four per-run numbers' distributions, and per-question means of
pairwise agreement) and report.md's section, from summary.json's ``clusters`` block (analysis/clusters.py).

figures.py lists ``cluster_plots`` among the plot sets and report.py ``clusters_md_section`` among its sections.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ao_resampling.analysis.clusters import CLUSTER_METRICS, PAIRWISE_AGREEMENT_SENTENCE, cluster_values
from ao_resampling.analysis.plots import BAR_COLOR, new_figure, question_label
from ao_resampling.analysis.stats import group_values
from ao_resampling.results import Results

PLOT_D = "D_clusters.png"


def cluster_distributions(results: Results) -> Figure:
    """D: one panel per number (how many meanings, semantic entropy, modal share, pairwise agreement) over the runs
    with a partition, and the per-question mean pairwise agreement."""
    fig = new_figure(15, 7.5)
    grid = fig.add_gridspec(2, 4)
    stand_in = " (STAND-IN model)" if results.meta.stand_in else ""
    # each number's whole scale: 1..N meanings, 0..log2 N bits, shares and chances 0..1
    n_answers = max((len(r.responses) for r in results.runs), default=2)
    for k, (metric, label) in enumerate(CLUSTER_METRICS.items()):
        ax = fig.add_subplot(grid[0, k])
        values = list(cluster_values(results.runs, metric).values())
        if metric == "n_clusters":
            ax.hist(values, bins=np.arange(0.5, n_answers + 1.5, 1.0), color=BAR_COLOR, edgecolor="white")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            upper = max(np.log2(max(n_answers, 2)), max(values, default=0.0)) if metric == "semantic_entropy_bits" \
                else 1.0
            ax.hist(values, bins=np.linspace(0.0, upper, 21), color=BAR_COLOR, edgecolor="white")
        if values:
            mean = float(np.mean(values))
            ax.axvline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.2f}")
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("runs")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{metric} (n={len(values)} runs)", fontsize=9)
    _per_question_means(results, fig.add_subplot(grid[1, :]))
    fig.suptitle(f"D: meaning clusters of each run's answers, by the cluster judge{stand_in}", fontsize=11)
    return fig


def _per_question_means(results: Results, ax) -> None:
    groups = group_values(results, cluster_values(results.runs, "pairwise_agreement"), "question")
    texts = {q.id: q.text for q in results.ao_questions}
    rows = sorted(((float(np.mean(v)), q) for q, v in groups.items() if v), reverse=True)
    bars = ax.bar(range(len(rows)), [m for m, _ in rows], color=BAR_COLOR)
    ax.bar_label(bars, labels=[f"{m:.2f}" for m, _ in rows], fontsize=7)  # a mean of 0 draws no bar
    ax.set_xticks(range(len(rows)), [question_label(texts[q], width=24) for _, q in rows], fontsize=7)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("mean pairwise agreement")
    ax.set_title("per question: mean pairwise agreement over its targets", fontsize=9)


def cluster_plots(results: Results) -> dict[str, Callable[[Results], Figure]]:
    return {PLOT_D: cluster_distributions} if cluster_values(results.runs, "n_clusters") else {}


# ---------------------------------------------------------------------------------------------------------------------
# report.md


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def _ci(ci: Sequence[float] | None, fmt: str = ".3f") -> str:
    return "–" if ci is None else f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def _reasons(failures: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in failures.items())


def _spearman(block: Mapping[str, Any], other: str) -> str:
    if block["spearman"] is None:
        return f"against {other}: no rank correlation ({block['n']} runs with both)"
    return f"against {other}: Spearman ρ = {block['spearman']:.3f} (p = {block['spearman_p']:.2g}, {block['n']} runs)"


def clusters_markdown(summary: Mapping[str, Any], results: Results, plots: Mapping[str, str]) -> str | None:
    block = summary.get("clusters")
    if block is None:
        return None
    lines = ["## Meaning clusters: how many different things the oracle says", "",
             "The cluster judge grouped each run's answers by meaning (shown shuffled, mapped back). "
             + PAIRWISE_AGREEMENT_SENTENCE, "",
             f"{block['n_clustered']} runs clustered"
             + (f", {block['n_failures']} cluster calls failed ({_reasons(block['failures'])}; left out, never a "
                "number)" if block["n_failures"] else "")
             + (f", {block['n_unclustered']} not asked yet" if block["n_unclustered"] else "") + ".", "",
             "| number | runs | mean | 95% CI (bootstrap over targets) | median | min–max |",
             "| --- | ---: | ---: | --- | ---: | --- |"]
    for metric, label in CLUSTER_METRICS.items():
        m = block["metrics"][metric]
        lines.append(f"| {metric} ({label}) | {m['n']} | {_num(m['mean'])} | {_ci(m['mean_ci95'])} | "
                     f"{_num(m['median'])} | {_num(m['min'])}–{_num(m['max'])} |")
    lines += ["", "Pairwise agreement " + _spearman(block["pairwise_agreement_vs_judge"], "the judge score") + "; "
              + _spearman(block["pairwise_agreement_vs_embedding"], "the embedding similarity") + ".", ""]
    texts = {q.id: q.text for q in results.ao_questions}
    per_q = block["metrics"]["pairwise_agreement"]["per_question"]
    lines += ["| question | runs | mean pairwise agreement | mean semantic entropy (bits) |",
              "| --- | ---: | ---: | ---: |"]
    entropy = block["metrics"]["semantic_entropy_bits"]["per_question"]
    for q, row in per_q.items():
        lines.append(f"| {q}: {' '.join(texts.get(q, '').split())[:80]} | {row['n']} | {_num(row['mean'])} | "
                     f"{_num(entropy[q]['mean'])} |")
    rep = block.get("repeats")
    if rep is not None:
        lines += ["", f"Cluster judge noise: {rep['n_pairs']} repeated cluster calls (answers shuffled differently) "
                  f"against the first: mean adjusted Rand index {_num(rep['mean_ari'])} (95% CI "
                  f"{_ci(rep['ari_ci95'])}); the same partition in {_num(rep['same_partition_rate'], '.1%')}."]
    base = block.get("baseline")
    if base is not None:
        gap = base["pairwise_agreement_ao_minus_target"]
        agreement = base["pairwise_agreement"]
        lines += ["", f"Target model (baseline, one run per target): pairwise agreement {_num(agreement['mean'])} "
                  f"(95% CI {_ci(agreement['ci95'])}), semantic entropy "
                  f"{_num(base['semantic_entropy_bits']['mean'])} bits; the AO's per-target mean minus the target "
                  f"model's: {_num(gap['mean'], '+.3f')} (95% CI {_ci(gap['ci95'])}, {gap['n_targets']} targets)."]
    if PLOT_D in plots:
        lines += ["", f"![D: meaning clusters]({plots[PLOT_D]})"]
    return "\n".join(lines)
