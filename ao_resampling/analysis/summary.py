"""summary.json's numbers from one results file: a list of sections, each ``(results, options) -> {key: value}``.

A later analysis adds one section function without touching the others. Every number is JSON-safe: a statistic that
does not exist is ``None``, never NaN. A run whose judge call failed, or that is not judged yet, is never a score;
the counts say how many. report.py turns the summary into report.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ao_resampling.analysis.clusters import clusters_section
from ao_resampling.analysis.comparison import baseline_summary
from ao_resampling.analysis.stats import (
    describe,
    embedding_similarities,
    group_values,
    judge_counts,
    judge_embedding_pairs,
    judge_repeat_agreement,
    judge_scores,
    lexical_values,
    rng_for,
    score_histogram,
    spearman,
)
from ao_resampling.results import Results, TargetRecord

GROUP_KEYS = ("n", "mean", "median", "min", "max", "ci95")


@dataclass(frozen=True)
class SummaryOptions:
    seed: int = 0
    n_boot: int = 2000


SummarySection = Callable[[Results, SummaryOptions], dict[str, Any]]


def target_text(target: TargetRecord, width: int = 100) -> str:
    user = next((m.content for m in target.messages if m.role == "user"), target.messages[0].content if target.messages else "")
    text = " ".join(user.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _group_stats(results: Results, values: dict[str, float], opts: SummaryOptions, name: str) -> dict[str, dict]:
    """per_question and per_target blocks for one per-run value (judge score, embedding similarity)."""
    texts = {"question": {q.id: q.text for q in results.ao_questions},
             "target": {t.id: target_text(t) for t in results.targets}}
    out: dict[str, dict] = {}
    for by in ("question", "target"):
        block = {}
        for key, vals in group_values(results, values, by).items():
            stats = describe(vals, rng=rng_for(opts.seed, f"{name}/{by}/{key}"), n_boot=opts.n_boot)
            block[key] = {"text": texts[by][key], **{k: stats[k] for k in GROUP_KEYS}}
        out[f"per_{by}"] = block
    return out


def _overall_stats(values: Sequence[float], opts: SummaryOptions, name: str) -> dict[str, Any]:
    stats = describe(values, rng=rng_for(opts.seed, f"{name}/overall"), n_boot=opts.n_boot)
    stats["mean_ci95"] = stats.pop("ci95")
    return stats


def counts_section(results: Results, opts: SummaryOptions) -> dict[str, Any]:
    counts = judge_counts(results.runs)
    return {
        "n_runs": counts.n_runs,
        "n_judged": counts.n_judged,
        "n_unjudged": counts.n_unjudged,
        "n_judge_failures": counts.n_failed,
        "judge_failures": counts.failures,
        "n_without_answers": sum(1 for r in results.runs if not r.responses),
    }


def judge_section(results: Results, opts: SummaryOptions) -> dict[str, Any]:
    scores = judge_scores(results.runs)
    judge = _overall_stats(list(scores.values()), opts, "judge")
    judge["histogram"] = score_histogram(scores.values())
    return {"judge": judge, **_group_stats(results, scores, opts, "judge")}


def embedding_section(results: Results, opts: SummaryOptions) -> dict[str, Any]:
    sims = embedding_similarities(results.runs)
    if not sims:
        return {}
    models = sorted({r.spread.embedding_model or "?" for r in results.runs if r.run_id in sims})
    block = {"model": models[0] if len(models) == 1 else models, **_overall_stats(list(sims.values()), opts, "embedding")}
    return {"embedding": {**block, **_group_stats(results, sims, opts, "embedding")}}


def lexical_section(results: Results, opts: SummaryOptions) -> dict[str, Any]:
    distinct, jacc = lexical_values(results.runs, "distinct_fraction"), lexical_values(results.runs, "mean_jaccard")
    if not distinct and not jacc:
        return {}
    return {"lexical": {"distinct_fraction": describe(list(distinct.values())),
                        "mean_jaccard": describe(list(jacc.values()))}}


def agreement_section(results: Results, opts: SummaryOptions) -> dict[str, Any]:
    scores, sims = judge_embedding_pairs(results.runs)
    rho, p = spearman(scores, sims)
    return {"agreement": {"spearman": rho, "spearman_p": p, "n": len(scores)}}


def judge_repeats_section(results: Results, opts: SummaryOptions) -> dict[str, Any]:
    if not any(r.judge_repeats for r in results.runs):
        return {}
    return {"judge_repeats": judge_repeat_agreement(results.runs)}


def baseline_section(results: Results, opts: SummaryOptions) -> dict[str, Any]:
    summary = baseline_summary(results)
    return {} if summary is None else {"baseline": summary}


SUMMARY_SECTIONS: list[SummarySection] = [
    counts_section, judge_section, embedding_section, lexical_section, agreement_section, judge_repeats_section,
    baseline_section, clusters_section,
]


def summarize(
    results: Results, *, seed: int = 0, n_boot: int = 2000, sections: Sequence[SummarySection] | None = None
) -> dict[str, Any]:
    """The summary.json dict: every section's keys, in section order."""
    opts = SummaryOptions(seed=seed, n_boot=n_boot)
    summary: dict[str, Any] = {}
    for section in SUMMARY_SECTIONS if sections is None else sections:
        summary.update(section(results, opts))
    return summary
