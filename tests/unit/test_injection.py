"""hooks.inject on random tensors: what changes, by how much, in which direction, and what never changes.

``inject`` is the whole steering arithmetic of the experiment (``h[p] += normalize(v) * ||h[p]|| * coefficient``),
so it is pinned down here without a model; the hook that decides *when* to call it is tested on the tiny model.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ao_resampling.engine.hooks import inject


def random_case(seed: int, B: int, L: int, D: int, K: int, dtype: torch.dtype = torch.float32):
    """A residual, per-row vectors, and K distinct positions per row (each row its own)."""
    g = torch.Generator().manual_seed(seed)
    resid_BLD = (torch.randn(B, L, D, generator=g) * 3).to(dtype)
    vectors_BKD = torch.randn(B, K, D, generator=g)
    positions_BK = torch.stack([torch.randperm(L, generator=g)[:K] for _ in range(B)])
    return resid_BLD, vectors_BKD, positions_BK


shapes = st.tuples(
    st.integers(1, 4),  # B
    st.integers(1, 12),  # L
    st.integers(2, 48),  # D
).flatmap(lambda bld: st.tuples(st.just(bld), st.integers(1, bld[1])))  # K <= L: positions are distinct per row
coefficients = st.one_of(st.floats(-4, 4, allow_nan=False), st.sampled_from([1.0, 0.5, 2.0, -1.0]))
seeds = st.integers(0, 2**31 - 1)


def placeholder_mask(B: int, L: int, positions_BK: torch.Tensor) -> torch.Tensor:
    mask_BL = torch.zeros(B, L, dtype=torch.bool)
    mask_BL[torch.arange(B).unsqueeze(1), positions_BK] = True
    return mask_BL


@settings(max_examples=50, deadline=None)
@given(shapes=shapes, coefficient=coefficients, seed=seeds)
def test_only_placeholder_positions_change(shapes, coefficient, seed):
    (B, L, D), K = shapes
    resid_BLD, vectors_BKD, positions_BK = random_case(seed, B, L, D, K)
    before_BLD = resid_BLD.clone()

    out_BLD = inject(resid_BLD, vectors_BKD, positions_BK, coefficient)

    assert torch.equal(resid_BLD, before_BLD), "inject must return a copy, not write into its input"
    assert out_BLD.shape == resid_BLD.shape and out_BLD.dtype == resid_BLD.dtype
    untouched_BL = ~placeholder_mask(B, L, positions_BK)
    assert torch.equal(out_BLD[untouched_BL], resid_BLD[untouched_BL])


@settings(max_examples=50, deadline=None)
@given(shapes=shapes, coefficient=coefficients.filter(lambda c: abs(c) > 1e-3), seed=seeds)
def test_added_vector_has_norm_of_h_times_coefficient_and_direction_of_v(shapes, coefficient, seed):
    (B, L, D), K = shapes
    resid_BLD, vectors_BKD, positions_BK = random_case(seed, B, L, D, K)

    out_BLD = inject(resid_BLD, vectors_BKD, positions_BK, coefficient)

    rows_BK = torch.arange(B).unsqueeze(1).expand(B, K)
    h_BKD = resid_BLD[rows_BK, positions_BK].double()
    added_BKD = out_BLD[rows_BK, positions_BK].double() - h_BKD
    expected_norm_BK = h_BKD.norm(dim=-1) * abs(coefficient)
    torch.testing.assert_close(added_BKD.norm(dim=-1), expected_norm_BK, rtol=1e-4, atol=1e-4)
    # Same direction as v (opposite for a negative coefficient): cosine +-1.
    cos_BK = torch.nn.functional.cosine_similarity(added_BKD, vectors_BKD.double(), dim=-1)
    sign = 1.0 if coefficient > 0 else -1.0
    torch.testing.assert_close(cos_BK, torch.full_like(cos_BK, sign), rtol=0, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(shapes=shapes, seed=seeds)
def test_vector_scale_does_not_matter_only_its_direction(shapes, seed):
    (B, L, D), K = shapes
    resid_BLD, vectors_BKD, positions_BK = random_case(seed, B, L, D, K)
    torch.testing.assert_close(inject(resid_BLD, vectors_BKD, positions_BK, 1.0),
                               inject(resid_BLD, vectors_BKD * 37.5, positions_BK, 1.0))


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="float32"), pytest.param(torch.bfloat16, id="bf16")])
@settings(max_examples=25, deadline=None)
@given(shapes=shapes, seed=seeds)
def test_coefficient_zero_is_the_identity(dtype, shapes, seed):
    (B, L, D), K = shapes
    resid_BLD, vectors_BKD, positions_BK = random_case(seed, B, L, D, K, dtype)
    assert torch.equal(inject(resid_BLD, vectors_BKD, positions_BK, 0.0), resid_BLD)


def test_each_row_gets_its_own_vectors_at_its_own_positions():
    B, L, D = 3, 6, 4
    resid_BLD = torch.ones(B, L, D)  # ||h|| = 2 everywhere
    vectors_BKD = torch.zeros(B, 2, D)
    for b in range(B):  # row b: basis vectors e_b and e_{b+1}
        vectors_BKD[b, 0, b] = 5.0
        vectors_BKD[b, 1, b + 1] = -0.1
    positions_BK = torch.tensor([[0, 5], [2, 3], [4, 1]])

    out_BLD = inject(resid_BLD, vectors_BKD, positions_BK, 0.5)

    expected_BLD = torch.ones(B, L, D)
    for b in range(B):
        for k in range(2):
            direction = torch.nn.functional.normalize(vectors_BKD[b, k], dim=-1)
            expected_BLD[b, positions_BK[b, k]] += direction * 2.0 * 0.5
    torch.testing.assert_close(out_BLD, expected_BLD, rtol=0, atol=1e-6)


def published_steering(resid_BLD, vectors_BKD, positions_BK, coefficient):
    """nl_probes' ``get_hf_activation_steering_hook`` body, as published: row by row, every step in the dtype its
    operands have (v normalised in its dtype, ||h|| in the residual's, the sum in the residual's)."""
    resid_BLD = resid_BLD.clone()
    normed_list = [torch.nn.functional.normalize(v_KD, dim=-1).detach() for v_KD in vectors_BKD]
    for b in range(resid_BLD.shape[0]):
        pos_K = positions_BK[b]
        orig_KD = resid_BLD[b, pos_K, :]
        norms_K1 = orig_KD.norm(dim=-1, keepdim=True)
        steered_KD = (normed_list[b] * norms_K1 * coefficient).to(resid_BLD.dtype)
        resid_BLD[b, pos_K, :] = steered_KD.detach() + orig_KD
    return resid_BLD


@pytest.mark.parametrize("vector_dtype", [pytest.param(torch.bfloat16, id="bf16_vectors"),
                                          pytest.param(torch.float32, id="float32_vectors")])
@settings(max_examples=40, deadline=None)
@given(shapes=shapes, coefficient=coefficients, seed=seeds)
def test_bf16_injection_is_bit_identical_to_the_published_hook(vector_dtype, shapes, coefficient, seed):
    (B, L, D), K = shapes
    resid_BLD, vectors_BKD, positions_BK = random_case(seed, B, L, D, K, torch.bfloat16)
    vectors_BKD = vectors_BKD.to(vector_dtype)

    out_BLD = inject(resid_BLD, vectors_BKD, positions_BK, coefficient)

    assert out_BLD.dtype == torch.bfloat16
    assert torch.equal(out_BLD, published_steering(resid_BLD, vectors_BKD, positions_BK, coefficient))


def test_bf16_injection_is_not_float32_arithmetic_rounded_once():
    """The two contracts differ on real-sized rows (the issue measured 41% of the elements at 27B's width): the
    test above can tell a float32 implementation from the published one."""
    resid_BLD, vectors_BKD, positions_BK = random_case(0, 2, 6, 5376, 1, torch.bfloat16)
    vectors_BKD = vectors_BKD.to(torch.bfloat16)
    rows_BK = torch.arange(2).unsqueeze(1)
    h_BKD = resid_BLD[rows_BK, positions_BK].float()
    direction_BKD = torch.nn.functional.normalize(vectors_BKD.float(), dim=-1)
    float32_BKD = (h_BKD + direction_BKD * h_BKD.norm(dim=-1, keepdim=True)).to(torch.bfloat16)
    out_BKD = inject(resid_BLD, vectors_BKD, positions_BK, 1.0)[rows_BK, positions_BK]
    assert (out_BKD != float32_BKD).float().mean() > 0.05


def test_vectors_on_another_dtype_than_the_residual_are_fine():
    resid_BLD, vectors_BKD, positions_BK = random_case(0, 2, 5, 8, 1, torch.bfloat16)
    out_BLD = inject(resid_BLD, vectors_BKD.double(), positions_BK, 1.0)
    assert out_BLD.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "vectors_shape, positions_shape, resid_shape",
    [
        pytest.param((3, 1, 8), (2, 1), (2, 5, 8), id="vectors_batch_differs"),
        pytest.param((2, 2, 8), (2, 1), (2, 5, 8), id="vectors_K_differs_from_positions_K"),
        pytest.param((2, 1, 8), (2, 1), (3, 5, 8), id="residual_batch_differs"),
        pytest.param((2, 8), (2, 1), (2, 5, 8), id="vectors_without_K_axis"),
        pytest.param((2, 1, 7), (2, 1), (2, 5, 8), id="vectors_D_differs"),
    ],
)
def test_shape_mismatch_raises(vectors_shape, positions_shape, resid_shape):
    with pytest.raises(ValueError, match="disagree"):
        inject(torch.randn(resid_shape), torch.randn(vectors_shape), torch.zeros(positions_shape, dtype=torch.long),
               1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_an_injection_that_overflows_is_an_error_not_nan_answers(dtype):
    from ao_resampling.errors import NonFiniteError

    resid_BLD, vectors_BKD, positions_BK = random_case(0, 2, 6, 8, 2, dtype)
    with pytest.raises(NonFiniteError, match="coefficient 1e\\+39"):  # |h| * 1e39 is past both dtypes' max
        inject(resid_BLD, vectors_BKD, positions_BK, 1e39)
    vectors_BKD[1, 0, 3] = float("nan")  # a NaN activation: its direction is NaN whatever the coefficient
    with pytest.raises(NonFiniteError):
        inject(resid_BLD, vectors_BKD, positions_BK, 1.0)
    vectors_BKD[1, 0, 3] = 1.0
    out_BLD = inject(resid_BLD, vectors_BKD, positions_BK, 1e6)  # large but representable: injected as asked
    assert torch.isfinite(out_BLD).all()
