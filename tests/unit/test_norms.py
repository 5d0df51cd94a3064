"""The cached-scale RMSNorm is Gemma3RMSNorm bit for bit (on random tensors; on a model: tests/integration/
test_norms_model.py). The Triton kernels a CUDA device uses: tests/unit/test_triton_kernels.py."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from ao_resampling.engine.decoding.norms import cached_norm_scales


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dim=st.sampled_from([8, 128, 5376]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), scale=st.floats(0.01, 100))
def test_bit_for_bit_gemma3_rms_norm(seed, dim, dtype, scale):
    g = torch.Generator().manual_seed(seed)
    norm = Gemma3RMSNorm(dim)
    norm.weight.data = torch.randn(dim, generator=g)
    x = (torch.randn(3, 2, dim, generator=g) * scale).to(dtype)
    expected = norm(x)

    with cached_norm_scales(norm):
        got = norm(x)

    assert got.dtype == dtype and torch.equal(got, expected)
