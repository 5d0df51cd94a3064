"""The cached-scale RMSNorm is Gemma3RMSNorm bit for bit (on random tensors; on a model: tests/integration/
test_norms_model.py); the one-kernel norm a CUDA device uses is Gemma3RMSNorm up to the mean's summation order."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from ao_resampling.engine.decoding import norms
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


# -- the one-kernel norm (a CUDA device's), run in Triton's interpreter on the CPU ---------------------------------
# The interpreter is chosen when Triton is imported (TRITON_INTERPRET=1), and importing transformers may import
# Triton first: the kernel runs in a fresh process that sets it before any import.

_INTERPRETED = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from ao_resampling.engine.decoding.norms import fused_gemma_rms_norm

BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}

def ulps(a, b):
    return (a.view(BITS[a.dtype]).long() - b.view(BITS[b.dtype]).long()).abs()

def compare(x, norm):
    got = fused_gemma_rms_norm(x, (1.0 + norm.weight.detach().float()).contiguous(), norm.eps)
    u = ulps(got, norm(x))
    return {"shape_ok": got.shape == x.shape and got.dtype == x.dtype, "max_ulp": u.max().item(),
            "differing": (u > 0).float().mean().item(), "finite": bool(torch.isfinite(got.float()).all()),
            "zero_row": bool((got.reshape(-1, x.shape[-1])[0] == 0).all())}

out = {}
for dim in (8, 100, 128, 5376):
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        g = torch.Generator().manual_seed(dim)
        norm = Gemma3RMSNorm(dim, eps=1e-6)
        norm.weight.data = torch.randn(dim, generator=g)
        out[f"{dim}-{name}"] = compare((torch.randn(4, 16, dim, generator=g) * 7).to(dtype), norm)
# a prefill's query norm gets a transposed (B, H, S, D) view; a row of zeros is eps-dominated (no NaN)
g = torch.Generator().manual_seed(0)
norm = Gemma3RMSNorm(128)
norm.weight.data = torch.randn(128, generator=g)
q = torch.randn(2, 5, 3, 128, generator=g).to(torch.bfloat16).transpose(1, 2)
q[0, 0, 0] = 0.0
out["transposed"] = dict(compare(q, norm), contiguous=q.is_contiguous())
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def interpreted():
    """The fused norm's kernel in Triton's interpreter against HF's Gemma3RMSNorm, per case."""
    assert importlib.util.find_spec("triton"), "Triton is a dev dependency: pip install -e '.[dev]'"
    done = subprocess.run([sys.executable, "-c", _INTERPRETED], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("dim", [8, 100, 128, 5376])
def test_fused_norm_is_hf_norm_up_to_the_order_of_the_mean(interpreted, dim, dtype):
    """Against HF's Gemma3RMSNorm (an independent computation): the same shape and dtype; every element within one
    unit in the last place (float32: a few), and in half precision all but a few in 10^4 identical (the float32
    mean's summation order is the only difference; a cast that truncates instead of rounding would differ in about
    half of them, a wrong eps, scale, stride or mask nearly everywhere)."""
    case = interpreted[f"{dim}-{dtype}"]
    assert case["shape_ok"] and case["finite"]
    assert case["max_ulp"] <= (4 if dtype == "fp32" else 1)
    if dtype != "fp32":
        assert case["differing"] < 1e-3


def test_fused_norm_reads_a_transposed_input_and_an_all_zero_row(interpreted):
    case = interpreted["transposed"]
    assert not case["contiguous"]
    assert case["shape_ok"] and case["finite"] and case["zero_row"]
    assert case["max_ulp"] <= 1 and case["differing"] < 1e-3


def test_norms_use_the_torch_arithmetic_off_cuda_and_when_asked():
    """On a CPU the cached forward is the bit-for-bit torch one whatever ``fused`` says: the kernel is for CUDA."""
    norm = Gemma3RMSNorm(16)
    x = torch.randn(3, 16).to(torch.bfloat16)
    for fused in (True, False):
        with cached_norm_scales(norm, fused=fused):
            assert torch.equal(norm(x), Gemma3RMSNorm.forward(norm, x))
    assert not norms.fused_available(torch.device("cpu"))
