"""The pure pieces of the sampler's draw: the top-p keep rule and the token sampler (nucleus.py), with each row's
random numbers from its own stream (streams.py).

The sampler's top-p avoids sorting the whole vocabulary; these tests check it is still *exactly* HF's nucleus
sampling: the same keep-set as ``TopPLogitsWarper``, the same distribution over many draws (a chi-square test on
both the candidate path and the full-sort fallback), and never a token outside the nucleus.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ao_resampling.engine.decoding import nucleus
from ao_resampling.engine.decoding.nucleus import (nucleus_threshold, sample_next_tokens, sampling_weights,
                                                   top_p_keep_mask)


def streams(rows: int, seed: int = 0, step: int = 0) -> dict[str, torch.Tensor]:
    """``rows`` distinct sample streams at one step (keys from the seed)."""
    keys_B = torch.randint(0, 2**62, (rows,), generator=torch.Generator().manual_seed(seed))
    return {"keys_B": keys_B, "steps_B": torch.full((rows,), step)}


# ---------------------------------------------------------------------------------------------------------------------
# top_p_keep_mask == HF's TopPLogitsWarper keep-set


def keep_set_ours(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    probs_BV = logits_BV.float().softmax(-1)
    sorted_probs_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    keep_sorted_BV = top_p_keep_mask(sorted_probs_BV, top_p)
    return torch.zeros_like(keep_sorted_BV).scatter(-1, order_BV, keep_sorted_BV)


def keep_set_hf(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    warped_BV = TopPLogitsWarper(top_p=top_p)(torch.zeros(logits_BV.shape[0], 1, dtype=torch.long),
                                              logits_BV.float().clone())
    return warped_BV > float("-inf")


def margin_to_boundary(logits_BV: torch.Tensor, top_p: float) -> float:
    """How far the nearest token's 'mass above it' is from top_p: near 0, float rounding may decide either way."""
    probs_BV = logits_BV.double().softmax(-1).sort(dim=-1, descending=True).values
    return (probs_BV.cumsum(-1) - probs_BV - top_p).abs().min().item()


# Distinct logits on a 0.1 grid: no ties, so the keep-set is well defined (ties would make it order-dependent).
logit_rows = st.lists(st.integers(-150, 150), min_size=2, max_size=60, unique=True).map(
    lambda xs: [x / 10 for x in xs])
top_ps = st.one_of(st.floats(0.05, 0.999), st.sampled_from([0.9, 0.5, 0.95, 0.99]))


@settings(max_examples=50, deadline=None)
@given(rows=st.lists(logit_rows, min_size=1, max_size=4), top_p=top_ps)
def test_top_p_keep_mask_matches_hf_warper(rows, top_p):
    V = min(len(r) for r in rows)
    logits_BV = torch.tensor([r[:V] for r in rows])
    assume(margin_to_boundary(logits_BV, top_p) > 1e-5)
    assert torch.equal(keep_set_ours(logits_BV, top_p), keep_set_hf(logits_BV, top_p))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 20), top_p=top_ps)
def test_top_p_keep_mask_matches_hf_warper_on_a_large_vocab(seed, scale, top_p):
    logits_BV = torch.randn(3, 5000, generator=torch.Generator().manual_seed(seed)) * scale
    assume(margin_to_boundary(logits_BV, top_p) > 1e-5)
    assert torch.equal(keep_set_ours(logits_BV, top_p), keep_set_hf(logits_BV, top_p))


def test_top_p_keep_mask_always_keeps_the_top_token():
    sorted_probs_BK = torch.tensor([[0.97, 0.02, 0.01], [0.4, 0.35, 0.25]])
    keep_BK = top_p_keep_mask(sorted_probs_BK, 0.01)
    assert keep_BK.tolist() == [[True, False, False], [True, False, False]]


# ---------------------------------------------------------------------------------------------------------------------
# sample_next_tokens


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 5), V=st.integers(2, 500))
def test_temperature_zero_is_argmax(seed, B, V):
    logits_BV = torch.randn(B, V, generator=torch.Generator().manual_seed(seed))
    tokens_B = sample_next_tokens(logits_BV, temperature=0, top_p=0.9, **streams(B))
    assert torch.equal(tokens_B, logits_BV.argmax(-1))


