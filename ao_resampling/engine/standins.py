"""Random stand-ins whose answers end on their own, as real answers do.

A random model almost never draws a stop token (1 in ~262k per step), so at scale every stand-in answer runs to
max_new_tokens, and the paths only real answers take (rows finishing at different steps, finished rows dropped from
the batch, again and again) never run. ``end_answers_at_rate`` gives the output layer a bias on one stop token
(<end_of_turn>), calibrated so that, under the run's own decoding (temperature, top-k, top-p), that token is drawn
with a chosen probability per step: answer lengths then spread from a few tokens to max_new_tokens. The weights are
untouched (the bias is a new parameter of the head, which keeps sharing the embedding's weight), so the fast path
and HF ``generate`` see the same model.

Shape letters:
    N  decode steps observed (rows x steps of the calibration answers)
    V  the vocabulary
    B  rows of the calibration prompts
    L  the calibration prompts' length
"""

from __future__ import annotations

import torch
from torch import nn

from ao_resampling.engine.generation_settings import Sampling
from ao_resampling.engine.nucleus import sampling_weights

CALIBRATION_SEED = 0


def stop_probability(logits_NV: torch.Tensor, bias: float, stop_id: int, sampling: Sampling) -> float:
    """The mean, over decode steps, of the probability the sampler gives ``stop_id`` once its logit gets ``bias``
    (the mean, not the median: under top-k/top-p a step either admits the stop token or gives it nothing, and the
    answer lengths follow the average rate)."""
    biased_NV = logits_NV.clone()
    biased_NV[:, stop_id] += bias
    weights_NV = sampling_weights(biased_NV, temperature=sampling.temperature or 1.0, top_p=sampling.top_p,
                                  top_k=sampling.top_k)
    return weights_NV[:, stop_id].mean().item()


def calibrated_bias(logits_NV: torch.Tensor, stop_id: int, rate: float, sampling: Sampling,
                    iters: int = 40) -> float:
    """The bias whose mean per-step stop probability is ``rate`` (bisection: the probability grows with it)."""
    lo, hi = -100.0, 100.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if stop_probability(logits_NV, mid, stop_id, sampling) < rate else (lo, mid)
    return (lo + hi) / 2


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.inference_mode()
def decode_step_logits(model: nn.Module, sampling: Sampling, rows: int = 4, prompt_len: int = 16,
                       steps: int = 48) -> torch.Tensor:
    """Raw logits of the steps a sampled answer goes through (random prompts, the run's decoding, no stop): the
    states the bias must be calibrated on. A random model's decode steps are not like its prompt positions (a
    27B-shaped one soon repeats itself, with a peaked distribution), so calibrating on prompt positions misses."""
    head = _base(model).get_output_embeddings()
    g = torch.Generator(device="cpu").manual_seed(CALIBRATION_SEED)
    ids_BL = torch.randint(3, head.weight.shape[0], (rows, prompt_len), generator=g).to(head.weight.device)
    torch.manual_seed(CALIBRATION_SEED)
    out = model.generate(input_ids=ids_BL, attention_mask=torch.ones_like(ids_BL), max_new_tokens=steps,
                         min_new_tokens=steps, do_sample=sampling.temperature > 0,
                         temperature=sampling.temperature or None, top_k=sampling.top_k, top_p=sampling.top_p,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return torch.cat(out.logits).float()


@torch.inference_mode()
def end_answers_at_rate(model: nn.Module, sampling: Sampling, rate: float, stop_id: int | None = None) -> float:
    """Give the output layer a bias on ``stop_id`` (default: the last eos id, <end_of_turn> for Gemma 3) so that it
    is drawn with probability ~``rate`` per decode step under ``sampling``. Returns the bias. In place."""
    base = _base(model)
    head = base.get_output_embeddings()
    stop_id = max(sampling.eos_token_ids) if stop_id is None else stop_id
    device = head.weight.device
    bias = calibrated_bias(decode_step_logits(model, sampling), stop_id, rate, sampling)
    biased = nn.Linear(head.in_features, head.out_features, bias=True, device=device, dtype=head.weight.dtype)
    biased.weight = head.weight  # the same parameter: still tied to the embedding
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[stop_id] = bias
    biased.requires_grad_(False)
    base.set_output_embeddings(biased)
    return bias
