"""The AO against the target model, per target: the pure statistics of the target-model baseline.

Per target, the AO's mean similarity over its questions against the target model's own similarity, in the judge
view and the embedding view, with Pearson and Spearman (None, never NaN, where undefined), the largest gaps either
way, and which targets only one side has. Reads only ``Results`` (the baseline section included); summary.py and
plots.py show it, stages/baseline.py makes the data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ao_resampling.analysis.stats import (
    embedding_similarities, group_means, group_values, judge_scores, pearson, spearman,
)
from ao_resampling.results import Baseline, Results

N_GAPS = 5  # targets listed on each side of the largest-gap tables


@dataclass(frozen=True)
class TargetPair:
    target_id: str
    ao: float  # the AO's mean over the target's questions
    baseline: float  # the target model's own similarity

    @property
    def gap(self) -> float:
        """> 0: the oracle agrees with itself more than the target model does."""
        return self.ao - self.baseline


@dataclass(frozen=True)
class Comparison:
    """Per target, the AO's value against the target model's own, over the targets that have both."""

    pairs: tuple[TargetPair, ...]
    pearson_r: float | None
    pearson_p: float | None
    spearman_r: float | None
    spearman_p: float | None
    model: str | None = None  # the embedding model, in the embedding view
    skipped: str | None = None  # why there is nothing to compare

    @property
    def n(self) -> int:
        return len(self.pairs)

    def mean(self, side: str) -> float | None:
        return float(np.mean([getattr(p, side) for p in self.pairs])) if self.pairs else None

    def largest_gaps(self, k: int = N_GAPS) -> tuple[list[TargetPair], list[TargetPair]]:
        """(AO more consistent than the target model, the target model more consistent), largest first."""
        ao_higher = sorted((p for p in self.pairs if p.gap > 0), key=lambda p: (-p.gap, p.target_id))
        base_higher = sorted((p for p in self.pairs if p.gap < 0), key=lambda p: (p.gap, p.target_id))
        return ao_higher[:k], base_higher[:k]


def compare(ao: Mapping[str, float], baseline: Mapping[str, float], *, model: str | None = None,
            skipped: str | None = None) -> Comparison:
    """Pairs in ``ao``'s order; the correlations are of the AO value (y) on the target model's (x)."""
    pairs = tuple(TargetPair(t, float(ao[t]), float(baseline[t])) for t in ao if t in baseline)
    if not pairs and skipped is None:
        skipped = "no target has both an AO value and a baseline value"
    x, y = [p.baseline for p in pairs], [p.ao for p in pairs]
    return Comparison(pairs, *pearson(x, y), *spearman(x, y), model=model, skipped=skipped)


def ao_judge_means(results: Results) -> dict[str, float]:
    """target_id -> the AO's mean judge score over its judged questions."""
    return group_means(group_values(results, judge_scores(results.runs), "target"))


def baseline_judge_scores(baseline: Baseline) -> dict[str, int]:
    return {r.target_id: r.judge.parsed.similarity_1_to_10 for r in baseline.runs
            if r.judge is not None and r.judge.parsed is not None}


def ao_embedding_means(results: Results) -> dict[str, float]:
    return group_means(group_values(results, embedding_similarities(results.runs), "target"))


def baseline_embedding_similarities(baseline: Baseline) -> dict[str, float]:
    return {r.target_id: r.spread.embedding_mean_cosine for r in baseline.runs
            if r.spread is not None and r.spread.embedding_mean_cosine is not None}


def judge_comparison(results: Results) -> Comparison:
    baseline = results.baseline or Baseline()
    return compare(ao_judge_means(results), baseline_judge_scores(baseline))


