"""Decode-step attention for grouped-query models, without copying the KV cache.

Gemma 3 27B has 32 query heads over 16 KV heads. Hugging Face's SDPA and eager paths expand the cache to 32 heads
(``repeat_kv``) at every layer of every decode step: with 760 rows of a 160-token static cache that is ~3 GB of copies
per layer per step, a quarter of the step (profile in bench/README.md). ``gqa_attention`` folds each KV head's query
heads into the query-length dimension instead, so one batched matmul reads each cached key and value once.

It also reads only as much of a static cache as is filled: the decode loop passes a 4-D boolean mask as long as the
sequence so far, and the keys and values are cut to that length (the rest of the static cache is empty anyway).

The arithmetic is eager attention's (scores = q·k * scaling, masked, fp32 softmax, cast back, times v), in the same
order; only the head bookkeeping differs. On a GPU a decode step (one query position, the additive masks the decode
step makes) goes to one Triton kernel a layer instead (``triton_kernels.decode_attention``): the same roundings, and
each row reads only the positions its mask allows, not the longest row's cut. ``decode_attention(model)`` switches a
model to it for a block of code.

Shape letters:
    B  rows of the batch
    H  query heads
    K  key/value heads (H is a multiple of K)
    G  query heads per key/value head (H // K)
    Q  query positions (1 on a decode step)
    M  a KV head's queries folded together: (head within the group, query position), G * Q
    S  key/value positions: the cache, or its filled part once cut to the mask
    D  the head size
    1  a broadcast dimension
"""


from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ao_resampling.engine.decoding import triton_kernels

NAME = "ao_resampling_gqa"


def gqa_attention(module: nn.Module, query_BHQD: torch.Tensor, key_BKSD: torch.Tensor, value_BKSD: torch.Tensor,
                  attention_mask: torch.Tensor | None, *, scaling: float | None = None, dropout: float = 0.0,
                  softcap: float | None = None, **_) -> tuple[torch.Tensor, None]:
    """Attention for H query heads sharing K key/value heads (head h reads KV head h // (H/K), as ``repeat_kv``).

    ``attention_mask``: (B, 1, Q, S') boolean (True = attend) or additive float; S' <= S cuts the cache to S'.
    Returns the output as (B, Q, H, D), the layout Hugging Face's attention functions return.
    """
    if dropout:
        raise ValueError("gqa_attention is for inference; dropout must be 0")
    B, H, Q, D = query_BHQD.shape
    K = key_BKSD.shape[1]
    if attention_mask is not None:
        S = attention_mask.shape[-1]
        key_BKSD, value_BKSD = key_BKSD[:, :, :S], value_BKSD[:, :, :S]
    scaling = D**-0.5 if scaling is None else scaling
    if (Q == 1 and attention_mask is not None and attention_mask.dtype.is_floating_point and softcap is None
            and triton_kernels.decode_attention_fits(H, K, D)
            and triton_kernels.available(query_BHQD.device, "attention")):
        # a decode step's additive mask (decode_step.py): one kernel that reads only each row's allowed positions
        return triton_kernels.decode_attention(query_BHQD, key_BKSD, value_BKSD, attention_mask, scaling), None

    query_BKMD = query_BHQD.reshape(B, K, (H // K) * Q, D)  # M = (head within the group, query position)
    scores_BKMS = torch.matmul(query_BKMD, key_BKSD.transpose(2, 3)) * scaling
    if softcap is not None:
        scores_BKMS = torch.tanh(scores_BKMS / softcap) * softcap
    if attention_mask is not None:
        scores_BKGQS = scores_BKMS.view(B, K, H // K, Q, -1)
        mask_B11QS = attention_mask[:, :, None]
        if mask_B11QS.dtype == torch.bool:
            scores_BKGQS = scores_BKGQS.masked_fill(~mask_B11QS, torch.finfo(scores_BKGQS.dtype).min)
        else:
            scores_BKGQS = scores_BKGQS + mask_B11QS
        scores_BKMS = scores_BKGQS.view(B, K, (H // K) * Q, -1)
    probs_BKMS = nn.functional.softmax(scores_BKMS, dim=-1, dtype=torch.float32).to(query_BHQD.dtype)
    out_BKMD = torch.matmul(probs_BKMS, value_BKSD)
    return out_BKMD.view(B, H, Q, D).transpose(1, 2).contiguous(), None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, gqa_attention)
    return NAME


def attention_configs(model: nn.Module) -> dict[int, object]:
    """The configs ``model``'s attention layers read their implementation from (a few, shared by many layers)."""
    return {id(m.config): m.config for m in model.modules()
            if hasattr(m, "num_key_value_groups") and hasattr(m, "config")}


@contextlib.contextmanager
def decode_attention(model: nn.Module, configs: dict[int, object] | None = None) -> Iterator[None]:
    """Run every attention layer of ``model`` with ``gqa_attention`` inside the block; the old setting comes back
    after it, also when the block raises. The caller passes 4-D masks (see the module docstring). ``configs``:
    ``attention_configs(model)`` found once, for a caller that switches every decode step (walking every module of
    a 62-layer model with its LoRA each step costs milliseconds)."""
    configs = attention_configs(model) if configs is None else configs
    before = {key: config._attn_implementation for key, config in configs.items()}
    register()
    try:
        for config in configs.values():
            config._attn_implementation = NAME
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = before[key]
