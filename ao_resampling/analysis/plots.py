"""Figures from a results file: the judge's view and the judge-free (embedding) view, side by side.

Every function takes ``Results`` and returns a matplotlib ``Figure``; report.py decides the file names and saves
them. Figures are built on the Agg canvas directly (no pyplot), so making hundreds of them leaks no global state and
needs no display. A failed judge call or a run not judged yet is never a score: it is left out and counted in the
title. The embedding figures use ``run.spread`` (cached by ``stages.spread.spread_stage``).

A: distribution of per-run values; B: distribution of per-target means; C: per-question distribution across
targets, questions sorted by mean; plus a target x question heatmap and judge score vs embedding similarity, and,
when the file has a target-model baseline, the AO's per-target mean against the target model's own similarity.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ao_resampling.analysis.comparison import Comparison, embedding_comparison, judge_comparison
from ao_resampling.analysis.stats import (
    SCORES,
    embedding_similarities,
    group_means,
    group_values,
    judge_counts,
    judge_embedding_pairs,
    judge_scores,
    spearman,
)
from ao_resampling.results import Results

JUDGE_AXIS = "judge similarity score (1 = answers unrelated, 10 = same answer)"
EMBEDDING_AXIS = "mean pairwise cosine similarity of the answers"
BAR_COLOR = "#4C72B0"
EMB_COLOR = "#55A868"


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def question_label(text: str, *, width: int = 42, max_lines: int = 2) -> str:
    """Question text wrapped to ``max_lines`` lines of ``width``, shortened with an ellipsis when longer."""
    lines = textwrap.wrap(" ".join(text.split()), width=width, break_on_hyphens=False) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: width - 1].rstrip(" ,;:") + "…"
    return "\n".join(lines)


def _embedding_model(results: Results) -> str:
    models = sorted({r.spread.embedding_model or "?" for r in results.runs if r.spread is not None})
    return ", ".join(models) if models else "no model"


def _embedding_note(results: Results, values: Mapping[str, float]) -> str:
    missing = len(results.runs) - len(values)
    return f"n={len(values)} runs" + (f", {missing} without an embedding spread" if missing else "")


def _continuous_bins(values: Sequence[float], upper: float = 1.0, n_bins: int = 30) -> np.ndarray:
    lo = min(min(values), upper) if len(values) else upper - 1.0
    if upper - lo < 1e-3:
        lo = upper - 1e-3
    return np.linspace(lo, upper, n_bins + 1)


def _mean_line(ax: Axes, values: Sequence[float], fmt: str) -> None:
    if len(values):
        mean = float(np.mean(values))
        ax.axvline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:{fmt}}")
        ax.legend(loc="best", framealpha=0.9)  # "best" keeps it off the tallest bars


def _histogram(values: Sequence[float], *, bins, color: str, mean_fmt: str, xlabel: str, ylabel: str,
               title: str) -> tuple[Figure, Axes]:
    fig = new_figure(7, 4.2)
    ax = fig.add_subplot()
    ax.hist(values, bins=bins, color=color, edgecolor="white")
    _mean_line(ax, values, mean_fmt)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    return fig, ax


# ---------------------------------------------------------------------------------------------------------------------
# Judge view


def judge_score_histogram(results: Results) -> Figure:
    """A: one bar per score 1..10 over every judged run."""
    scores = list(judge_scores(results.runs).values())
    counts = [scores.count(s) for s in SCORES]
    fig = new_figure(7, 4.2)
    ax = fig.add_subplot()
    bars = ax.bar(list(SCORES), counts, width=0.8, color=BAR_COLOR)
    ax.bar_label(bars, labels=[str(c) if c else "" for c in counts], fontsize=8)
    _mean_line(ax, scores, ".2f")
    ax.set_xticks(list(SCORES))
    ax.set_xlim(0.4, 10.6)
    ax.set_xlabel(JUDGE_AXIS)
    ax.set_ylabel("runs")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Judge scores of all runs\n{judge_counts(results.runs).note()}")
    return fig


def target_mean_histogram(results: Results) -> Figure:
    """B: per-target mean judge score over that target's judged questions."""
    means = list(group_means(group_values(results, judge_scores(results.runs), "target")).values())
    fig, ax = _histogram(means, bins=np.arange(1.0, 10.01, 0.5), color=BAR_COLOR, mean_fmt=".2f",
                         xlabel="mean judge score of the target (over its questions)", ylabel="targets",
                         title=f"Per-target mean judge score ({len(means)} targets)\n"
                               f"{judge_counts(results.runs).note()}")
    ax.set_xticks(list(SCORES))
    ax.set_xlim(0.8, 10.2)
    return fig


