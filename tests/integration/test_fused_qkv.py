"""fused_qkv on the tiny random oracle: one matmul per layer for the query, key and value projections, the same
logits as the model's own three matmuls, no second copy of the weights, and the model given back.

The sampler runs inside it (sampler.Sampler._stage), so every sampler test against HF ``generate``
(test_sampler.py) decodes through it too; here, what it does to the model itself.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from ao_resampling.engine.decoding import fused_qkv as fused_module
from ao_resampling.engine.decoding.fused_qkv import PROJECTIONS, attention_layers, fused_qkv
from ao_resampling.engine.decoding.merge import merged_lora
from ao_resampling.engine.decoding.sampler import Sampler
from ao_resampling.engine.decoding.settings import model_generation_config, resolve_decoding
from ao_resampling.engine.loading.adapters import adapter_disabled, attach_oracle
from ao_resampling.engine.loading.models import load_model

IDS = torch.tensor([[2, 105, 2364, 107, 1018, 531, 7, 99], [2, 105, 2364, 107, 30, 40, 50, 60]])


@pytest.fixture
def oracle():
    """A fresh tiny oracle (the tests rearrange its weights' storage)."""
    return attach_oracle(load_model("synthetic:tiny", dtype="float32", device="cpu"), "random", seed=2)


def projection_weights(model) -> list[list[torch.Tensor]]:
    return [[getattr(layer, name).base_layer.weight for name in PROJECTIONS] for layer in attention_layers(model)]


def counted_linear(monkeypatch, model) -> list[tuple[int, ...]]:
    """The weight shape of every matmul the fused projections run, and 'own' for each call of a projection's own
    Linear (none while fused)."""
    shapes: list[tuple[int, ...]] = []
    monkeypatch.setattr(fused_module, "F", SimpleNamespace(
        linear=lambda x, w: shapes.append(tuple(w.shape)) or F.linear(x, w)))
    for layer in attention_layers(model):
        for name in PROJECTIONS:
            getattr(layer, name).base_layer.register_forward_hook(lambda *_: shapes.append("own"))
    return shapes


def test_one_matmul_per_layer_and_the_models_own_logits(oracle, monkeypatch):
    originals = [[w.detach().clone() for w in layer] for layer in projection_weights(oracle)]
    shapes = counted_linear(monkeypatch, oracle)
    with torch.no_grad(), adapter_disabled(oracle):
        expected = oracle(input_ids=IDS).logits
        assert shapes == ["own"] * 12
        shapes.clear()
        with fused_qkv(oracle) as n_layers:
            got = oracle(input_ids=IDS).logits

    assert n_layers == len(originals) == 4
    q, k, v = originals[0]
    assert shapes == [(q.shape[0] + k.shape[0] + v.shape[0], q.shape[1])] * n_layers, "one stacked matmul a layer"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # the same sums, blocked by the BLAS its way
    for layer, before in zip(projection_weights(oracle), originals):
        assert all(torch.equal(w, b) for w, b in zip(layer, before)), "the weights' values are untouched"
        assert len({w.untyped_storage().data_ptr() for w in layer}) == 1, "views of one tensor, no second copy"


def test_the_stacked_weight_is_built_once_and_the_projections_given_back(oracle):
    with adapter_disabled(oracle):
        with fused_qkv(oracle):
            first = [layer[0].data_ptr() for layer in projection_weights(oracle)]
        assert not any("forward" in getattr(layer, name).__dict__
                       for layer in attention_layers(oracle) for name in PROJECTIONS)
        with pytest.raises(RuntimeError, match="boom"), fused_qkv(oracle) as n_layers:
            assert n_layers == 4 and [layer[0].data_ptr() for layer in projection_weights(oracle)] == first
            raise RuntimeError("boom")
    assert not any("forward" in getattr(layer, name).__dict__
                   for layer in attention_layers(oracle) for name in PROJECTIONS)


def test_an_active_adapter_is_not_fused(oracle):
    """With the LoRA on and unmerged, each projection adds its own adapter product: fusing would drop it."""
    with torch.no_grad():
        expected = oracle(input_ids=IDS).logits
        with fused_qkv(oracle) as n_layers:
            got = oracle(input_ids=IDS).logits
    assert n_layers == 0 and torch.equal(got, expected)


def test_the_merged_lora_through_stacked_weights_and_the_base_back_bit_for_bit(oracle):
    """The sampler's order: merge (into the weights), fuse, decode; the merge's restore writes into the views."""
    base = [[w.detach().clone() for w in layer] for layer in projection_weights(oracle)]
    with torch.no_grad():
        with_adapter = oracle(input_ids=IDS).logits
        with merged_lora(oracle), fused_qkv(oracle) as n_layers:
            merged = oracle(input_ids=IDS).logits
    assert n_layers == 4
    torch.testing.assert_close(merged, with_adapter, rtol=1e-4, atol=1e-4)
    assert not torch.equal(merged, oracle.get_base_model()(input_ids=IDS).logits), "the adapter did something"
    for layer, before in zip(projection_weights(oracle), base):
        assert all(torch.equal(w, b) for w, b in zip(layer, before))


def test_the_sampler_decodes_through_the_stacked_projections(oracle, gemma_tokenizer, monkeypatch):
    shapes = counted_linear(monkeypatch, oracle)
    decoding = resolve_decoding(model_generation_config(oracle), temperature=0, top_p=1.0, top_k=None,
                                max_new_tokens=3, seed=0, fallback_eos=[1, 106])
    from ao_resampling.engine.decoding.sampler import Query

    Sampler(oracle, gemma_tokenizer, decoding=decoding, injection_layer=1, coefficient=1.0, rows=2).run(
        [Query(key="q", input_ids=tuple(IDS[0].tolist()), n=2)], progress=False)
    assert shapes and len(set(shapes)) == 1 and shapes[0] != "own" and shapes[0][0] == sum(
        w.shape[0] for w in projection_weights(oracle)[0])
