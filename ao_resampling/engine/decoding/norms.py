"""Gemma's RMSNorm with its scale computed once per stage instead of once per call.

``Gemma3RMSNorm`` recomputes ``1 + weight.float()`` on every call: two tiny kernels, times six norms per layer, times
62 layers, ~750 extra kernels in every decode step of the 27B model. ``cached_norm_scales(model)`` gives each norm,
for a block of code, a forward that does the same arithmetic in the same order with that scale computed up front, so
its outputs are bit-for-bit those of the original. The block must outlive any CUDA graph captured inside it: a graph
reads the cached scales from their memory.

Shape letters:
    D  the model's hidden size (a norm's input is any shape ending in D)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn


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
    scale_D = 1.0 + module.weight.detach().float()
    eps = module.eps
    return lambda x: gemma_rms_norm(x, scale_D, eps)


@contextlib.contextmanager
def cached_norm_scales(model: nn.Module) -> Iterator[int]:
    """Inside the block every Gemma3RMSNorm of ``model`` uses a precomputed scale; yields how many were switched.
    Their own forward comes back after the block, also when it raises."""
    norms = [m for m in model.modules() if _is_gemma3_norm(m)]
    try:
        for norm in norms:
            norm.forward = _cached_forward(norm)
        yield len(norms)
    finally:
        for norm in norms:
            norm.__dict__.pop("forward", None)
