"""The spread stage: the judge-free spread of every AO run that lacks one (common/spreads.py computes it), journaled
in chunks like any other stage's work and folded into results.json."""

from __future__ import annotations

from ao_resampling.events import spread_event
from ao_resampling.stages.common.spreads import DEFAULT_EMBEDDING_MODEL, Encoder, missing_spreads
from ao_resampling.store import ResultsStore

JOURNAL_CHUNK = 500  # spread events per fsync'd append: few syscalls, little lost if killed


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
    spreads = missing_spreads(store.results.runs, embedding_model=embedding_model, encoder=encoder, progress=progress)
    if not spreads:
        return 0
    events = [spread_event(rid, s) for rid, s in spreads.items()]
    for start in range(0, len(events), JOURNAL_CHUNK):
        store.record(events[start : start + JOURNAL_CHUNK])
    store.compact()
    return len(events)
