"""gqa_attention == Hugging Face's eager attention (which copies KV heads with repeat_kv), on random tensors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

from ao_resampling.engine.decoding.attention import NAME, decode_attention, gqa_attention


def random_inputs(seed: int, B: int, H: int, K: int, Q: int, S: int, D: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    query_BHQD = torch.randn(B, H, Q, D, generator=g).to(dtype)
    key_BKSD = torch.randn(B, K, S, D, generator=g).to(dtype)
    value_BKSD = torch.randn(B, K, S, D, generator=g).to(dtype)
    return query_BHQD, key_BKSD, value_BKSD


def left_padded_causal_mask(B: int, Q: int, S: int, seed: int) -> torch.Tensor:
    """(B, 1, Q, S) boolean: causal over the last Q positions, each row with its own left padding."""
    pads = torch.randint(0, max(1, S - Q), (B,), generator=torch.Generator().manual_seed(seed))
    cols_S = torch.arange(S)
    rows_Q = torch.arange(S - Q, S)
    causal_QS = cols_S[None, :] <= rows_Q[:, None]
    return (causal_QS[None] & (cols_S[None, None, :] >= pads[:, None, None]))[:, None]


def additive(mask_bool: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask_bool.shape, dtype=dtype).masked_fill(~mask_bool, torch.finfo(dtype).min)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 4), K=st.sampled_from([1, 2, 4]),
       groups=st.sampled_from([1, 2, 4]), Q=st.integers(1, 5), filled=st.integers(0, 6), D=st.sampled_from([4, 16]),
       boolean=st.booleans())
def test_equals_eager_attention(seed, B, K, groups, Q, filled, D, boolean):
    H, S = K * groups, Q + filled
    query_BHQD, key_BKSD, value_BKSD = random_inputs(seed, B, H, K, Q, S, D)
    mask = left_padded_causal_mask(B, Q, S, seed)
    module = SimpleNamespace(num_key_value_groups=groups, head_dim=D, training=False)

    ours_BQHD, _ = gqa_attention(module, query_BHQD, key_BKSD, value_BKSD,
                                 mask if boolean else additive(mask, torch.float32), scaling=0.3)
    eager_BQHD, _ = eager_attention_forward(module, query_BHQD, key_BKSD, value_BKSD,
                                            additive(mask, torch.float32), scaling=0.3)

    assert ours_BQHD.shape == (B, Q, H, D)
    torch.testing.assert_close(ours_BQHD, eager_BQHD, rtol=1e-5, atol=1e-6)


def test_a_shorter_mask_reads_only_the_filled_part_of_a_static_cache():
    """Decode on a static cache: 7 of 10 positions filled, the rest garbage that must not leak in."""
    query_BHQD, key_BKSD, value_BKSD = random_inputs(0, B=3, H=4, K=2, Q=1, S=10, D=8)
    mask_B11S = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask_B11S[0, ..., :2] = False  # row 0 is left-padded by 2
    garbage_KSD = key_BKSD.clone()
    garbage_KSD[:, :, 7:] = 1e4
    module = SimpleNamespace(num_key_value_groups=2, head_dim=8, training=False)

    ours, _ = gqa_attention(module, query_BHQD, garbage_KSD, value_BKSD, mask_B11S, scaling=0.5)
    eager, _ = eager_attention_forward(module, query_BHQD, key_BKSD[:, :, :7], value_BKSD[:, :, :7],
                                       additive(mask_B11S, torch.float32), scaling=0.5)

    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)


def test_bf16_matches_eager_to_bf16_precision():
    query_BHQD, key_BKSD, value_BKSD = random_inputs(1, B=2, H=8, K=4, Q=1, S=33, D=32, dtype=torch.bfloat16)
    mask = left_padded_causal_mask(2, 1, 33, seed=1)
    module = SimpleNamespace(num_key_value_groups=2, head_dim=32, training=False)

    ours, _ = gqa_attention(module, query_BHQD, key_BKSD, value_BKSD, mask, scaling=32**-0.5)
    eager, _ = eager_attention_forward(module, query_BHQD, key_BKSD, value_BKSD, additive(mask, torch.bfloat16),
                                       scaling=32**-0.5)

    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, eager, rtol=1.6e-2, atol=1e-2)


def test_softcap_matches_eager():
    query_BHQD, key_BKSD, value_BKSD = random_inputs(2, B=2, H=4, K=2, Q=3, S=5, D=8)
    module = SimpleNamespace(num_key_value_groups=2, head_dim=8, training=False)

    ours, _ = gqa_attention(module, query_BHQD * 10, key_BKSD, value_BKSD, None, scaling=1.0, softcap=5.0)
    eager, _ = eager_attention_forward(module, query_BHQD * 10, key_BKSD, value_BKSD, None, scaling=1.0, softcap=5.0)

    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)


def test_dropout_is_refused():
    query_BHQD, key_BKSD, value_BKSD = random_inputs(0, B=1, H=2, K=1, Q=1, S=2, D=4)
    with pytest.raises(ValueError, match="dropout"):
        gqa_attention(SimpleNamespace(), query_BHQD, key_BKSD, value_BKSD, None, dropout=0.1)


class Attn(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config, self.num_key_value_groups = config, 2


def test_decode_attention_switches_and_always_restores():
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(num_hidden_layers=1, attn_implementation="sdpa")
    model = torch.nn.Sequential(Attn(config), Attn(config))

    with decode_attention(model):
        assert config._attn_implementation == NAME
    assert config._attn_implementation == "sdpa"

    with pytest.raises(RuntimeError, match="boom"), decode_attention(model):
        raise RuntimeError("boom")
    assert config._attn_implementation == "sdpa"
