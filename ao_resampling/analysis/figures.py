"""Which figures a results file gets: plot sets, each ``results -> {file name: plot function}``.

A figure with no data is left out (an empty axis reads like a result); report.md says why it is missing. A later
analysis adds one provider to ``PLOT_SETS``; ``report.write_report`` writes what they return.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

from matplotlib.figure import Figure

from ao_resampling.analysis import plots
from ao_resampling.analysis.cluster_report import cluster_plots
from ao_resampling.analysis.comparison import embedding_comparison, judge_comparison
from ao_resampling.analysis.stats import embedding_similarities, judge_embedding_pairs, judge_scores
from ao_resampling.results import Results
from ao_resampling.files import atomic_write_bytes

PlotSet = Callable[[Results], dict[str, Callable[[Results], Figure]]]

JUDGE_PLOTS: dict[str, Callable[[Results], Figure]] = {
    "A_judge_scores.png": plots.judge_score_histogram,
    "B_target_means.png": plots.target_mean_histogram,
    "C_per_question.png": plots.per_question_distribution,
    "heatmap.png": plots.score_heatmap,
}
EMBEDDING_PLOTS: dict[str, Callable[[Results], Figure]] = {
    "A_embedding.png": plots.embedding_histogram,
    "B_embedding_target_means.png": plots.embedding_target_mean_histogram,
    "C_embedding_per_question.png": plots.embedding_per_question,
}
JUDGE_VS_EMBEDDING = "judge_vs_embedding.png"
BASELINE_VS_AO, BASELINE_VS_AO_EMBEDDING = "baseline_vs_ao.png", "baseline_vs_ao_embedding.png"
# Every figure a report may hold: a report written again into the same folder removes those it no longer draws.
FIGURE_NAMES = frozenset([*JUDGE_PLOTS, *EMBEDDING_PLOTS, JUDGE_VS_EMBEDDING, BASELINE_VS_AO, BASELINE_VS_AO_EMBEDDING])


def judge_plots(results: Results) -> dict[str, Callable[[Results], Figure]]:
    return JUDGE_PLOTS if judge_scores(results.runs) else {}


def embedding_plots(results: Results) -> dict[str, Callable[[Results], Figure]]:
    if not embedding_similarities(results.runs):
        return {}
    both = judge_embedding_pairs(results.runs)[0]
    return {**EMBEDDING_PLOTS, **({JUDGE_VS_EMBEDDING: plots.judge_vs_embedding} if both else {})}


def baseline_plots(results: Results) -> dict[str, Callable[[Results], Figure]]:
    if results.baseline is None:
        return {}
    out: dict[str, Callable[[Results], Figure]] = {}
    if judge_comparison(results).n:
        out[BASELINE_VS_AO] = plots.baseline_vs_ao
    if embedding_comparison(results).n:
        out[BASELINE_VS_AO_EMBEDDING] = plots.baseline_vs_ao_embedding
    return out


PLOT_SETS: list[PlotSet] = [judge_plots, embedding_plots, baseline_plots, cluster_plots]


def save_figure(fig: Figure, path: Path, *, dpi: int) -> None:
    """The PNG rendered in memory, then written atomically: a full disk leaves the old figure or none, never a
    truncated PNG that a viewer shows as a broken image."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(Path(path), buffer.getvalue())
