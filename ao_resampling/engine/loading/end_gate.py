"""Random stand-ins whose answers end on their own, as real answers do.

A random model almost never draws a stop token (1 in ~262k per step), so at scale every stand-in answer runs to
max_new_tokens, and the paths only real answers take (rows finishing at different steps, finished rows dropped from
the batch, again and again) never run. ``end_answers_at_rate`` swaps the output layer for ``EndingHead``: the same
(tied) weight, plus a gate that, at a chosen fraction of decode steps, makes the stop token (<end_of_turn>) the most
likely token by far, so it is drawn there and answer lengths spread from a few tokens to max_new_tokens.

The gate is a hash of the step's final hidden state: ``frac(GATE_SCALE * <h, r> / |h|) < rate`` for a fixed random
direction r. Every step's hidden state differs (new token, new position), so the gate opens at ~``rate`` of steps
whatever the model's distribution looks like. A logit *bias* on the stop token, calibrated on some decode steps,
does not: the 27B random model's answers are so peaked that top-p 0.9 keeps one token, and a bias calibrated to a
3% stop rate on other steps ended 0 of 10,000 answers on the H200. The gate is a deterministic function of the
hidden state, so the fast path and HF ``generate`` see the same model (in float32 they agree token for token).

Shape letters:
    D  the model's hidden size
    V  the vocabulary
"""

from __future__ import annotations

import torch
from torch import nn

from ao_resampling.engine.loading.models import base_model

GATE_SCALE = 1000.0  # the hash's spread: |<h, r>| / |h| is ~1/sqrt(D), so the fraction is uniform for D up to ~10^5
BOOST = 30.0  # logits the stop token gets above the top one where the gate is open: drawn with probability ~1
GATE_SEED = 0


class EndingHead(nn.Module):
    """``head`` (its weight shared, so still tied to the embedding) whose stop token wins where the gate is open."""

    def __init__(self, head: nn.Linear, stop_id: int, rate: float, seed: int = GATE_SEED):
        super().__init__()
        if not 0.0 < rate < 1.0:
            raise ValueError(f"an eos rate is a probability per step in (0, 1), got {rate}")
        self.weight, self.bias = head.weight, head.bias
        self.in_features, self.out_features = head.in_features, head.out_features
        self.stop_id, self.rate = stop_id, rate
        direction_D = torch.randn(head.in_features, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("direction_D", (direction_D / direction_D.norm()).to(head.weight.device),
                             persistent=False)

    def gate(self, hidden_D: torch.Tensor) -> torch.Tensor:
        """True where the stop token wins: the steps whose hidden state hashes below ``rate``."""
        h_D = hidden_D.float()
        u = (h_D @ self.direction_D) / h_D.norm(dim=-1).clamp_min(1e-12) * GATE_SCALE
        return (u - u.floor()) < self.rate

    def forward(self, hidden_D: torch.Tensor) -> torch.Tensor:
        logits_V = nn.functional.linear(hidden_D, self.weight, self.bias)
        stop_logit = torch.where(self.gate(hidden_D), logits_V.amax(-1) + BOOST, logits_V[..., self.stop_id])
        logits_V = logits_V.clone()
        logits_V[..., self.stop_id] = stop_logit
        return logits_V


def end_answers_at_rate(model: nn.Module, eos_token_ids, rate: float, stop_id: int | None = None) -> int:
    """Give ``model`` an ``EndingHead``: its stop token (default: the last of ``eos_token_ids``, <end_of_turn>
    for Gemma 3) is drawn at ~``rate`` of decode steps. In place; returns the stop id."""
    base = base_model(model)
    stop_id = max(eos_token_ids) if stop_id is None else stop_id
    head = base.get_output_embeddings()
    if isinstance(head, EndingHead):
        raise ValueError("this model already ends its answers at a rate")
    base.set_output_embeddings(EndingHead(head, stop_id, rate))
    return stop_id
