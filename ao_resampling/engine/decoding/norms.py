"""Gemma's RMSNorm for the sampler: its scale computed once per stage, and on a GPU one kernel per call.

``Gemma3RMSNorm`` recomputes ``1 + weight.float()`` on every call and runs its float32 arithmetic as ~8 separate
kernels (cast, square, mean, add, rsqrt, two multiplies, cast back). The 27B model has six norms per layer, 372 a
forward: on an H100 decode step of ~270 rows those small kernels take ~16 ms of a ~54 ms step (the profile in
bench/README.md), each launch reading and writing the whole activation in float32.

``cached_norm_scales(model)`` gives each norm, for a block of code, a forward that does the same arithmetic with the
scale computed up front:

- on a CPU (and where Triton is missing) ``gemma_rms_norm``: the same torch operations in the same order, so the
  outputs are bit for bit those of the original;
- on a CUDA device, ``fused_gemma_rms_norm``: one Triton kernel a call, each program one row: the row loaded once,
  widened to float32, ``x * rsqrt(mean(x^2) + eps) * scale`` in float32, cast back once. The same operations on the
  same float32 values; the only difference is the order the mean's sum is added up in (a tree in one program
  against torch's reduction), which can move the float32 mean by an ulp and, rarely, the cast output by one bf16
  ulp: orders of magnitude below the batch-size noise of the matmuls HF's own ``generate`` has (bench/noise.py
  measures both on the GPU; ``tests/unit/test_norms.py`` compares the kernel with HF's norm in Triton's
  interpreter on the CPU).

The block must outlive any CUDA graph captured inside it: a graph reads the cached scales from their memory.

Shape letters:
    D  the normalised size (the hidden size, or the head size for the query/key norms)
    N  rows: every leading position of the input, flattened
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn


def gemma_rms_norm(x: torch.Tensor, scale_D: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma3RMSNorm.forward with ``scale_D = 1 + weight.float()`` given: float32 math, cast back at the end.
    ``x``: any leading shape, D last."""
    x32 = x.float()
    out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (out * scale_D).type_as(x)


@functools.cache
def _rms_norm_kernel():
    """The Triton kernel, compiled on first use; None without Triton (a CPU-only install)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def rms_norm_rows(x_ptr, scale_ptr, out_ptr, x_row_stride, D, inv_D, eps, BLOCK: tl.constexpr,
                      OUT_BF16_BITS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < D
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
        mean_square = tl.sum(x * x, axis=0) * inv_D  # torch's mean: the float32 sum times 1/D
        normed = x * tl.rsqrt(mean_square + eps)
        out = normed * tl.load(scale_ptr + cols, mask=inside, other=0.0)
        if OUT_BF16_BITS:  # bfloat16 by hand, rounded to nearest even as torch rounds (out_ptr: the int16 bits)
            bits = out.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            tl.store(out_ptr + row * D + cols, (bits >> 16).to(tl.int16), mask=inside)
        else:
            tl.store(out_ptr + row * D + cols, out.to(out_ptr.dtype.element_ty), mask=inside)

    return rms_norm_rows


@functools.cache
def fused_available(device: torch.device) -> bool:
    """The one-kernel norm works on ``device``: a CUDA device, Triton importable, and a probe call (which compiles
    the kernel; Triton needs a C compiler for that) agreeing with the torch arithmetic. Otherwise a warning once,
    and the torch arithmetic."""
    if device.type != "cuda":
        return False
    if _rms_norm_kernel() is None:
        warnings.warn("Triton is not installed: RMSNorm runs as separate torch kernels (slower decode steps)",
                      stacklevel=2)
        return False
    try:
        x = torch.randn(3, 256, device=device).to(torch.bfloat16)
        scale = torch.rand(256, device=device) + 0.5
        got, expected = fused_gemma_rms_norm(x, scale, 1e-6), gemma_rms_norm(x, scale, 1e-6)
        if (got.float() - expected.float()).abs().max() > 0.02 * expected.float().abs().max():
            raise RuntimeError("its output disagrees with the torch arithmetic")
    except Exception as e:  # noqa: BLE001 -- any failure of a compiler toolchain means: use torch's kernels
        warnings.warn(f"the fused RMSNorm kernel does not work here ({type(e).__name__}: {e}); RMSNorm runs as "
                      "separate torch kernels (slower decode steps)", stacklevel=2)
        return False
    return True


def fused_gemma_rms_norm(x: torch.Tensor, scale_D: torch.Tensor, eps: float) -> torch.Tensor:
    """``gemma_rms_norm`` as one Triton kernel (see the module docstring for how its output can differ).
    ``scale_D``: float32, contiguous, on ``x``'s device."""
    kernel = _rms_norm_kernel()
    if kernel is None:
        raise RuntimeError("the fused RMSNorm needs Triton (pip install triton)")
    D = x.shape[-1]
    x_ND = x.reshape(-1, D)  # a view where the layout allows (decode steps); a copy for a prefill's transposed q/k
    if x_ND.stride(-1) != 1:
        x_ND = x_ND.contiguous()
    out_ND = torch.empty((x_ND.shape[0], D), dtype=x.dtype, device=x.device)
    if x_ND.shape[0]:
        block = 1 << (D - 1).bit_length()
        bf16 = x.dtype == torch.bfloat16
        kernel[(x_ND.shape[0],)](x_ND, scale_D, out_ND.view(torch.int16) if bf16 else out_ND, x_ND.stride(0), D,
                                 1.0 / D, eps, BLOCK=block, OUT_BF16_BITS=bf16,
                                 num_warps=max(1, min(16, block // 512)))
    return out_ND.view(x.shape)


def _is_gemma3_norm(module: nn.Module) -> bool:
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    return type(module) is Gemma3RMSNorm  # a subclass may compute something else


def _cached_forward(module: nn.Module, fused: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    scale_D = (1.0 + module.weight.detach().float()).contiguous()
    eps = module.eps
    if fused and fused_available(scale_D.device):
        return lambda x: fused_gemma_rms_norm(x, scale_D, eps)
    return lambda x: gemma_rms_norm(x, scale_D, eps)


@contextlib.contextmanager
def cached_norm_scales(model: nn.Module, *, fused: bool = True) -> Iterator[int]:
    """Inside the block every Gemma3RMSNorm of ``model`` uses a precomputed scale, and on a CUDA device with
    Triton the one-kernel norm (``fused=False``: the torch operations everywhere, bit for bit HF's); yields how many
    norms were switched. Their own forward comes back after the block, also when it raises."""
    norms = [m for m in model.modules() if _is_gemma3_norm(m)]
    try:
        for norm in norms:
            norm.forward = _cached_forward(norm, fused)
        yield len(norms)
    finally:
        for norm in norms:
            norm.__dict__.pop("forward", None)
