"""Drawing the next token from logits the way Hugging Face's sampling warpers do, without sorting the vocabulary.

HF's order is temperature, top-k, top-p, then a categorical draw; the draw's random numbers come from each row's own
stream (streams.py), keyed by the token id, so a row draws the same token whatever else is in the batch. Sorting a
262k-token row for top-p at every decode step is most of the sampler's cost, so the top candidates are sorted
instead, and only a row whose nucleus is not inside them falls back to a full sort (of the model's bf16 logits: half
the bytes of float32). Pure torch, no model: ``Sampler`` (sampler.py) calls ``sample_next_tokens`` once per decode
step; ``sampling_weights`` gives the same distribution densely, for checks.

Shape letters:
    B  rows of the batch (one per sample being drawn)
    V  the vocabulary
    C  candidates: the top tokens of a row, sorted descending (TOP_P_CANDIDATES, or top-k + 1 if more); the helpers
       that take C (``top_p_keep_mask``, ``_draw``) take whole rows too (C = V)
    R  the rows taking the full-row path (a subset of B)
    1  a broadcast dimension
"""

from __future__ import annotations

import torch

from ao_resampling.engine.decoding.streams import exponentials

TOP_P_CANDIDATES = 256


def top_p_keep_mask(sorted_probs_BC: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest prefix of descending probabilities whose mass reaches top_p (HF's TopPLogitsWarper rule:
    a token is dropped iff the mass strictly above it already reaches top_p; the top token is always kept)."""
    mass_above_BC = sorted_probs_BC.cumsum(-1) - sorted_probs_BC
    keep_BC = mass_above_BC < top_p
    keep_BC[:, 0] = True
    return keep_BC


def sample_next_tokens(logits_BV: torch.Tensor, *, temperature: float, top_p: float, keys_B: torch.Tensor,
                       steps_B: torch.Tensor, top_k: int = 0, candidates: int = TOP_P_CANDIDATES) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else HF's warpers in HF's order (temperature, top-k, top-p) and
    a categorical draw from row b's stream ``(keys_B[b], steps_B[b])``; ``top_k`` 0 = off.

    Without top-k, rows whose nucleus lies inside the top ``candidates`` tokens (a trained model, nearly always) are
    decided there; other rows (flat distributions, e.g. random weights) sort their whole row once
    (``nucleus_threshold``). With top-k, the nucleus is a k-token problem (top-p renormalises over the top k, as HF's
    TopPLogitsWarper does after TopKLogitsWarper): the top candidates, no sort of the vocabulary; only a row whose k-th
    logit ties even the last candidate (HF keeps every tied token) takes the full-row path. Either way the kept set is
    HF's, except that tokens tied *exactly* at the top-p boundary are all kept (HF keeps the ones its sort put first).
    """
    if temperature == 0:
        return logits_BV.argmax(-1)
    top_k = top_k if 0 < top_k < logits_BV.shape[-1] else 0  # HF: a top_k >= the vocabulary keeps every token
    top_ids_BC, weights_BC, short_B = _candidate_weights(logits_BV, temperature, top_p, top_k, candidates)
    tokens_B = _draw(weights_BC, top_ids_BC, keys_B, steps_B)
    if short_B.any():
        rows_R = short_B.nonzero().squeeze(-1)
        weights_RV = _full_row_weights(logits_BV[rows_R], temperature, top_p, top_k)
        vocab_1V = torch.arange(weights_RV.shape[-1], device=weights_RV.device)[None]
        tokens_B[rows_R] = _draw(weights_RV, vocab_1V.expand_as(weights_RV), keys_B[rows_R], steps_B[rows_R])
    return tokens_B


def sampling_weights(logits_BV: torch.Tensor, *, temperature: float, top_p: float, top_k: int = 0,
                     candidates: int = TOP_P_CANDIDATES) -> torch.Tensor:
    """The normalised distribution ``sample_next_tokens`` draws from, over the whole vocabulary (for checks: the
    same pieces, scattered into a dense row)."""
    top_k = top_k if 0 < top_k < logits_BV.shape[-1] else 0
    top_ids_BC, weights_BC, short_B = _candidate_weights(logits_BV, temperature, top_p, top_k, candidates)
    weights_BV = torch.zeros(logits_BV.shape, dtype=weights_BC.dtype, device=logits_BV.device)
    weights_BV = weights_BV.scatter(-1, top_ids_BC, weights_BC)
    rows_R = short_B.nonzero().squeeze(-1)
    if rows_R.numel():
        weights_BV[rows_R] = _full_row_weights(logits_BV[rows_R], temperature, top_p, top_k)
    return weights_BV / weights_BV.sum(-1, keepdim=True)


def _candidate_weights(logits_BV: torch.Tensor, temperature: float, top_p: float, top_k: int, candidates: int):
    """The top candidates' ids and unnormalised kept probabilities, and which rows need the full-row path.
    Returns (ids_BC, weights_BC, short_B).

    HF scales the whole row to float32 (``logits.float() / temperature``) before its warpers; here only the
    candidates are: dividing by a positive temperature keeps the order (a bf16 logit converts to float32 exactly),
    so the top candidates of the raw logits are those of the scaled ones, and every comparison below is made on the
    scaled values, so even two float32 logits the division makes equal are treated as HF treats them (tied)."""
    # With top-k, candidates past the k-th hold the tokens tied with it (bf16 logits tie often: a random 27B model's
    # rows sent ~1 row in 6 to the full sort when only the (k+1)-th was looked at, ~6 ms a step on the H200).
    k = min(max(top_k + 1, candidates) if top_k else candidates, logits_BV.shape[-1])
    top_logits_BC, top_ids_BC = logits_BV.topk(k, dim=-1)  # sorted, descending
    top_scaled_BC = top_logits_BC.float() / temperature  # HF: float32 logits, then TemperatureLogitsWarper
    if top_k:
        # TopKLogitsWarper keeps every token >= the k-th value (ties included); top-p then sees them renormalised.
        in_k_BC = top_scaled_BC >= top_scaled_BC[:, top_k - 1:top_k]
        log_z_B1 = top_scaled_BC.masked_fill(~in_k_BC, float("-inf")).logsumexp(-1, keepdim=True)
        top_probs_BC = (top_scaled_BC - log_z_B1).exp() * in_k_BC
        short_B = in_k_BC[:, -1]  # the last candidate ties the k-th: the tie may reach past the candidates
    else:
        log_z_B1 = (logits_BV.float() / temperature).logsumexp(-1, keepdim=True)
        top_probs_BC = (top_scaled_BC - log_z_B1).exp()
        short_B = top_probs_BC.sum(-1) < top_p  # the nucleus reaches past the candidates
    return top_ids_BC, top_probs_BC * top_p_keep_mask(top_probs_BC, top_p), short_B


def _full_row_weights(logits_RV: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """Kept probabilities over whole rows (one sort each): rows whose nucleus or top-k tie leaves the candidates."""
    scaled_RV = logits_RV.float() / temperature
    if top_k:
        kth_R1 = scaled_RV.topk(top_k, dim=-1).values[:, -1:]
        logits_RV = logits_RV.masked_fill(scaled_RV < kth_R1, float("-inf"))
        scaled_RV = scaled_RV.masked_fill(scaled_RV < kth_R1, float("-inf"))
    log_z_R1 = scaled_RV.logsumexp(-1, keepdim=True)
    threshold_R1 = nucleus_threshold(logits_RV, log_z_R1, temperature=temperature, top_p=top_p)
    return (scaled_RV - log_z_R1).exp() * (logits_RV >= threshold_R1)


def nucleus_threshold(logits_BV: torch.Tensor, log_z_B1: torch.Tensor, *, temperature: float, top_p: float,
                      rows_per_sort: int = 128) -> torch.Tensor:
    """Per row, the smallest logit the top-p nucleus keeps: the nucleus is exactly ``logits_BV >= threshold``.

    The logits are sorted in their own dtype (bf16 from a bf16 model): dividing by the temperature keeps their order,
    so the order, and hence the nucleus, is the same as that of the scaled float32 logits HF's warper sorts.
    ``log_z_B1`` is the logsumexp of ``logits.float() / temperature``. Rows are sorted a chunk at a time, which bounds
    the sort's temporary memory (indices are int64: four times a bf16 row).
    """
    thresholds = []
    for start in range(0, logits_BV.shape[0], rows_per_sort):
        sorted_BV = logits_BV[start:start + rows_per_sort].sort(dim=-1, descending=True).values
        probs_BV = (sorted_BV.float() / temperature - log_z_B1[start:start + rows_per_sort]).exp()
        # HF's rule on the sorted row: keep a token iff the mass strictly above it is < top_p. The inclusive cumsum
        # is monotone, so the kept tokens are the prefix up to the first one whose inclusive mass reaches top_p.
        n_keep_B1 = ((probs_BV.cumsum(-1) < top_p).sum(-1, keepdim=True) + 1).clamp(max=probs_BV.shape[-1])
        thresholds.append(sorted_BV.gather(-1, n_keep_B1 - 1))
    return torch.cat(thresholds)


def _draw(weights_BC: torch.Tensor, ids_BC: torch.Tensor, keys_B: torch.Tensor, steps_B: torch.Tensor) -> torch.Tensor:
    """A categorical draw per row, proportional to the (unnormalised) weights: the token id whose w / Exp(1) is
    largest, the noise of token ``ids_BC[b, c]`` drawn from row b's stream (the same noise wherever it sits)."""
    noise_BC = exponentials(keys_B.to(ids_BC.device), steps_B.to(ids_BC.device), ids_BC)
    return ids_BC.gather(-1, (weights_BC / noise_BC).argmax(-1, keepdim=True)).squeeze(-1)