def _per_question_boxes(
    results: Results, values: Mapping[str, float], *, xlim: tuple[float, float], xlabel: str, title: str, color: str,
    xticks: Sequence[float] | None = None,
) -> Figure:
    groups = {k: v for k, v in group_values(results, values, "question").items() if v}
    order = sorted(groups, key=lambda k: np.mean(groups[k]))  # lowest first: matplotlib draws it at the bottom
    texts = {q.id: q.text for q in results.ao_questions}
    fig = new_figure(10, 1.0 + 0.62 * max(len(order), 1))
    ax = fig.add_subplot()
    if order:
        data = [groups[k] for k in order]
        box = ax.boxplot(
            data, orientation="horizontal", showmeans=True, widths=0.55, patch_artist=True,
            meanprops=dict(marker="D", markerfacecolor="black", markeredgecolor="black", markersize=4),
            medianprops=dict(color="black"), flierprops=dict(marker="", linestyle="none"),
        )
        for patch in box["boxes"]:
            patch.set(facecolor=color, alpha=0.35)
        rng = np.random.default_rng(0)  # jitter only; fixed so figures are reproducible
        for i, vals in enumerate(data, start=1):
            ax.scatter(vals, i + rng.uniform(-0.18, 0.18, len(vals)), s=7, color=color, alpha=0.45, linewidths=0)
        ax.set_yticks(range(1, len(order) + 1))
        ax.set_yticklabels(
            [f"{question_label(texts[k])}\n({k}, n={len(groups[k])}, mean {np.mean(groups[k]):.2f})" for k in order],
            fontsize=7.5,
        )
    ax.set_xlim(*xlim)
    if xticks is not None:
        ax.set_xticks(list(xticks))
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    return fig


def per_question_distribution(results: Results) -> Figure:
    """C: each question's scores across targets (box, mean diamond, points), sorted by mean, highest at the top."""
    return _per_question_boxes(
        results, judge_scores(results.runs), xlim=(0.5, 10.5), xticks=SCORES, xlabel=JUDGE_AXIS, color=BAR_COLOR,
        title=f"Judge score per question, across targets\n{judge_counts(results.runs).note()}",
    )


def score_heatmap(results: Results) -> Figure:
    """Target x question judge scores; rows and columns sorted by mean; grey = no score (failed or unjudged)."""
    scores = judge_scores(results.runs)
    q_means = group_means(group_values(results, scores, "question"))
    t_means = group_means(group_values(results, scores, "target"))
    q_order = sorted((q.id for q in results.ao_questions), key=lambda k: -q_means.get(k, -np.inf))
    t_order = sorted((t.id for t in results.targets), key=lambda k: -t_means.get(k, -np.inf))
    grid_TQ = np.full((len(t_order), len(q_order)), np.nan)
    t_index, q_index = {k: i for i, k in enumerate(t_order)}, {k: j for j, k in enumerate(q_order)}
    for run in results.runs:
        if run.run_id in scores:
            grid_TQ[t_index[run.target_id], q_index[run.ao_question_id]] = scores[run.run_id]
    texts = {q.id: q.text for q in results.ao_questions}

    fig = new_figure(max(7.5, 0.75 * len(q_order) + 3.5), min(40.0, max(5.0, 0.14 * len(t_order) + 3.0)))
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(grid_TQ), aspect="auto", cmap=cmap, vmin=1, vmax=10, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="judge score", ticks=list(SCORES), shrink=1.0 if len(t_order) <= 30 else 0.4)
    ax.set_xticks(range(len(q_order)))
    ax.set_xticklabels([f"{k}: {question_label(texts[k], width=28)}" for k in q_order], rotation=40, ha="right",
                       fontsize=7)
    ax.set_yticks(range(len(t_order)))
    ax.set_yticklabels(t_order, fontsize=max(4.0, min(8.0, 500 / max(len(t_order), 1))))
    ax.set_xlabel("question (sorted by mean score)\ngrey cells: no score (judge call failed or not judged yet)")
    ax.set_ylabel("target (sorted by mean score)")
    ax.set_title(f"Judge score per target and question\n{judge_counts(results.runs).note()}")
    return fig


# ---------------------------------------------------------------------------------------------------------------------
# Judge-free view


def embedding_histogram(results: Results) -> Figure:
    """A (embedding): mean pairwise cosine of each run's answers, bins over [min, 1]."""
    sims = embedding_similarities(results.runs)
    values = list(sims.values())
    fig, _ = _histogram(values, bins=_continuous_bins(values), color=EMB_COLOR, mean_fmt=".3f", xlabel=EMBEDDING_AXIS,
                        ylabel="runs", title=f"Embedding similarity of all runs ({_embedding_model(results)})\n"
                                         f"{_embedding_note(results, sims)}")
    return fig


def embedding_target_mean_histogram(results: Results) -> Figure:
    """B (embedding): per-target mean of the runs' embedding similarity."""
    sims = embedding_similarities(results.runs)
    means = list(group_means(group_values(results, sims, "target")).values())
    fig, _ = _histogram(means, bins=_continuous_bins(means, n_bins=20), color=EMB_COLOR, mean_fmt=".3f",
                        xlabel="mean embedding similarity of the target (over its questions)", ylabel="targets",
                        title=f"Per-target mean embedding similarity ({len(means)} targets)\n"
                              f"{_embedding_note(results, sims)}")
    return fig