def embedding_comparison(results: Results) -> Comparison:
    """Only when both sides were embedded, with the same model; else ``skipped`` says why."""
    baseline = results.baseline or Baseline()
    ao_sims, base_sims = embedding_similarities(results.runs), baseline_embedding_similarities(baseline)
    models = sorted({r.spread.embedding_model or "?" for r in results.runs if r.run_id in ao_sims}
                    | {r.spread.embedding_model or "?" for r in baseline.runs if r.target_id in base_sims})
    skipped = None
    if not ao_sims:
        skipped = "no AO run has an embedding similarity (embedding model 'none', or spreads not computed)"
    elif not base_sims:
        skipped = "no baseline run has an embedding similarity (embedding model 'none', or spreads not computed)"
    elif len(models) > 1:
        skipped = f"the AO runs and the baseline were embedded with different models ({', '.join(models)})"
    if skipped:
        return compare({}, {}, skipped=skipped)
    return compare(ao_embedding_means(results), base_sims, model=models[0])


def coverage(results: Results) -> tuple[list[str], list[str]]:
    """(targets of the AO results without a baseline run, baseline targets without AO runs), in file order."""
    baseline = results.baseline or Baseline()
    ao_ids = [t.id for t in results.targets]
    base_ids = [r.target_id for r in baseline.runs]
    return [t for t in ao_ids if t not in set(base_ids)], [t for t in base_ids if t not in set(ao_ids)]


def _comparison_block(comp: Comparison) -> dict[str, Any]:
    ao_higher, base_higher = comp.largest_gaps()

    def rows(pairs: list[TargetPair]) -> list[dict[str, Any]]:
        return [{"target_id": p.target_id, "ao_mean": p.ao, "baseline": p.baseline, "gap": p.gap} for p in pairs]

    return {"n_targets": comp.n, "mean": comp.mean("baseline"), "ao_mean": comp.mean("ao"),
            "pearson_r": comp.pearson_r, "pearson_p": comp.pearson_p,
            "spearman_r": comp.spearman_r, "spearman_p": comp.spearman_p,
            "largest_gaps": {"ao_higher": rows(ao_higher), "baseline_higher": rows(base_higher)}}


def baseline_summary(results: Results) -> dict[str, Any] | None:
    """summary.json's ``baseline`` block (None without a baseline). ``n_targets`` / ``mean`` / the coefficients are
    the judge view over targets with both scores; ``embedding`` is the same in the embedding view."""
    baseline = results.baseline
    if baseline is None:
        return None
    judge_view, emb_view = judge_comparison(results), embedding_comparison(results)
    only_results, only_baseline = coverage(results)
    failures = Counter(r.judge.failure.reason for r in baseline.runs if r.judge is not None and r.judge.failure)
    first = next((resp for r in baseline.runs for resp in r.responses), None)
    ao_j, base_j = ao_judge_means(results), baseline_judge_scores(baseline)
    ao_e, base_e = ao_embedding_means(results), baseline_embedding_similarities(baseline)
    ids = list(dict.fromkeys([t.id for t in results.targets] + [r.target_id for r in baseline.runs]))
    return {
        **_comparison_block(judge_view),
        "n_runs": len(baseline.runs),
        "n_judged": sum(1 for r in baseline.runs if r.judge is not None and r.judge.parsed is not None),
        "n_judge_failures": sum(failures.values()),
        "judge_failures": dict(sorted(failures.items())),
        "n_unjudged": sum(1 for r in baseline.runs if r.judge is None),
        "n_without_responses": sum(1 for r in baseline.runs if not r.responses),
        "responses_per_target": sorted({len(r.responses) for r in baseline.runs if r.responses}),
        "decoding": first.decoding.model_dump(mode="json") if first else None,
        "only_in_results": only_results,
        "only_in_baseline": only_baseline,
        "embedding": {"model": emb_view.model, **_comparison_block(emb_view), "skipped": emb_view.skipped},
        "per_target": {t: {"ao_mean": ao_j.get(t), "baseline": base_j.get(t),
                           "ao_embedding": ao_e.get(t), "baseline_embedding": base_e.get(t)} for t in ids},
    }
