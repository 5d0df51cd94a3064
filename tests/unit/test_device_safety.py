"""Code that must work when ``device_map="auto"`` spreads one model over several GPUs, checked on a CPU-only box.

Under a device map each decoder layer (and its KV cache) may live on its own GPU. CUDA refuses an index tensor on
another GPU, but the CPU build has only one real device, so the second "GPU" here is ``meta`` and ``OneDevicePerOp``
plays CUDA's part: any torch call that mixes tensors of two devices fails (0-dim CPU scalars excepted, as on CUDA).
"""

from __future__ import annotations


import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ao_resampling.engine.hooks import inject
from ao_resampling.engine.loading.models import model_device
from ao_resampling.engine.decoding.decode_step import PromptCache, SlotCache, SlotStep, device_groups

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


LAYERS = 4
DEVICES = [CPU if i % 2 == 0 else OTHER for i in range(LAYERS)]  # even layers on the CPU, odd on the other device


def slot_step(rows: int, prompt_len: int = 5) -> SlotStep:
    return SlotStep(None, rows, prompt_len, max_new_tokens=3, sliding_window=None, device=CPU, graphs=False,
                    devices=DEVICES)


def prompt_pass(step: SlotStep, batch: int, length: int = 5) -> None:
    """What a prompt pass's attention layers write through ``PromptCache``: prompt q holds the value q everywhere
    (so a selection can be read off the CPU layers), each layer's KV on its layer's device."""
    cache = PromptCache(step)
    for i, device in enumerate(DEVICES):
        kv = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 1, length, 32).to(device)
        keys, _ = cache.update(kv.clone(), kv.clone(), i)
        assert keys.device == device


def test_layers_on_one_device_share_one_buffer_per_run():
    assert device_groups([CPU, CPU, OTHER, OTHER, CPU]) == [range(0, 2), range(2, 4), range(4, 5)]
    assert device_groups([CPU] * 3) == [range(0, 3)]


def test_seating_copies_each_prompts_kv_on_each_layers_device():
    step = slot_step(rows=4)
    with OneDevicePerOp():
        prompt_pass(step, batch=2)
        step.seat(torch.tensor([0, 1, 3]), torch.tensor([1, 1, 0]), torch.ones(2, 5, dtype=torch.bool))

    for i, (keys, values) in enumerate(step.kv):
        assert keys.device == DEVICES[i] and keys.shape == (4, 1, 8, 32)
    assert step.kv[0][0][:, 0, 0, 0].tolist() == [1.0, 1.0, 0.0, 0.0], "rows 0, 1: prompt 1; row 3: prompt 0"
    assert step.write_B[[0, 1, 3]].tolist() == [5, 5, 5] and step.rope_B1[[0, 1, 3], 0].tolist() == [5, 5, 5]


def test_the_slot_cache_writes_each_row_at_its_own_position_on_each_layers_device():
    step = slot_step(rows=2)
    prompt_pass(step, batch=2)
    step.seat(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.ones(2, 5, dtype=torch.bool))
    step.write_B[:] = torch.tensor([5, 7])  # row 1 is two tokens further into its answer
    new_kv = torch.full((2, 1, 1, 32), 9.0)

    with OneDevicePerOp():
        for i in (0, 1):
            keys, _ = step.cache.update(new_kv.to(DEVICES[i]), new_kv.to(DEVICES[i]), i)
    written = step.kv[0][0][:, 0, :, 0]
    assert written[0].tolist() == [0.0] * 5 + [9.0, 0.0, 0.0] and written[1].tolist() == [1.0] * 5 + [0.0, 0.0, 9.0]
    assert isinstance(step.cache, SlotCache)


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


def test_a_slot_step_moves_rows_in_place_on_each_layers_device():
    """Under device_map="auto": the tail's compaction gathers each layer's rows on that layer's device, into the
    same buffers (the addresses a CUDA graph reads)."""
    step = slot_step(rows=4)
    prompt_pass(step, batch=4)
    step.seat(torch.arange(4), torch.arange(4), torch.ones(4, 5, dtype=torch.bool))
    addresses = [(k.data_ptr(), v.data_ptr()) for k, v in step.kv]

    with OneDevicePerOp():
        step.select(torch.tensor([1, 3]))

    assert step.rows == 2
    assert [(k.data_ptr(), v.data_ptr()) for k, v in step.kv] == addresses
    for i, (keys, _) in enumerate(step.kv):
        assert keys.device == DEVICES[i]
    assert step.kv[0][0][:2, 0, 0, 0].tolist() == [1.0, 3.0]
