"""How many different things the oracle says: per-run numbers from the cluster judge's partition, and their summary.

The cluster judge groups a run's N answers by meaning (stages/common/prompts.py, stages/common/judge_prompt.py).
From the cluster sizes |c|:

- ``n_clusters``: how many meanings;
- ``semantic_entropy_bits``: H = -sum p_c log2 p_c over the shares p_c = |c| / N (the discrete estimator of
  Kuhn et al. 2023 / Farquhar et al. 2024: 0 when every answer means the same, log2 N when all differ);
- ``modal_share``: the largest cluster's share of the answers;
- ``pairwise_agreement``: sum |c|(|c|-1) / (N(N-1)), the chance that two different answers drawn at random mean
  the same (None below 2 answers).

Judge noise: the adjusted Rand index (``adjusted_rand_index``) between the first call's partition and a repeat's,
shown the answers in another order. ``clusters_section`` is summary.json's block: the four numbers with bootstrap CIs
over targets (a target's runs are resampled together, since they share one conversation), per question, their
Spearman against the judge score and the embedding similarity, the repeats' ARI, and the target model's own clusters.
Pure: reads ``Results`` only; a run without a parsed partition has no value (a failed call is never a number).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ao_resampling.analysis.stats import (
    bootstrap_mean_ci, describe, embedding_similarities, group_values, judge_scores, rng_for, spearman,
)
from ao_resampling.results import ClusterRecord, Results

# metric -> what it says, for tables and axes
CLUSTER_METRICS: dict[str, str] = {
    "n_clusters": "number of meanings among the answers",
    "semantic_entropy_bits": "semantic entropy over the meanings, in bits",
    "modal_share": "share of the answers in the largest meaning",
    "pairwise_agreement": "chance two answers mean the same",
}
PAIRWISE_AGREEMENT_SENTENCE = (
    "Pairwise agreement is the chance that two different answers sampled for the same question and target mean the "
    "same thing, as the cluster judge grouped them (1 = every answer means the same, 0 = no two do).")


# ---------------------------------------------------------------------------------------------------------------------
# Per run (pure)


def semantic_entropy_bits(sizes: Sequence[int]) -> float:
    n = sum(sizes)
    return float(-sum((s / n) * math.log2(s / n) for s in sizes if s)) + 0.0  # + 0.0: -0.0 reads as 0


def pairwise_agreement(sizes: Sequence[int]) -> float | None:
    n = sum(sizes)
    return None if n < 2 else sum(s * (s - 1) for s in sizes) / (n * (n - 1))


def cluster_metrics(sizes: Sequence[int]) -> dict[str, float | None]:
    """The four numbers of one partition, from its cluster sizes (each >= 1)."""
    if not sizes or min(sizes) < 1:
        raise ValueError(f"cluster sizes must be a non-empty list of positive counts, got {list(sizes)}")
    return {"n_clusters": len(sizes), "semantic_entropy_bits": semantic_entropy_bits(sizes),
            "modal_share": max(sizes) / sum(sizes), "pairwise_agreement": pairwise_agreement(sizes)}


def _pairs(k: int) -> int:
    return k * (k - 1) // 2


def adjusted_rand_index(labels_a: Sequence[Any], labels_b: Sequence[Any]) -> float | None:
    """Hubert and Arabie's ARI of two labelings of the same items: 1 for the same partition, about 0 for agreement
    by chance. None below 2 items; two trivial partitions that match (all together, or all apart) give 1."""
    if len(labels_a) != len(labels_b):
        raise ValueError(f"the labelings differ in length: {len(labels_a)} and {len(labels_b)}")
    n = len(labels_a)
    if n < 2:
        return None
    index = sum(_pairs(c) for c in Counter(zip(labels_a, labels_b)).values())
    sum_a = sum(_pairs(c) for c in Counter(labels_a).values())
    sum_b = sum(_pairs(c) for c in Counter(labels_b).values())
    expected = sum_a * sum_b / _pairs(n)
    most = (sum_a + sum_b) / 2
    if most == expected:  # both partitions trivial (one cluster, or all singletons): they match
        return 1.0
    return (index - expected) / (most - expected)


# ---------------------------------------------------------------------------------------------------------------------
# Over runs (pure)


def partition_of(record: ClusterRecord | None) -> list[int] | None:
    """The cluster sizes of a record with a parsed partition; None for no record or a failed call."""
    return record.parsed.sizes if record is not None and record.parsed is not None else None


def cluster_values(runs: Iterable[Any], metric: str) -> dict[str, float]:
    """run_id -> the metric, for runs (AO or baseline) with a parsed partition and a defined value."""
    out = {}
    for run in runs:
        sizes = partition_of(run.clusters)
        value = cluster_metrics(sizes)[metric] if sizes else None
        if value is not None:
            out[run.run_id] = float(value)
    return out


def cluster_counts(runs: Sequence[Any]) -> dict[str, Any]:
    """How many runs with answers have a partition, how many calls failed (by reason), how many are not asked yet."""
    with_answers = [r for r in runs if r.responses]
    failures = Counter(r.clusters.failure.reason for r in with_answers
                       if r.clusters is not None and r.clusters.failure is not None)
    return {"n_clustered": sum(partition_of(r.clusters) is not None for r in with_answers),
            "n_failures": sum(failures.values()), "failures": dict(sorted(failures.items())),
            "n_unclustered": sum(r.clusters is None for r in with_answers)}


def target_bootstrap_ci(groups: Sequence[Sequence[float]], *, rng: np.random.Generator, n_boot: int = 2000,
                        level: float = 0.95) -> tuple[float, float] | None:
    """Percentile-bootstrap CI of the mean over all values, resampling whole groups (targets) with replacement."""
    groups = [g for g in groups if len(g)]
    if not groups:
        return None
    sums_G = np.array([sum(g) for g in groups], dtype=np.float64)
    counts_G = np.array([len(g) for g in groups], dtype=np.float64)
    pick_BG = rng.integers(0, len(groups), size=(n_boot, len(groups)))
    means_B = sums_G[pick_BG].sum(axis=1) / counts_G[pick_BG].sum(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means_B, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def repeat_agreement(runs: Iterable[Any]) -> list[float]:
    """ARI of each parsed repeat's partition with its run's first parsed partition (failures pair with nothing)."""
    aris = []
    for run in runs:
        if partition_of(run.clusters) is None:
            continue
        for rep in run.cluster_repeats:
            if rep.parsed is not None:
                aris.append(adjusted_rand_index(run.clusters.parsed.labels, rep.parsed.labels))
    return [a for a in aris if a is not None]


# ---------------------------------------------------------------------------------------------------------------------
# summary.json's block


def _metric_block(results: Results, metric: str, seed: int, n_boot: int) -> dict[str, Any]:
    values = cluster_values(results.runs, metric)
    stats = describe(list(values.values()))
    by_target = group_values(results, values, "target")
    ci = target_bootstrap_ci(list(by_target.values()), rng=rng_for(seed, f"clusters/{metric}"), n_boot=n_boot)
    per_question = {q: {"n": len(v), "mean": float(np.mean(v)) if v else None}
                    for q, v in group_values(results, values, "question").items()}
    return {**stats, "mean_ci95": list(ci) if ci else None, "per_question": per_question}


def _spearman_block(agreement: Mapping[str, float], other: Mapping[str, float]) -> dict[str, Any]:
    both = [rid for rid in agreement if rid in other]
    rho, p = spearman([agreement[r] for r in both], [other[r] for r in both])
    return {"spearman": rho, "spearman_p": p, "n": len(both)}


def baseline_block(results: Results, seed: int, n_boot: int) -> dict[str, Any] | None:
    """The target model's own clusters (one run per target), and the AO's per-target pairwise agreement against
    them, paired by target."""
    runs = results.baseline.runs if results.baseline is not None else []
    if not any(r.clusters is not None for r in runs):
        return None
    out: dict[str, Any] = {"counts": cluster_counts(runs)}
    for metric in CLUSTER_METRICS:
        values = list(cluster_values(runs, metric).values())
        out[metric] = describe(values, rng=rng_for(seed, f"clusters/baseline/{metric}"), n_boot=n_boot)
    ao = {t: float(np.mean(v)) for t, v in group_values(
        results, cluster_values(results.runs, "pairwise_agreement"), "target").items() if v}
    base_values = cluster_values(runs, "pairwise_agreement")
    base = {r.target_id: base_values[r.run_id] for r in runs if r.run_id in base_values}
    gaps = [ao[t] - base[t] for t in ao if t in base]
    ci = bootstrap_mean_ci(gaps, rng=rng_for(seed, "clusters/baseline/gap"), n_boot=n_boot)
    out["pairwise_agreement_ao_minus_target"] = {"n_targets": len(gaps), "mean": float(np.mean(gaps)) if gaps
                                                 else None, "ci95": list(ci) if ci else None}
    return out


def clusters_section(results: Results, opts: Any) -> dict[str, Any]:
    """summary.json's ``clusters`` block (nothing when no run was sent to the cluster judge)."""
    baseline_asked = results.baseline is not None and any(r.clusters is not None for r in results.baseline.runs)
    if not baseline_asked and not any(r.clusters is not None for r in results.runs):
        return {}
    agreement = cluster_values(results.runs, "pairwise_agreement")
    block: dict[str, Any] = {
        **cluster_counts(results.runs),
        "metrics": {m: _metric_block(results, m, opts.seed, opts.n_boot) for m in CLUSTER_METRICS},
        "pairwise_agreement_vs_judge": _spearman_block(agreement, judge_scores(results.runs)),
        "pairwise_agreement_vs_embedding": _spearman_block(agreement, embedding_similarities(results.runs)),
    }
    if any(r.cluster_repeats for r in results.runs):
        aris = repeat_agreement(results.runs)
        ci = bootstrap_mean_ci(aris, rng=rng_for(opts.seed, "clusters/repeats"), n_boot=opts.n_boot)
        block["repeats"] = {"n_pairs": len(aris), "mean_ari": float(np.mean(aris)) if aris else None,
                            "ari_ci95": list(ci) if ci else None,
                            "same_partition_rate": float(np.mean([a == 1.0 for a in aris])) if aris else None}
    baseline = baseline_block(results, opts.seed, opts.n_boot)
    if baseline is not None:
        block["baseline"] = baseline
    return {"clusters": block}
