"""HF's own numerical noise, and whether the sampler's decode stays inside it (bench only).

The sampler's decode is not HF's forward bit for bit: the LoRA is folded into bf16 weights, attention reads grouped
KV heads in place (attention.py), each step is a CUDA graph over per-row KV slots. It is acceptable when its change
is no larger than the one HF itself makes when the same rows are batched differently. Teacher-forced on the same
tokens (Q queries x T steps), per step the largest |delta log-prob| over rows and vocabulary of

- the sampler's decode with the LoRA merged, and with it unmerged (adapter modules), against HF at batch 1 with the
  adapter unmerged (what the reference code runs), both with the sampler's kernels (RMSNorm and RoPE in Triton on a
  GPU), and merged with torch's kernels everywhere (what the Triton RMSNorm adds; its RoPE is bit for bit), and
- HF at batch Q (the Q queries left-padded together) against HF at batch 1.

HF here is one forward over prompt + forced tokens with the activation injected at the placeholders; the injection
hook fires on that whole-sequence pass, which is what the prompt pass then the cached decode steps compute.

Shape letters:
    Q  queries (one row each)
    T  teacher-forced steps (the tokens fed, one distribution per step)
    L  a padded sequence (prompt + forced tokens)
    V  the vocabulary
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from unittest import mock

import torch

from ao_resampling.config import Decoding
from ao_resampling.engine.decoding.decode_step import SlotStep
from ao_resampling.engine.decoding import triton_kernels
from ao_resampling.engine.decoding.sampler import Query, Sampler, injection_for_rows
from ao_resampling.engine.hooks import left_pad, position_ids_from_mask
from ao_resampling.engine.loading.models import model_device, text_config


def max_abs_delta_per_step(a_QTV: torch.Tensor, b_QTV: torch.Tensor) -> list[float]:
    """Per step, the largest |a - b| over rows and vocabulary (-inf log-probs on both sides count as equal)."""
    return (a_QTV - b_QTV).abs().nan_to_num(nan=0.0).amax(dim=(0, 2)).tolist()


@torch.inference_mode()
def hf_teacher_forced(oracle, queries: Sequence[Query], tokens_QT: torch.Tensor) -> torch.Tensor:
    """HF's forward, all queries in one left-padded batch: log-probs (float32) of each step's distribution."""
    device = model_device(oracle.model)
    T = tokens_QT.shape[1]
    sequences = [list(q.input_ids) + tokens_QT[i, :T - 1].tolist() for i, q in enumerate(queries)]
    ids_QL, mask_QL = left_pad(sequences, oracle.tokenizer.pad_token_id, device)
    L = ids_QL.shape[1]
    pad_Q = [L - len(s) for s in sequences]
    # injection_for_rows shifts the placeholders by L - len(input_ids): here the prompt and its T - 1 forced tokens
    whole = [Query(q.key, tuple(q.input_ids) + (0,) * (T - 1), 1, q.vectors_KD, q.positions_K) for q in queries]
    with injection_for_rows(oracle.model, whole, L, device, oracle.injection_layer, 1.0):
        logits_QLV = oracle.model(input_ids=ids_QL, attention_mask=mask_QL,
                                  position_ids=position_ids_from_mask(mask_QL)).logits
    rows = [logits_QLV[i, pad_Q[i] + len(q.input_ids) - 1:pad_Q[i] + len(q.input_ids) - 1 + T]
            for i, q in enumerate(queries)]
    return torch.stack(rows).float().log_softmax(-1)


@torch.inference_mode()
def sampler_teacher_forced(sampler: Sampler, queries: Sequence[Query], tokens_QT: torch.Tensor) -> torch.Tensor:
    """The sampler's own path: its prompt pass (injection on), the KV seated in rows, then its decode steps fed the
    forced tokens. Inside the sampler's stage (the LoRA merged if it merges)."""
    device = model_device(sampler.model)
    P, T, Q = max(len(q.input_ids) for q in queries), tokens_QT.shape[1], len(queries)
    with sampler._stage():
        window = getattr(text_config(sampler.model), "sliding_window", None)
        step = SlotStep(sampler.model, Q, P, T, sliding_window=window, device=device)
        mask_QP, logits_QV = sampler.prefill(queries, step, device)
        step.seat(torch.arange(Q, device=device), torch.arange(Q, device=device), mask_QP)
        out = [logits_QV.float().log_softmax(-1)]
        for t in range(T - 1):
            out.append(step(tokens_QT[:, t].to(device), P + t + 1).float().log_softmax(-1))
    return torch.stack(out, dim=1)


def _kernels(fused: bool):
    """The sampler's kernels as it chooses them (RMSNorm and RoPE in Triton on a GPU), or torch's everywhere."""
    return contextlib.nullcontext() if fused else mock.patch.object(triton_kernels, "available", lambda *_: False)


def noise_check(make_sampler: Callable[..., Sampler], oracle, queries: Sequence[Query], decoding: Decoding, *,
                steps: int) -> dict:
    """The numbers above on ``queries`` (one row each), fed the greedy answer of HF at batch 1."""
    one_each = [Query(q.key, q.input_ids, 1, q.vectors_KD, q.positions_K) for q in queries]
    greedy = decoding.model_copy(update={"temperature": 0.0, "do_sample": False, "top_k": 0, "top_p": 1.0,
                                         "max_new_tokens": steps, "eos_token_ids": ()})
    forced = make_sampler(len(one_each), greedy, False).run(one_each, progress=False)
    tokens_QT = torch.tensor([forced[q.key][0].token_ids for q in one_each])
    hf1_QTV = torch.cat([hf_teacher_forced(oracle, [q], tokens_QT[i:i + 1]) for i, q in enumerate(one_each)])
    numbers = {"hf_batch_vs_hf1": max_abs_delta_per_step(hf_teacher_forced(oracle, one_each, tokens_QT), hf1_QTV)}
    for name, merge, fused in (("merged_vs_hf1", True, True), ("unmerged_vs_hf1", False, True),
                               ("merged_torch_kernels_vs_hf1", True, False)):
        with _kernels(fused):
            fast_QTV = sampler_teacher_forced(make_sampler(len(one_each), greedy, merge), one_each, tokens_QT)
        numbers[name] = max_abs_delta_per_step(fast_QTV, hf1_QTV)
    return {name: {"max": float(f"{max(v):.3g}"), "mean": float(f"{sum(v) / len(v):.3g}")}
            for name, v in numbers.items()}