def exact_nucleus_distribution(logits_V: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The nucleus distribution computed independently, in float64."""
    probs_V = (logits_V.double() / temperature).softmax(-1)
    sorted_V, order_V = probs_V.sort(descending=True)
    keep_V = (sorted_V.cumsum(-1) - sorted_V) < top_p
    keep_V[0] = True
    kept_V = torch.zeros_like(probs_V).scatter(-1, order_V, sorted_V * keep_V)
    return kept_V / kept_V.sum()


# Two rows over a vocabulary of 20: with 4 candidates, the peaked row's nucleus lies inside them (candidate path),
# the flat row's does not (full-sort fallback). Both are drawn in the same calls, as in a real batch.
PEAKED_V = torch.tensor([4.0, 3.6, 3.1, 2.0, 1.0] + [-1.0 - 0.1 * i for i in range(15)])
FLAT_V = torch.tensor([0.5 - 0.07 * i for i in range(20)])
CANDIDATES, TOP_P, TEMPERATURE = 4, 0.8, 0.7


def test_the_two_rows_exercise_both_paths():
    for logits_V, short in ((PEAKED_V, False), (FLAT_V, True)):
        probs_V = (logits_V / TEMPERATURE).softmax(-1)
        assert (probs_V.topk(CANDIDATES).values.sum() < TOP_P).item() is short


def test_empirical_distribution_matches_the_exact_nucleus_on_both_paths():
    """20,000 samples (each its own stream) drawing one token from the same logits: their frequencies are the
    nucleus distribution's (chi-square, fixed keys; the p-value is not tuned, a wrong distribution gives ~0)."""
    draws = 20_000
    logits_BV = torch.stack([PEAKED_V, FLAT_V]).repeat(draws, 1)  # rows alternate peaked / flat

    tokens_B = sample_next_tokens(logits_BV, temperature=TEMPERATURE, top_p=TOP_P, candidates=CANDIDATES,
                                  **streams(2 * draws, seed=1234))

    for row, logits_V in enumerate((PEAKED_V, FLAT_V)):
        exact_V = exact_nucleus_distribution(logits_V, TEMPERATURE, TOP_P)
        counts_V = torch.bincount(tokens_B[row::2], minlength=20).double()
        assert counts_V[exact_V == 0].sum() == 0, "a token outside the nucleus was drawn"
        kept = exact_V > 0
        result = stats.chisquare(counts_V[kept].numpy(), (exact_V[kept] * draws).numpy())
        assert result.pvalue > 1e-3, (row, result)
    # Sanity: the two rows have nuclei of clearly different sizes, so a mix-up would show.
    assert (exact_nucleus_distribution(PEAKED_V, TEMPERATURE, TOP_P) > 0).sum() < CANDIDATES
    assert (exact_nucleus_distribution(FLAT_V, TEMPERATURE, TOP_P) > 0).sum() > CANDIDATES


def test_the_chi_square_check_catches_a_skewed_draw(monkeypatch):
    """The check above is not one that passes anyway: the same draws with the noise of one token halved fail it."""
    from ao_resampling.engine.decoding import streams as stream_module

    real = stream_module.exponentials

    def skewed(keys_B, steps_B, ids_BC):
        noise_BC = real(keys_B, steps_B, ids_BC)
        return torch.where(ids_BC == 1, noise_BC * 0.8, noise_BC)

    monkeypatch.setattr(nucleus, "exponentials", skewed)
    draws = 20_000
    tokens_B = sample_next_tokens(PEAKED_V.repeat(draws, 1), temperature=TEMPERATURE, top_p=TOP_P,
                                  candidates=CANDIDATES, **streams(draws, seed=1234))
    exact_V = exact_nucleus_distribution(PEAKED_V, TEMPERATURE, TOP_P)
    kept = exact_V > 0
    counts_V = torch.bincount(tokens_B, minlength=20).double()
    assert stats.chisquare(counts_V[kept].numpy(), (exact_V[kept] * draws).numpy()).pvalue < 1e-6


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(2, 300), candidates=st.integers(1, 64), top_p=top_ps,
       scale=st.floats(0.1, 10), temperature=st.sampled_from([0.3, 0.7, 1.0, 1.5]))
def test_never_draws_outside_the_hf_nucleus(seed, V, candidates, top_p, scale, temperature):
    g = torch.Generator().manual_seed(seed)
    logits_BV = torch.randn(8, V, generator=g) * scale
    assume(margin_to_boundary(logits_BV / temperature, top_p) > 1e-5)
    allowed_BV = keep_set_hf(logits_BV / temperature, top_p)
    for step in range(5):
        tokens_B = sample_next_tokens(logits_BV, temperature=temperature, top_p=top_p, candidates=candidates,
                                      **streams(8, seed=seed, step=step))
        assert allowed_BV.gather(-1, tokens_B[:, None]).all()


