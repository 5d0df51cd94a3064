"""Each attention layer's query, key and value projections as one matmul, for the sampler's stages on a GPU.

A 27B decode step at 272 rows on an H100 runs q (5376 -> 4096), k and v (5376 -> 2048 each) as three matmuls in
4.09 ms, the same over the three weights stacked in 2.85 ms (bench/bench_rows.py, session 13): three small cuBLAS
launches a layer become one that fills the card better, ~1.2 ms of a ~38 ms step.

``fused_qkv(model)``: each layer's three weights are moved into one tensor (output rows stacked q, k, v), built a
layer at a time, and each projection's weight becomes a view of its rows, so the model holds no second copy and
everything else that reads or writes the weights (the LoRA merge, the snapshot's restore, HF's own forward) sees
them as before. Inside the block the query projection runs the one matmul and the key and value projections return
their columns of its output (the key/value of a different input, which HF's attention never passes, gets its own
matmul). The layout stays after the block (the next stage reuses it); the projections' own forward comes back.

Only projections that are plain bias-free linears in effect are fused: a LoRA layer must have its adapters off (the
sampler's merged LoRA, or the baseline's base model), else its forward adds the adapter's own product. The columns
are views into the stacked output: the query/key norms copy them once to read them row by row (as a prefill's
transposed queries already are).

Shape letters:
    O  the stacked output features: query, then key, then value
    I  the input features (the hidden size)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def _plain_linear(module: nn.Module) -> nn.Linear | None:
    """The bias-free Linear a projection computes in effect, or None (a bias, an active LoRA, another layer type)."""
    linear = getattr(module, "base_layer", module)
    if hasattr(module, "lora_A") and not getattr(module, "disable_adapters", False):
        return None
    if not isinstance(linear, nn.Linear) or linear.bias is not None:
        return None
    return linear


STACKED = "_ao_stacked_qkv_OI"  # where a layer keeps its stacked weight, for the next stage


def row_blocks(linears: list[nn.Linear]) -> list[slice]:
    """Each linear's rows of the stacked weight (and its columns of the stacked output), in order."""
    blocks, start = [], 0
    for linear in linears:
        blocks.append(slice(start, start + linear.weight.shape[0]))
        start = blocks[-1].stop
    return blocks


def stacked_weight(layer: nn.Module, linears: list[nn.Linear]) -> torch.Tensor:
    """One (O, I) tensor whose row blocks are the linears' weights, each weight made a view of its block; kept on
    ``layer``, and found there by the next stage while the weights are still its views."""
    blocks = row_blocks(linears)
    stacked_OI = layer.__dict__.get(STACKED)
    if stacked_OI is not None and all(linear.weight.data_ptr() == stacked_OI[block.start].data_ptr()
                                      for linear, block in zip(linears, blocks)):
        return stacked_OI
    with torch.no_grad():
        stacked_OI = torch.cat([linear.weight.detach() for linear in linears])
    for linear, block in zip(linears, blocks):
        linear.weight.data = stacked_OI[block]  # the old storage is freed as each layer is done
    layer.__dict__[STACKED] = stacked_OI
    return stacked_OI


class _Stacked:
    """One layer's projections through the stacked weight: the query's call runs the matmul, the key's and the
    value's read their columns of it (the value's call lets go of it)."""

    def __init__(self, weight_OI: torch.Tensor, linears: list[nn.Linear]):
        self.weight_OI = weight_OI
        self.columns = row_blocks(linears)
        self.linears = linears
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    def query(self, x: torch.Tensor) -> torch.Tensor:
        self.input, self.output = x, F.linear(x, self.weight_OI)
        return self.output[..., self.columns[0]]

    def part(self, which: int, x: torch.Tensor) -> torch.Tensor:
        out = self.output[..., self.columns[which]] if x is self.input else F.linear(x, self.linears[which].weight)
        if which == len(self.columns) - 1:
            self.input = self.output = None
        return out


def attention_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if all(hasattr(m, name) for name in PROJECTIONS)]


@contextlib.contextmanager
def fused_qkv(model: nn.Module) -> Iterator[int]:
    """Inside the block every attention layer whose three projections are plain linears runs them as one matmul;
    yields how many layers do. Their own forward comes back after, also when the block raises."""
    switched: list[nn.Module] = []
    try:
        for layer in attention_layers(model):
            modules = [getattr(layer, name) for name in PROJECTIONS]
            linears = [_plain_linear(m) for m in modules]
            if any(linear is None for linear in linears) or len({l.weight.device for l in linears}) != 1:
                continue
            stacked = _Stacked(stacked_weight(layer, linears), linears)
            modules[0].forward = stacked.query
            modules[1].forward = lambda x, stacked=stacked: stacked.part(1, x)
            modules[2].forward = lambda x, stacked=stacked: stacked.part(2, x)
            switched.extend(modules)
        yield len(switched) // len(PROJECTIONS)
    finally:
        for module in switched:
            module.__dict__.pop("forward", None)
