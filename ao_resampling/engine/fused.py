"""Fused elementwise kernels for the decode steps of a Gemma 3 model (opt-in: ``BatchedSampler(fused=True)``).

A 27B decode step at ~720 rows spends ~60 ms in matmuls and, around them, ~20 ms in small elementwise kernels that
each read and write the whole (rows x hidden) activation: six RMSNorms a layer (each ~7 kernels in float32), two
residual adds, GELU times up, RoPE. ``FusedDecode`` swaps, for the decode steps only, the forwards of every
``Gemma3DecoderLayer``, ``Gemma3MLP`` and ``Gemma3RMSNorm`` and the module's RoPE function for versions whose
elementwise parts are ``torch.compile``d (one Triton kernel each on CUDA, C++ on CPU):

- ``rms_norm``: Gemma's norm (float32 math, ``1 + w`` scale, cast back), the scale computed once per stage;
- ``add_rms_norm``: ``h = residual + post_norm(x)`` and ``pre_norm(h)`` in one kernel (after attention);
- ``add_post_norm``: ``residual + post_norm(x)`` (after the MLP);
- ``gelu_mul``: ``gelu_tanh(gate) * up``; ``rope``: ``q * cos + rotate_half(q) * sin`` for q and k.

The arithmetic is HF's, op for op, with every bf16 rounding HF does kept (``emulate_precision_casts``); what can
differ is the order of the float32 sum inside a norm, so outputs are not bit-identical to HF's eager forward (on CPU
they are). The fast path may use them only if that deviation is inside HF's own numerical noise, which ``noise.py``
measures (teacher-forced log-probs: fused vs HF at batch 1 against HF at batch N vs HF at batch 1). On the H200
(27B stand-in, 4 queries x 120 steps) it was not: 0.2838 against 0.2745 (the unfused fast path: 0.2779), for a
7% faster steady batch and ~12 s of compiling; so they stay off by default (``fused_kernels``; bench/README.md).
The prompt (prefill) pass, where the activation is injected, stays HF's own forward.

The compiled functions are shape-polymorphic (``dynamic=True``) and always see (rows, last dim): one compile serves
every row count and rank, so dropping finished rows or a smaller last batch costs no recompile. The first decode step of a stage compiles them (seconds).
Like ``norms.cached_norm_scales``, the scales must outlive the CUDA graphs captured while the swap is active:
``FusedDecode`` is built once per stage and ``active()`` is entered around each batch's decode loop.

Shape letters:
    D  the model's hidden size (a norm's input is any shape ending in D); the head size for q/k norms and RoPE
    I  the MLP's intermediate size (gate and up are any shape ending in I)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn


def rms_norm(x: torch.Tensor, scale_D: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma3RMSNorm.forward with ``scale_D = 1 + weight.float()``."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * scale_D).type_as(x)


def add_rms_norm(residual: torch.Tensor, x: torch.Tensor, post_scale_D: torch.Tensor, pre_scale_D: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = residual + post_norm(x)`` (in the residual's dtype, as HF adds) and ``pre_norm(h)``."""
    h = residual + rms_norm(x, post_scale_D, eps)
    return h, rms_norm(h, pre_scale_D, eps)


def add_post_norm(residual: torch.Tensor, x: torch.Tensor, scale_D: torch.Tensor, eps: float) -> torch.Tensor:
    return residual + rms_norm(x, scale_D, eps)


def gelu_mul(gate_I: torch.Tensor, up_I: torch.Tensor) -> torch.Tensor:
    """Gemma's MLP activation (``gelu_pytorch_tanh``) times up."""
    return nn.functional.gelu(gate_I, approximate="tanh") * up_I


