"""cached_norm_scales on a small random Gemma 3: every norm switched, the logits unchanged, and the model gets its
own forward back (also after an exception). On random tensors alone: tests/unit/test_norms.py."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3TextConfig, Gemma3ForCausalLM
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from ao_resampling.engine.decoding.norms import cached_norm_scales


def tiny_model() -> Gemma3ForCausalLM:
    config = Gemma3TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8, layer_types=None)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


def test_every_norm_of_a_model_is_switched_and_the_logits_are_unchanged():
    model = tiny_model()
    for p in model.parameters():
        p.data.normal_(0, 0.5)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with cached_norm_scales(model) as n_switched:
            got = model(input_ids=ids).logits

    assert n_switched == 2 * 6 + 1  # four per layer, q and k norms, and the final norm
    assert torch.equal(got, expected)


def test_own_forward_comes_back_also_after_an_exception():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="boom"), cached_norm_scales(model):
        assert all("forward" in m.__dict__ for m in model.modules() if isinstance(m, Gemma3RMSNorm))
        raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, Gemma3RMSNorm))
