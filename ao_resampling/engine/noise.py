"""HF's own numerical noise, and whether a fast path stays inside it.

A fused kernel (fused.py) sums in another order than HF's eager ops, so its logits are not HF's bit for bit. It is
allowed when the change is no larger than the one HF itself makes when the same rows are batched differently:
teacher-forced on the same tokens (Q queries x T steps), per step the largest |delta log-prob| over rows and
vocabulary of

- the fast path (``BatchedSampler.teacher_forced``: merged LoRA, static cache, gqa attention, CUDA graphs, fused
  kernels, whatever the sampler is set to) against HF at batch 1, and of
- HF at batch Q (the Q queries left-padded together) against HF at batch 1.

"HF" is the model's own forward as ``generate`` runs it (``hf_path``): the prompt pass with the activation
injected, then one token per step over a dynamic cache, with the model's own attention (``PlainDecodeStep``). All
three run on the same weights, inside the sampler's stage: with the LoRA merged when the sampler merges it, so what
is measured is the kernels' deviation, not the merge's (a separate lever, checked by greedy answers equal to HF
``generate``).
The criterion: the largest per-step value of the first is at most that of the second.

Shape letters:
    Q  queries (one row each)
    T  teacher-forced steps (the tokens fed, one distribution per step)
    V  the vocabulary
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ao_resampling.engine.decoding.sampler import BatchedSampler, Query


@dataclass(frozen=True)
class NoiseCheck:
    """Per step, max |delta log-prob| of the fast path vs HF batch 1 and of HF batch Q vs HF batch 1."""

    fast_vs_hf1: list[float]
    hf_batched_vs_hf1: list[float]

    @property
    def fast_max(self) -> float:
        return max(self.fast_vs_hf1)

    @property
    def hf_max(self) -> float:
        return max(self.hf_batched_vs_hf1)

    @property
    def within_noise(self) -> bool:
        return self.fast_max <= self.hf_max

    def summary(self) -> str:
        verdict = "inside" if self.within_noise else "OUTSIDE"
        return (f"max |d log-prob| per step over {len(self.fast_vs_hf1)} steps: fast path vs HF batch 1 "
                f"{self.fast_max:.4g} (mean {sum(self.fast_vs_hf1) / len(self.fast_vs_hf1):.4g}); HF batch N vs HF "
                f"batch 1 {self.hf_max:.4g} (mean {sum(self.hf_batched_vs_hf1) / len(self.hf_batched_vs_hf1):.4g}): "
                f"{verdict} HF's noise")


def hf_path(sampler: BatchedSampler) -> BatchedSampler:
    """``sampler``'s model and settings decoding as ``generate`` does: a dynamic cache, the model's own attention,
    no CUDA graphs, no fused kernels (``PlainDecodeStep``)."""
    return BatchedSampler(sampler.model, sampler.tokenizer, injection_layer=sampler.injection_layer,
                          coefficient=sampler.coefficient, params=sampler.params, use_adapter=sampler.use_adapter,
                          static_cache=False, attention="hf", cuda_graphs=False)


def max_abs_delta_per_step(a_QTV: torch.Tensor, b_QTV: torch.Tensor) -> list[float]:
    """Per step, the largest |a - b| over rows and vocabulary (-inf log-probs on both sides count as equal)."""
    delta_QTV = (a_QTV - b_QTV).abs().nan_to_num(nan=0.0)  # -inf - -inf
    return delta_QTV.amax(dim=(0, 2)).tolist()


def noise_check(sampler: BatchedSampler, queries: Sequence[Query], tokens_QT: torch.Tensor) -> NoiseCheck:
    """The criterion above for ``sampler``'s decode path, on ``queries`` fed ``tokens_QT`` (one row a query)."""
    hf = hf_path(sampler)
    with sampler.stage():  # the same weights for all three (the LoRA merged if the sampler merges it)
        hf1_QTV = torch.cat([hf.teacher_forced([q], tokens_QT[i:i + 1]) for i, q in enumerate(queries)])
        hf_batched_QTV = hf.teacher_forced(queries, tokens_QT)
        fast_QTV = sampler.teacher_forced(queries, tokens_QT)
    return NoiseCheck(max_abs_delta_per_step(fast_QTV, hf1_QTV), max_abs_delta_per_step(hf_batched_QTV, hf1_QTV))