@pytest.mark.parametrize("candidates", [pytest.param(4, id="mixed_paths"), pytest.param(256, id="candidate_path"),
                                        pytest.param(1, id="fallback_path")])
def test_same_streams_same_tokens_whatever_the_neighbours(candidates):
    """A row's token depends on its logits and its stream only: the same keys give the same tokens, other keys
    other tokens, and a row drawn among other rows (or with the rows reordered) draws what it draws alone."""
    logits_BV = torch.stack([PEAKED_V, FLAT_V]).repeat(500, 1)

    def draw(seed: int, logits=logits_BV) -> torch.Tensor:
        return sample_next_tokens(logits, temperature=TEMPERATURE, top_p=TOP_P, candidates=candidates,
                                  **streams(len(logits), seed))

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))
    keys = streams(1000, 7)
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(3))
    shuffled = sample_next_tokens(logits_BV[order], temperature=TEMPERATURE, top_p=TOP_P, candidates=candidates,
                                  keys_B=keys["keys_B"][order], steps_B=keys["steps_B"][order])
    assert torch.equal(shuffled, draw(7)[order])
    alone = sample_next_tokens(logits_BV[5:6], temperature=TEMPERATURE, top_p=TOP_P, candidates=candidates,
                               keys_B=keys["keys_B"][5:6], steps_B=keys["steps_B"][5:6])
    assert alone.item() == draw(7)[5].item()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(2, 5000), top_p=st.floats(0.05, 0.99),
       scale=st.sampled_from([0.01, 0.5, 3.0]), temperature=st.sampled_from([0.7, 1.0]))
def test_full_nucleus_threshold_equals_hf_keep_set(seed, V, top_p, scale, temperature):
    """The fallback path keeps exactly the tokens HF's warper keeps (no ties in random float32 logits)."""
    logits_BV = torch.randn(3, V, generator=torch.Generator().manual_seed(seed)) * scale
    scaled_BV = logits_BV / temperature
    assume(margin_to_boundary(scaled_BV, top_p) > 1e-5)
    threshold_B1 = nucleus_threshold(logits_BV, scaled_BV.logsumexp(-1, keepdim=True), temperature=temperature,
                                     top_p=top_p, rows_per_sort=2)  # 2 rows a sort: the chunking is exercised too
    hf_keep_BV = TopPLogitsWarper(top_p)(None, scaled_BV.clone()) > float("-inf")
    assert torch.equal(logits_BV >= threshold_B1, hf_keep_BV)


@pytest.mark.parametrize("top_p", [0.3, 0.9])
def test_full_nucleus_threshold_on_bf16_logits_keeps_the_float32_nucleus(top_p):
    """A bf16 model's logits are sorted as bf16; the kept set is the one of their float32 scaled values."""
    logits_BV = (torch.randn(4, 3000, generator=torch.Generator().manual_seed(5)) * 2).bfloat16()
    scaled_BV = logits_BV.float() / 0.7
    threshold_B1 = nucleus_threshold(logits_BV, scaled_BV.logsumexp(-1, keepdim=True), temperature=0.7, top_p=top_p)
    assert threshold_B1.dtype == torch.bfloat16
    kept_BV = logits_BV >= threshold_B1
    exact_BV = torch.stack([exact_nucleus_distribution(row, 0.7, top_p) > 0 for row in logits_BV.float()])
    # bf16 logits tie often; HF keeps some of a tied group at the boundary, this keeps all of it. Away from the
    # boundary value the two sets agree, and each kept set reaches top_p.
    boundary_BV = logits_BV == threshold_B1
    assert torch.equal(kept_BV & ~boundary_BV, exact_BV & ~boundary_BV)
    assert ((scaled_BV.softmax(-1) * kept_BV).sum(-1) >= top_p - 1e-6).all()


