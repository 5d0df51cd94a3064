"""Pure statistics over ``Results``: which runs count as scores, grouping, bootstrap CIs, correlations, summaries.

A failed judge call is never a score and an unjudged run is not one yet (``judge_counts`` says how many of each);
per-question / per-target grouping keeps the file's order; every CI has its own seeded generator (``rng_for``), so
adding a statistic never moves another's numbers; a statistic that does not exist is None, never NaN. summary.py,
plots.py, comparison.py and sweep_report.py read their numbers from here; nothing here loads a model or a file.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ao_resampling.results import Results, Run

SCORES = range(1, 11)


# ---------------------------------------------------------------------------------------------------------------------
# Which runs count


@dataclass(frozen=True)
class JudgeCounts:
    """How many runs carry a score, and why the others do not. Failed and unjudged runs are never scores."""

    n_runs: int
    n_judged: int
    n_unjudged: int
    failures: dict[str, int]

    @property
    def n_failed(self) -> int:
        return sum(self.failures.values())

    def note(self) -> str:
        """For plot titles: 'n=997 judged, 3 judge failures excluded, 2 unjudged'."""
        parts = [f"n={self.n_judged} judged"]
        if self.n_failed:
            parts.append(f"{self.n_failed} judge failure{'s' if self.n_failed != 1 else ''} excluded")
        if self.n_unjudged:
            parts.append(f"{self.n_unjudged} unjudged")
        return ", ".join(parts)


def judge_counts(runs: Sequence[Run]) -> JudgeCounts:
    failures = Counter(r.judge.failure.reason for r in runs if r.judge is not None and r.judge.failure is not None)
    n_judged = sum(1 for r in runs if r.judge is not None and r.judge.parsed is not None)
    n_unjudged = sum(1 for r in runs if r.judge is None)
    return JudgeCounts(len(runs), n_judged, n_unjudged, dict(sorted(failures.items())))


def judge_scores(runs: Iterable[Run]) -> dict[str, int]:
    """run_id -> judge score, for runs whose judge call gave a parsed verdict (in run order)."""
    return {r.run_id: r.judge.parsed.similarity_1_to_10 for r in runs if r.judge is not None and r.judge.parsed}


def embedding_similarities(runs: Iterable[Run]) -> dict[str, float]:
    """run_id -> mean pairwise cosine, for runs whose spread has one."""
    return {
        r.run_id: r.spread.embedding_mean_cosine
        for r in runs
        if r.spread is not None and r.spread.embedding_mean_cosine is not None
    }


def lexical_values(runs: Iterable[Run], field: Literal["distinct_fraction", "mean_jaccard"]) -> dict[str, float]:
    return {r.run_id: getattr(r.spread, field) for r in runs if r.spread is not None and getattr(r.spread, field) is not None}


def group_values(
    results: Results, values: Mapping[str, float], by: Literal["question", "target"]
) -> dict[str, list[float]]:
    """Values of each question (over targets) or each target (over questions), keyed in the file's order.

    Every question / target of the file gets a key, with an empty list when none of its runs has a value.
    """
    ids = [q.id for q in results.ao_questions] if by == "question" else [t.id for t in results.targets]
    groups: dict[str, list[float]] = {i: [] for i in ids}
    for run in results.runs:
        if run.run_id in values:
            groups[run.ao_question_id if by == "question" else run.target_id].append(values[run.run_id])
    return groups


def group_means(groups: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Mean of each non-empty group."""
    return {k: float(np.mean(v)) for k, v in groups.items() if len(v)}


# ---------------------------------------------------------------------------------------------------------------------
# Statistics


def rng_for(seed: int, name: str) -> np.random.Generator:
    """A generator per (seed, name): each CI is reproducible on its own, whatever else is computed or added."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def bootstrap_mean_ci(
    values: Sequence[float], *, rng: np.random.Generator, n_boot: int = 2000, level: float = 0.95
) -> tuple[float, float] | None:
    """Percentile-bootstrap CI of the mean; None for no values (one value gives a zero-width interval)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return None
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def describe(values: Sequence[float], *, rng: np.random.Generator | None = None, n_boot: int = 2000) -> dict[str, Any]:
    """n, mean, median, std (ddof=1; None below 2 values), min, max and, given an rng, ci95. Never NaN: None."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        out: dict[str, Any] = dict(n=0, mean=None, median=None, std=None, min=None, max=None)
        if rng is not None:
            out["ci95"] = None
        return out
    out = dict(
        n=int(x.size),
        mean=float(x.mean()),
        median=float(np.median(x)),
        std=float(x.std(ddof=1)) if x.size > 1 else None,
        min=float(x.min()),
        max=float(x.max()),
    )
    if rng is not None:
        ci = bootstrap_mean_ci(x, rng=rng, n_boot=n_boot)
        out["ci95"] = list(ci) if ci else None
    return out


def score_histogram(scores: Iterable[int]) -> dict[str, int]:
    """{"1": count, ..., "10": count}, every score present."""
    counts = Counter(scores)
    return {str(s): counts.get(s, 0) for s in SCORES}


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    """Spearman rank correlation and its p-value; (None, None) below 3 pairs or when either side is constant."""
    from scipy.stats import spearmanr

    return _correlation(spearmanr, x, y)


def pearson(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    """Pearson r and its p-value; (None, None) below 3 pairs or when either side is constant."""
    from scipy.stats import pearsonr

    return _correlation(pearsonr, x, y)


def _correlation(test, x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    x_arr, y_arr = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x_arr.size < 3 or np.ptp(x_arr) == 0 or np.ptp(y_arr) == 0:
        return None, None
    res = test(x_arr, y_arr)
    r, p = float(res.statistic), float(res.pvalue)
    return (r if np.isfinite(r) else None), (p if np.isfinite(p) else None)


def judge_embedding_pairs(runs: Sequence[Run]) -> tuple[list[int], list[float]]:
    """(judge scores, embedding similarities) of the runs that have both, in run order."""
    scores, sims = judge_scores(runs), embedding_similarities(runs)
    both = [rid for rid in scores if rid in sims]
    return [scores[r] for r in both], [sims[r] for r in both]


def judge_repeat_agreement(runs: Iterable[Run]) -> dict[str, Any]:
    """Agreement of repeated judge calls with the run's first call.

    One pair per repeat whose verdict parsed, on a run whose first verdict parsed (failures pair with nothing).
    Returns {n_pairs, exact_agreement_rate, mean_abs_delta}; the rates are None without pairs.
    """
    deltas = [
        abs(rep.parsed.similarity_1_to_10 - run.judge.parsed.similarity_1_to_10)
        for run in runs
        if run.judge is not None and run.judge.parsed is not None
        for rep in run.judge_repeats
        if rep.parsed is not None
    ]
    if not deltas:
        return {"n_pairs": 0, "exact_agreement_rate": None, "mean_abs_delta": None}
    return {
        "n_pairs": len(deltas),
        "exact_agreement_rate": sum(d == 0 for d in deltas) / len(deltas),
        "mean_abs_delta": float(np.mean(deltas)),
    }