def embedding_per_question(results: Results) -> Figure:
    """C (embedding): each question's embedding similarity across targets, sorted by mean."""
    sims = embedding_similarities(results.runs)
    lo = _continuous_bins(list(sims.values()))[0]
    return _per_question_boxes(
        results, sims, xlim=(lo - 0.02 * (1.0 - lo), 1.0 + 0.02 * (1.0 - lo)), xlabel=EMBEDDING_AXIS, color=EMB_COLOR,
        title=f"Embedding similarity per question, across targets ({_embedding_model(results)})\n"
        f"{_embedding_note(results, sims)}",
    )


def judge_vs_embedding(results: Results) -> Figure:
    """Judge score (jittered) against embedding similarity, one point per run with both; Spearman in the title."""
    scores, sims = judge_embedding_pairs(results.runs)
    rho, p = spearman(scores, sims)
    fig = new_figure(7, 5)
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)  # jitter only
    x = np.asarray(scores, dtype=float) + rng.uniform(-0.18, 0.18, len(scores))
    ax.scatter(x, sims, s=9, alpha=0.4, color=BAR_COLOR, linewidths=0, label="run")
    present = sorted(set(scores))
    if present:
        means = [float(np.mean([s for k, s in zip(scores, sims) if k == score])) for score in present]
        ax.plot(present, means, "D-", color="black", markersize=4, linewidth=1, label="mean per score")
        ax.legend(loc="lower right", frameon=False)
    ax.set_xticks(list(SCORES))
    ax.set_xlim(0.4, 10.6)
    ax.set_xlabel(JUDGE_AXIS)
    ax.set_ylabel(EMBEDDING_AXIS)
    corr = "Spearman ρ = n/a" if rho is None else f"Spearman ρ = {rho:.3f} (p = {p:.2g})"
    counts = judge_counts(results.runs)
    excluded = {
        "judge failures": counts.n_failed,
        "unjudged": counts.n_unjudged,
        "judged, no embedding": counts.n_judged - len(scores),
    }
    why = ", ".join(f"{n} {what}" for what, n in excluded.items() if n)
    ax.set_title(f"Judge score vs embedding similarity: {corr}\nn={len(scores)} runs with both"
                 + (f" (excluded: {why})" if why else ""))
    return fig


# ---------------------------------------------------------------------------------------------------------------------
# Target-model baseline


def _baseline_scatter(comp: Comparison, *, xlabel: str, ylabel: str, lims: tuple[float, float], what: str,
                      color: str) -> Figure:
    """One labelled point per target: the target model's own similarity (x) against the AO's mean (y)."""
    fig = new_figure(7.5, 6.2)
    ax = fig.add_subplot()
    x, y = [p.baseline for p in comp.pairs], [p.ao for p in comp.pairs]
    ax.plot(lims, lims, color="grey", linestyle=":", linewidth=1, label="AO = target model")
    ax.scatter(x, y, s=18, color=color, alpha=0.7, linewidths=0)
    fontsize = max(4.0, min(8.0, 400 / max(comp.n, 1)))
    for p in comp.pairs:
        ax.annotate(p.target_id, (p.baseline, p.ao), xytext=(3, 2), textcoords="offset points", fontsize=fontsize)
    ax.set_xlim(*lims)
    ax.set_ylim(*lims)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc="upper left", frameon=False)
    r = "n/a" if comp.pearson_r is None else f"{comp.pearson_r:.3f} (p = {comp.pearson_p:.2g})"
    rho = "n/a" if comp.spearman_r is None else f"{comp.spearman_r:.3f} (p = {comp.spearman_p:.2g})"
    ax.set_title(f"AO vs target model, {what} (n={comp.n} targets with both)\n"
                 f"Pearson r = {r}, Spearman ρ = {rho}")
    return fig


def baseline_vs_ao(results: Results) -> Figure:
    """Per target: the judge's score of the target model's own replies against the AO's mean score."""
    fig = _baseline_scatter(judge_comparison(results), lims=(0.5, 10.5), what="judge similarity", color=BAR_COLOR,
                            xlabel="target model's own similarity (judge score of its n replies)",
                            ylabel="AO mean judge score over the target's questions")
    fig.axes[0].set_xticks(list(SCORES))
    fig.axes[0].set_yticks(list(SCORES))
    return fig


def baseline_vs_ao_embedding(results: Results) -> Figure:
    """The same in the embedding view: mean pairwise cosine of the replies against the AO runs' mean."""
    comp = embedding_comparison(results)
    values = [v for p in comp.pairs for v in (p.ao, p.baseline)]
    lo = _continuous_bins(values)[0]
    pad = 0.03 * (1.0 - lo)
    return _baseline_scatter(comp, lims=(lo - pad, 1.0 + pad), what=f"embedding similarity ({comp.model})",
                             color=EMB_COLOR,
                             xlabel="target model's own similarity (mean pairwise cosine of its replies)",
                             ylabel="AO mean embedding similarity over the target's questions")
