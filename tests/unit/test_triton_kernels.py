"""The decode step's Triton kernels (RMSNorm, RoPE) against HF's own functions, run in Triton's CPU interpreter.

The interpreter is chosen when Triton is imported (TRITON_INTERPRET=1), and importing transformers may import Triton
first, so the kernels run in a fresh process that sets it before any import; it reports per case how many outputs
differ from HF's and by how many units in the last place.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from transformers.models.gemma3 import modeling_gemma3

from ao_resampling.engine.decoding import triton_kernels

_INTERPRETED = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm, apply_rotary_pos_emb
from ao_resampling.engine.decoding import triton_kernels

BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

def ulps(got, expected):
    u = (got.view(BITS[got.dtype]).long() - expected.view(BITS[expected.dtype]).long()).abs()
    return {"same_shape_dtype": got.shape == expected.shape and got.dtype == expected.dtype,
            "max_ulp": u.max().item(), "differing": (u > 0).float().mean().item(),
            "finite": bool(torch.isfinite(got.float()).all())}

out = {}
for dim in (8, 100, 128, 5376):
    for name, dtype in DTYPES.items():
        g = torch.Generator().manual_seed(dim)
        norm = Gemma3RMSNorm(dim, eps=1e-6)
        norm.weight.data = torch.randn(dim, generator=g)
        x = (torch.randn(4, 16, dim, generator=g) * 7).to(dtype)
        out[f"norm-{dim}-{name}"] = ulps(triton_kernels.rms_norm(x, (1.0 + norm.weight.float()).contiguous(), 1e-6),
                                         norm(x))
# a prefill's query norm gets a transposed (B, H, S, D) view; a row of zeros is eps-dominated (no NaN)
g = torch.Generator().manual_seed(0)
norm = Gemma3RMSNorm(128)
norm.weight.data = torch.randn(128, generator=g)
q = torch.randn(2, 5, 3, 128, generator=g).to(torch.bfloat16).transpose(1, 2)
q[0, 0, 0] = 0.0
got = triton_kernels.rms_norm(q, (1.0 + norm.weight.float()).contiguous(), 1e-6)
out["norm-transposed"] = dict(ulps(got, norm(q)), contiguous_input=q.is_contiguous(),
                              zero_row=bool((got[0, 0, 0] == 0).all()))

for name, dtype in DTYPES.items():
    for label, (B, S, q_heads, kv_heads, D) in {"decode": (5, 1, 8, 4, 128), "prefill": (2, 7, 4, 2, 32)}.items():
        g = torch.Generator().manual_seed(S)
        # as Gemma3Attention lays them out: (B, S, heads, D) projections viewed as (B, heads, S, D)
        q = (torch.randn(B, S, q_heads, D, generator=g) * 3).to(dtype).transpose(1, 2)
        k = (torch.randn(B, S, kv_heads, D, generator=g) * 3).to(dtype).transpose(1, 2)
        cos, sin = torch.randn(2, B, S, D, generator=g).to(dtype)
        q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
        for which, x, hf in (("q", q, q_hf), ("k", k, k_hf)):
            out[f"rope-{label}-{which}-{name}"] = ulps(triton_kernels.rotary(x, cos, sin), hf)
# the decode attention against gqa_attention's torch path (boolean mask) and against float64: rows with left padding,
# an idle row (position 0 alone), random holes; masked positions' keys and values hold NaN (never read)
from ao_resampling.engine.decoding.attention import gqa_attention
for name, dtype in DTYPES.items():
    for label, (B, H, K, D, S, cut) in {"g2": (5, 4, 2, 32, 70, 64), "g1": (3, 4, 4, 16, 40, 40),
                                        "g4-27b-head": (2, 8, 2, 128, 100, 96)}.items():
        g = torch.Generator().manual_seed(B * 100 + D)
        q = (torch.randn(B, 1, H, D, generator=g) * 2).to(dtype).transpose(1, 2)  # a decode step's layout
        k = (torch.randn(B, K, S, D, generator=g) * 2).to(dtype)
        v = torch.randn(B, K, S, D, generator=g).to(dtype)
        allowed = torch.rand(B, 1, 1, cut, generator=g) < 0.6
        allowed[0] = False
        allowed[0, ..., 0] = True
        allowed[1, ..., :cut // 3] = False
        allowed[1, ..., cut // 3] = True
        expected, _ = gqa_attention(None, q, k, v, allowed, scaling=D**-0.5)
        exact, _ = gqa_attention(None, q.double(), k.double(), v.double(), allowed, scaling=D**-0.5)
        hidden = ~allowed[:, 0, 0, :, None].expand(B, cut, D)
        k_nan, v_nan = k.clone(), v.clone()
        k_nan[:, :, :cut][hidden[:, None].expand(B, K, cut, D)] = float("nan")
        v_nan[:, :, :cut][hidden[:, None].expand(B, K, cut, D)] = float("nan")
        additive = torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)
        got = triton_kernels.decode_attention(q, k_nan, v_nan, additive, D**-0.5)
        out[f"attention-{label}-{name}"] = dict(ulps(got, expected),
                                                error=(got.double() - exact).abs().max().item(),
                                                eager_error=(expected.double() - exact).abs().max().item())
# the seat's copy against torch's indexed write, on a slot buffer longer than the prompts (S > P), rows in any order,
# one prompt into several rows; values that are NaN or -0.0 copied as bits
for name, dtype in DTYPES.items():
    g = torch.Generator().manual_seed(3)
    slot = torch.randn(3, 6, 2, 11, 16, generator=g).to(dtype)
    prompt = torch.randn(3, 4, 2, 5, 16, generator=g).to(dtype)
    prompt[0, 1, 0, 0, :2] = torch.tensor([float("nan"), -0.0])
    rows, prompts = torch.tensor([5, 0, 3, 2]), torch.tensor([1, 1, 3, 0])
    expected = slot.clone()
    expected[:, rows, :, :5] = prompt[:, prompts]
    triton_kernels.seat_prompts(slot, prompt, rows, prompts)
    bits = BITS[dtype]
    out[f"seat-{name}"] = bool(torch.equal(slot.view(bits), expected.view(bits)))
# the probes a CUDA device runs before using the kernels (here in the interpreter: they must pass a working kernel)
for name, probe in triton_kernels._PROBES.items():
    probe(torch.device("cpu"))
    out[f"probe-{name}"] = "passed"
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def interpreted() -> dict:
    assert importlib.util.find_spec("triton"), "Triton is a dev dependency: pip install -e '.[dev]'"
    done = subprocess.run([sys.executable, "-c", _INTERPRETED], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("dim", [8, 100, 128, 5376])
def test_rms_norm_is_hf_norm_up_to_the_order_of_the_mean(interpreted, dim, dtype):
    """Against HF's Gemma3RMSNorm: every element within one unit in the last place (float32: a few), and in half
    precision all but a few in 10^4 identical (the float32 mean's summation order is the only difference; a cast
    that truncated instead of rounding would differ in about half of them, a wrong eps, scale, stride or mask nearly
    everywhere)."""
    case = interpreted[f"norm-{dim}-{dtype}"]
    assert case["same_shape_dtype"] and case["finite"]
    assert case["max_ulp"] <= (4 if dtype == "fp32" else 1)
    if dtype != "fp32":
        assert case["differing"] < 1e-3


def test_rms_norm_reads_a_transposed_input_and_an_all_zero_row(interpreted):
    case = interpreted["norm-transposed"]
    assert not case["contiguous_input"]
    assert case["same_shape_dtype"] and case["finite"] and case["zero_row"]
    assert case["max_ulp"] <= 1 and case["differing"] < 1e-3


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("which", ["q", "k"])
@pytest.mark.parametrize("step", ["decode", "prefill"])
def test_rotary_is_hf_apply_rotary_pos_emb_bit_for_bit(interpreted, step, which, dtype):
    """Each product and the sum rounded as torch rounds each elementwise op: no difference at all, on a decode
    step's and on a prefill's strided (B, H, S, D) views."""
    case = interpreted[f"rope-{step}-{which}-{dtype}"]
    assert case["same_shape_dtype"] and case["max_ulp"] == 0


def test_gemma3_attention_applies_rope_through_the_kernel_inside_fused_rotary(monkeypatch):
    """The switch reaches the attention layers (they look HF's function up at each call), routes only tensors on
    the device it was opened for, and gives HF's function back after. The kernel is stood in for by HF's own
    arithmetic, recorded: the CPU has no Triton device."""
    seen = []

    def recording_rotary(x, cos, sin):
        seen.append(tuple(x.shape))
        return x * cos[:, None] + modeling_gemma3.rotate_half(x) * sin[:, None]

    monkeypatch.setattr(triton_kernels, "available", lambda device, kernel: True)
    monkeypatch.setattr(triton_kernels, "rotary", recording_rotary)
    config = modeling_gemma3.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                              vocab_size=50)
    model = modeling_gemma3.Gemma3ForCausalLM(config).eval()
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        hf_apply = modeling_gemma3.apply_rotary_pos_emb
        with triton_kernels.fused_rotary({torch.device("cpu")}) as used:
            got = model(input_ids=ids).logits
        assert used and modeling_gemma3.apply_rotary_pos_emb is hf_apply
        with triton_kernels.fused_rotary({torch.device("meta")}):
            model(input_ids=ids)  # CPU tensors, a switch opened for another device: HF's function

    assert seen == [(1, 4, 4, 16), (1, 2, 4, 16)] * 2  # q and k of both layers, once
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("heads", ["g2", "g1", "g4-27b-head"])
def test_decode_attention_is_eager_attention_reading_only_the_allowed_positions(interpreted, heads, dtype):
    """The keys and values of masked positions are NaN: a value read there would make its row NaN. The kernel sums in
    another order than torch (tiles of 32 positions, a two-pass softmax): in half precision the output rounds to
    torch's (one ulp at most, rarely); in float32 it is as close to the float64 result as torch's own is."""
    case = interpreted[f"attention-{heads}-{dtype}"]
    assert case["same_shape_dtype"] and case["finite"]
    if dtype == "fp32":
        assert case["error"] <= 2 * case["eager_error"]
    else:
        assert case["max_ulp"] <= 1 and case["differing"] <= 0.01


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_seat_copies_each_rows_prompt_bit_for_bit_and_nothing_else(interpreted, dtype):
    """Against torch's indexed write over the whole slot buffer: the seated rows' prompt positions hold their
    prompts' values (NaN and -0.0 too), every other position is untouched."""
    assert interpreted[f"seat-{dtype}"]


def test_seat_refuses_buffers_that_do_not_fit():
    slot, prompt = torch.zeros(2, 4, 3, 9, 16), torch.zeros(2, 5, 3, 7, 16)
    rows = torch.tensor([0])
    with pytest.raises(ValueError, match="do not fit"):
        triton_kernels.seat_prompts(slot[:, :, :2], prompt, rows, rows)  # other KV heads
    with pytest.raises(ValueError, match="do not fit"):
        triton_kernels.seat_prompts(slot.half(), prompt, rows, rows)
    with pytest.raises(ValueError, match="contiguous"):
        triton_kernels.seat_prompts(torch.zeros(2, 4, 3, 16, 9).transpose(3, 4), prompt, rows, rows)  # D strided


def test_each_kernels_probe_passes_the_working_kernel(interpreted):
    assert {name: interpreted[f"probe-{name}"] for name in triton_kernels._PROBES} == {
        "rms_norm": "passed", "rotary": "passed", "attention": "passed", "seat": "passed"}


def test_nothing_is_switched_off_cuda():
    assert not triton_kernels.available(torch.device("cpu"), "rms_norm")
    with triton_kernels.fused_rotary({torch.device("cpu")}) as used:
        assert not used


def test_rope_is_switched_only_if_the_kernel_works_on_every_device_of_the_model(monkeypatch):
    """A device_map="auto" model has layers on several GPUs: the kernel is used only if its probe passed on each
    (a probe on the first device alone would send the others' tensors to a kernel never tried there)."""
    works = {torch.device("cuda", 0): True, torch.device("cuda", 1): False}
    monkeypatch.setattr(triton_kernels, "available", lambda device, kernel: works[device])
    from transformers.models.gemma3 import modeling_gemma3

    hf_apply = modeling_gemma3.apply_rotary_pos_emb
    with triton_kernels.fused_rotary(works) as used:
        assert not used and modeling_gemma3.apply_rotary_pos_emb is hf_apply
    works[torch.device("cuda", 1)] = True
    with triton_kernels.fused_rotary(works) as used:
        assert used and modeling_gemma3.apply_rotary_pos_emb is not hf_apply