@pytest.mark.parametrize("tied", [1, 12, 400], ids=["no_tie", "tie_inside_the_candidates", "tie_past_them"])
def test_top_k_keeps_every_token_tied_at_the_kth_as_hf_does(tied, monkeypatch):
    """Tokens tied with the k-th logit (bf16 logits tie often) are all kept, as TopKLogitsWarper keeps them, with HF's
    probabilities; a tie group longer than the candidates takes the full-row path, a shorter one does not."""
    top_k, V = 64, 5000
    logits_1V = torch.linspace(30.0, -30.0, V)[None]  # distinct, descending
    logits_1V[0, top_k - 1:top_k - 1 + tied] = logits_1V[0, top_k - 1]  # a tie group starting at the k-th
    logits_1V = logits_1V[:, torch.randperm(V, generator=torch.Generator().manual_seed(0))]
    full_rows = []
    real_full_row_weights = nucleus._full_row_weights
    monkeypatch.setattr(nucleus, "_full_row_weights", lambda logits, *a: full_rows.append(len(logits))
                        or real_full_row_weights(logits, *a))

    got_1V = sampling_weights(logits_1V, temperature=0.7, top_p=1.0, top_k=top_k)
    warped_1V = TopKLogitsWarper(top_k)(None, TemperatureLogitsWarper(0.7)(None, logits_1V.clone()))
    torch.testing.assert_close(got_1V, warped_1V.softmax(-1))
    assert int((got_1V > 0).sum()) == top_k - 1 + tied
    assert bool(full_rows) == (top_k - 1 + tied >= nucleus.TOP_P_CANDIDATES)


@pytest.mark.parametrize("gap", [-1e-4, -1e-6, 0.0, 1e-6, 1e-4], ids=lambda g: f"candidates_mass_top_p{g:+g}")
def test_a_nucleus_at_the_candidate_fallback_boundary_is_hfs(gap):
    """The top ``candidates`` tokens hold top_p + gap of the mass: just inside, on, or just outside the candidates
    (the sampler's two paths meet there). The kept set must be HF's TopPLogitsWarper's either way."""
    from ao_resampling.engine.decoding.nucleus import sampling_weights

    top_p, candidates, V = 0.9, 8, 64
    probs_V = torch.empty(V, dtype=torch.float64)
    probs_V[:candidates] = torch.linspace(0.2, 0.05, candidates)
    probs_V[:candidates] *= (top_p + gap) / probs_V[:candidates].sum()
    probs_V[candidates:] = (1 - probs_V[:candidates].sum()) * torch.linspace(0.1, 0.001, V - candidates).softmax(0)
    logits_1V = probs_V.log().float()[None]
    ours_1V = sampling_weights(logits_1V, temperature=1.0, top_p=top_p, candidates=candidates)
    hf_1V = TopPLogitsWarper(top_p)(None, logits_1V.clone()).softmax(-1)
    if abs(gap) > 1e-5:  # away from float rounding: the exact rule decides, candidates only or one more token
        assert torch.equal(ours_1V > 0, hf_1V > 0)
        assert int((ours_1V > 0).sum()) == (candidates if gap > 0 else candidates + 1)
    else:  # within rounding of top_p: either answer is HF's up to its own float noise, never a third one
        assert int((ours_1V > 0).sum()) in (candidates, candidates + 1)
        assert torch.equal((ours_1V > 0)[0, :candidates], torch.ones(candidates, dtype=torch.bool))
    torch.testing.assert_close(ours_1V.sum(), torch.tensor(1.0))
    drawn = sample_next_tokens(logits_1V.expand(2000, V), temperature=1.0, top_p=top_p, candidates=candidates,
                               **streams(2000))
    assert (ours_1V[0, drawn] > 0).all(), "a token outside the kept set was drawn"


def test_float32_logits_the_temperature_makes_equal_are_tied_as_in_hf():
    """Candidates come from the raw logits and only they are scaled: a k-th and a (k+1)-th logit that differ in
    float32 but are equal once divided by the temperature must be kept together, as HF's TopKLogitsWarper (which
    sees the scaled row) keeps them."""
    kth = torch.tensor(1.400054931640625)
    below = torch.nextafter(kth, torch.tensor(0.0))
    assert below < kth and below / 0.7 == kth / 0.7  # the division ties them
    top_k, V = 8, 1000
    logits_1V = torch.linspace(-3.0, 1.0, V)[None]  # all below the tie
    logits_1V[0, :top_k - 1] = torch.linspace(5.0, 2.0, top_k - 1)
    logits_1V[0, top_k - 1], logits_1V[0, top_k] = kth, below
    logits_1V = logits_1V[:, torch.randperm(V, generator=torch.Generator().manual_seed(1))]

    got_1V = sampling_weights(logits_1V, temperature=0.7, top_p=1.0, top_k=top_k)
    warped_1V = TopKLogitsWarper(top_k)(None, TemperatureLogitsWarper(0.7)(None, logits_1V.clone()))
    torch.testing.assert_close(got_1V, warped_1V.softmax(-1))
    assert int((got_1V > 0).sum()) == top_k + 1
