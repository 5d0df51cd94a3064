"""Gemma's RMSNorm for the sampler: its scale computed once per stage, and on a GPU one kernel per call.

``Gemma3RMSNorm`` recomputes ``1 + weight.float()`` on every call and runs its float32 arithmetic as ~8 separate
kernels. ``cached_norm_scales(model)`` gives each norm, for a block of code, a forward with the scale computed up
front:

- on a CPU (and where Triton is missing or fails its probe) ``gemma_rms_norm``: the same torch operations in the
  same order, so the outputs are bit for bit those of the original;
- on a CUDA device, ``triton_kernels.rms_norm``: one launch a call, the same float32 arithmetic but for the order of
  the mean's sum (triton_kernels.py says what that can change).

The block must outlive any CUDA graph captured inside it: a graph reads the cached scales from their memory.

Shape letters:
    D  the normalised size (the hidden size, or the head size for the query/key norms)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ao_resampling.engine.decoding import triton_kernels


def gemma_rms_norm(x: torch.Tensor, scale_D: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma3RMSNorm.forward with ``scale_D = 1 + weight.float()`` given: float32 math, cast back at the end.
    ``x``: any leading shape, D last."""
    x32 = x.float()
    out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (out * scale_D).type_as(x)


def _is_gemma3_norm(module: nn.Module) -> bool:
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    return type(module) is Gemma3RMSNorm  # a subclass may compute something else


def _cached_forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    scale_D = (1.0 + module.weight.detach().float()).contiguous()
    eps = module.eps
    if triton_kernels.available(scale_D.device, "rms_norm"):
        return lambda x: triton_kernels.rms_norm(x, scale_D, eps)
    return lambda x: gemma_rms_norm(x, scale_D, eps)


@contextlib.contextmanager
def cached_norm_scales(model: nn.Module) -> Iterator[int]:
    """Inside the block every Gemma3RMSNorm of ``model`` uses a precomputed scale, and on a CUDA device with
    working Triton the one-kernel norm; yields how many norms were switched. Their own forward comes back after the
    block, also when it raises."""
    norms = [m for m in model.modules() if _is_gemma3_norm(m)]
    try:
        for norm in norms:
            norm.forward = _cached_forward(norm)
        yield len(norms)
    finally:
        for norm in norms:
            norm.__dict__.pop("forward", None)
