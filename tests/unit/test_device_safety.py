"""Code that must work when ``device_map="auto"`` spreads one model over several GPUs, checked on a CPU-only box.

Under a device map each decoder layer (and its KV cache) may live on its own GPU. CUDA refuses an index tensor on
another GPU, but the CPU build has only one real device, so the second "GPU" here is ``meta`` and ``OneDevicePerOp``
plays CUDA's part: any torch call that mixes tensors of two devices fails (0-dim CPU scalars excepted, as on CUDA).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ao_resampling.engine.hooks import inject
from ao_resampling.engine.loading.models import model_device, synthetic_config
from ao_resampling.engine.decoding.decode_step import select_rows
from ao_resampling.engine.decoding.sampler import BatchedSampler, DecodeParams

CPU, OTHER = torch.device("cpu"), torch.device("meta")


class OneDevicePerOp(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        devices = {t.device for t in tensors if not (t.ndim == 0 and t.device.type == "cpu")}
        if len(devices) > 1:
            raise AssertionError(f"{getattr(func, '__name__', func)} mixes devices {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def test_the_checker_catches_a_cross_device_index():
    keys = torch.zeros(3, 2, device=OTHER)
    with OneDevicePerOp(), pytest.raises(AssertionError, match="mixes devices"):
        keys.index_select(0, torch.tensor([0, 2]))


def split_cache(batch: int, length: int = 5):
    """A prefilled DynamicCache of the tiny config, even layers on the CPU, odd layers on the other device."""
    from transformers import DynamicCache

    config = synthetic_config("tiny")
    cache = DynamicCache(config=config)
    for i in range(config.num_hidden_layers):
        device = CPU if i % 2 == 0 else OTHER
        # row b holds the value b everywhere, so a selection can be read off the CPU layers
        kv = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 1, length, 32).to(device)
        cache.update(kv.clone(), kv.clone(), i)
    return config, cache


def test_select_rows_indexes_each_layer_on_its_own_device():
    _, cache = split_cache(batch=4)

    with OneDevicePerOp():
        cache = select_rows(cache, torch.tensor([1, 3]))

    for i, layer in enumerate(cache.layers):
        assert layer.keys.device == (CPU if i % 2 == 0 else OTHER) and layer.keys.shape[0] == 2
    assert cache.layers[0].keys[:, 0, 0, 0].tolist() == [1.0, 3.0]


@pytest.mark.parametrize("static_cache", [pytest.param(True, id="static_cache"),
                                          pytest.param(False, id="dynamic_cache")])
def test_expand_repeats_prompt_rows_on_each_layers_device(static_cache):
    config, cache = split_cache(batch=2)
    tokenizer = SimpleNamespace(eos_token_id=1, unk_token_id=3, pad_token_id=0,
                                convert_tokens_to_ids=lambda token: 106)
    sampler = BatchedSampler(SimpleNamespace(config=config), tokenizer, injection_layer=1, coefficient=1.0,
                             params=DecodeParams(temperature=0, top_p=0.9, max_new_tokens=3),
                             static_cache=static_cache)

    with OneDevicePerOp():
        expanded, static = sampler._expand(cache, torch.tensor([3, 1]), total_len=8)  # q0: 3 samples, q1: 1

    assert static == static_cache
    for i, layer in enumerate(expanded.layers):
        assert layer.keys.device == (CPU if i % 2 == 0 else OTHER) and layer.keys.shape[0] == 4
    assert expanded.layers[0].keys[:, 0, 0, 0].tolist() == [0.0, 0.0, 0.0, 1.0]


def test_inject_works_on_the_residuals_device():
    resid_BLD = torch.zeros(2, 6, 8, device=OTHER)

    with OneDevicePerOp():
        out_BLD = inject(resid_BLD, torch.ones(2, 1, 8), torch.tensor([[1], [4]]), coefficient=1.0)

    assert out_BLD.device == OTHER and out_BLD.shape == resid_BLD.shape


def test_inputs_go_to_the_embeddings_device():
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(2, 2, device=CPU)  # registered first: next(parameters()) would say CPU
            self.embed = nn.Embedding(10, 2, device=OTHER)

        def get_input_embeddings(self):
            return self.embed

    assert model_device(Split()) == OTHER


def test_cuda_graphs_only_for_a_model_on_one_device():
    from ao_resampling.engine.decoding.decode_step import on_one_device

    one = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    assert on_one_device(one)
    one[1].to("meta")  # as a device_map="auto" model has its layers on several GPUs
    assert not on_one_device(one)


def test_a_static_step_drops_rows_in_place_on_each_layers_device():
    """Under device_map="auto": the in-place drop gathers each layer's rows on that layer's device."""
    from transformers import StaticCache

    from ao_resampling.engine.decoding.decode_step import StaticDecodeStep

    config = synthetic_config("tiny")
    static = StaticCache(config=config, max_cache_len=6)
    for i in range(config.num_hidden_layers):
        kv = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 5, 32)  # row b holds b
        kv = kv.to(CPU if i % 2 == 0 else OTHER)
        static.update(kv.clone(), kv.clone(), i, cache_kwargs={"cache_position": torch.arange(5)})
    step = StaticDecodeStep(None, static, torch.ones(4, 5, dtype=torch.bool), total_len=6, graphs=False)

    with OneDevicePerOp():
        step.select(torch.tensor([1, 3]))

    assert step.rows == 2 and step.mask_AS.shape == (2, 6)
    for i, layer in enumerate(static.layers):
        assert layer.keys.device == (CPU if i % 2 == 0 else OTHER) and layer.keys.shape[0] == 2
        assert layer.keys.data_ptr() == step.full_kv[i][0].data_ptr(), "a view of the same buffer"
    assert static.layers[0].keys[:, 0, 0, 0].tolist() == [1.0, 3.0]