def rope(q_D: torch.Tensor, k_D: torch.Tensor, cos_D: torch.Tensor, sin_D: torch.Tensor,
         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's ``apply_rotary_pos_emb`` (rotate_half: ``cat(-x2, x1)``)."""
    cos_D, sin_D = cos_D.unsqueeze(unsqueeze_dim), sin_D.unsqueeze(unsqueeze_dim)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q_D * cos_D + rotate_half(q_D) * sin_D, k_D * cos_D + rotate_half(k_D) * sin_D


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``fn`` compiled once per process, for every shape (rows change as answers finish)."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.emulate_precision_casts = True  # round to bf16 wherever HF's eager ops do
    # A stage compiles each function a few times at most (dtype, one row or many, prompt or decode); a process that
    # decodes models of several dtypes (the tests) needs more than the default 8 before dynamo gives up.
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    return torch.compile(fn, dynamic=True, fullgraph=True)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as (rows, last dim): every call of a compiled function then has one rank, so one compile serves the
    hidden states (B, 1, D) and the q/k heads (B, H, 1, D) alike (a view on decode steps, where x is contiguous)."""
    return x.reshape(-1, x.shape[-1])


def _gemma3_classes():
    from transformers.models.gemma3 import modeling_gemma3 as m

    return m, m.Gemma3DecoderLayer, m.Gemma3MLP, m.Gemma3RMSNorm


def _gemma3_modules(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
    """(decoder layers, MLPs, RMSNorms) of ``model`` of exactly HF's classes (a subclass may compute otherwise)."""
    _, layer_cls, mlp_cls, norm_cls = _gemma3_classes()
    modules = list(model.modules())
    return ([m for m in modules if type(m) is layer_cls], [m for m in modules if type(m) is mlp_cls],
            [m for m in modules if type(m) is norm_cls])


def _fusable(layers: list[nn.Module], mlps: list[nn.Module]) -> bool:
    return bool(layers) and len(mlps) == len(layers) and all(
        getattr(m.config, "hidden_activation", None) == "gelu_pytorch_tanh" for m in mlps)


def fusable(model: nn.Module) -> bool:
    """Whether ``model`` has Gemma 3 decoder layers of exactly HF's classes with the tanh-GELU MLP."""
    layers, mlps, _ = _gemma3_modules(model)
    return _fusable(layers, mlps)


class FusedDecode:
    """The fused forwards for one model, built once with every norm's scale (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.module = _gemma3_classes()[0]
        layers, mlps, norms = _gemma3_modules(model)
        if not _fusable(layers, mlps):
            raise ValueError(f"{type(model).__name__}: fused decode kernels are for Gemma 3 decoder layers with "
                             "the gelu_pytorch_tanh MLP")
        with torch.inference_mode():  # as the decode steps that read them run
            self.scales = {id(n): 1.0 + n.weight.detach().float() for n in norms}
        self.swaps = ([(n, self._norm_forward(n)) for n in norms] + [(m, self._mlp_forward(m)) for m in mlps]
                      + [(layer, self._layer_forward(layer)) for layer in layers])

    def _norm_forward(self, norm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        fn, scale_D, eps = compiled(rms_norm), self.scales[id(norm)], norm.eps
        return lambda x: fn(_rows(x), scale_D, eps).view(x.shape)

    @staticmethod
    def _mlp_forward(mlp: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        fn = compiled(gelu_mul)

        def forward(x: torch.Tensor) -> torch.Tensor:
            gate_I = mlp.gate_proj(x)
            return mlp.down_proj(fn(_rows(gate_I), _rows(mlp.up_proj(x))).view(gate_I.shape))

        return forward

    def _layer_forward(self, layer: nn.Module) -> Callable:
        """Gemma3DecoderLayer.forward with the norms after attention and after the MLP fused into the residual adds
        (the cache argument, ``cache=`` or ``past_key_values=`` by transformers version, passes through)."""
        add_norm, add_post = compiled(add_rms_norm), compiled(add_post_norm)
        input_norm = self._norm_forward(layer.input_layernorm)
        post_attn = self.scales[id(layer.post_attention_layernorm)]
        pre_ff = self.scales[id(layer.pre_feedforward_layernorm)]
        post_ff = self.scales[id(layer.post_feedforward_layernorm)]
        eps = layer.post_attention_layernorm.eps
        if {eps} != {layer.pre_feedforward_layernorm.eps, layer.post_feedforward_layernorm.eps}:
            raise ValueError("fused decode kernels need one eps for a layer's norms")

        def forward(hidden_states, position_embeddings=None, attention_mask=None, position_ids=None, **kwargs):
            x, _ = layer.self_attn(hidden_states=input_norm(hidden_states), position_embeddings=position_embeddings,
                                   attention_mask=attention_mask, position_ids=position_ids, **kwargs)
            h, x = add_norm(_rows(hidden_states), _rows(x), post_attn, pre_ff, eps)
            return add_post(h, _rows(layer.mlp(x.view(hidden_states.shape))), post_ff, eps).view(hidden_states.shape)

        return forward

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside the block the model decodes with the fused forwards; the ones before (HF's, or the cached-scale
        norms of norms.py) come back after it, also when it raises."""
        before = [(module, module.__dict__.get("forward")) for module, _ in self.swaps]
        rope_before = self.module.apply_rotary_pos_emb
        try:
            for module, forward in self.swaps:
                module.forward = forward
            self.module.apply_rotary_pos_emb = compiled(rope)  # looked up by Gemma3Attention.forward at call time
            yield
        finally:
            self.module.apply_rotary_pos_emb = rope_before
            for module, forward in before:
                if forward is None:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = forward
