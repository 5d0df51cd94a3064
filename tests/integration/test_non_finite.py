"""Non-finite numbers stop the run where they appear (engine/hooks.py): activations read as NaN or inf, or an
injection that overflows the residual's dtype, raise NonFiniteError (one ``error:`` line) instead of decoding answers
from noise. On the tiny model (read-only: the NaN comes from a hook attached for the test and removed after)."""

from __future__ import annotations

import pytest
import torch

from ao_resampling.engine.hooks import attached, capture_activations_at, injecting
from ao_resampling.engine.loading.models import decoder_layers
from ao_resampling.errors import AOResamplingError, NonFiniteError

IDS = [[2, 105, 2364, 107, 9259, 106, 107], [2, 105, 2364, 107, 4521, 531, 106]]


def nan_in_row(row: int):
    def hook(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[row] = float("nan")
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


def test_activations_read_as_nan_are_an_error_naming_the_row(tiny_model):
    with attached(decoder_layers(tiny_model)[0], nan_in_row(1)):
        with pytest.raises(NonFiniteError, match=r"layer 2 are not finite \(NaN or inf\) in rows \[1\]"):
            capture_activations_at(tiny_model, IDS, [[6], [6]], 2, 0)
    acts_BKD = capture_activations_at(tiny_model, IDS, [[6], [6]], 2, 0)  # the hook is gone: finite again
    assert torch.isfinite(acts_BKD).all()


def test_an_overflowing_injection_stops_the_forward(tiny_model):
    vectors_BKD = torch.ones(2, 1, tiny_model.config.hidden_size)
    positions_BK = torch.tensor([[3], [3]])
    with injecting(tiny_model, 1, vectors_BKD, positions_BK, 1e39), torch.inference_mode():
        with pytest.raises(NonFiniteError) as info:
            tiny_model(input_ids=torch.tensor(IDS))
    assert isinstance(info.value, AOResamplingError)  # the CLI's one error line, exit 2
    assert not decoder_layers(tiny_model)[1]._forward_hooks  # removed although the forward raised
