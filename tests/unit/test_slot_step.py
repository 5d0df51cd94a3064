"""The slot step's KV layout: the layers on one device share one buffer, so seating rows and moving them costs a
few operations a device, not a few a layer (a 27B refill launched ~250 small kernels, ~4.6 ms of host time a refill
on an H100, with one buffer a layer)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ao_resampling.engine.decoding.decode_step import PromptCache, SlotStep

CPU = torch.device("cpu")


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def seated_step(layers: int, rows: int = 6, prompts: int = 3, P: int = 5) -> SlotStep:
    step = SlotStep(None, rows, P, max_new_tokens=4, sliding_window=None, device=CPU, graphs=False,
                    devices=[CPU] * layers)
    cache = PromptCache(step)
    for i in range(layers):  # prompt q of layer i holds 100 * i + q
        kv = (100.0 * i + torch.arange(prompts, dtype=torch.float32)).view(prompts, 1, 1, 1).expand(prompts, 2, P, 8)
        cache.update(kv.clone(), -kv.clone(), i)
    return step


def seat_and_select_ops(layers: int) -> tuple[list[str], list[str]]:
    step = seated_step(layers)
    step.seat(torch.tensor([0]), torch.tensor([0]), torch.ones(3, 5, dtype=torch.bool))  # the slots' allocation
    with CountOps() as seat:
        step.seat(torch.tensor([5, 1, 2]), torch.tensor([2, 2, 1]), torch.ones(3, 5, dtype=torch.bool))
    with CountOps() as select:
        step.select(torch.tensor([2, 5]))
    return seat.ops, select.ops


def test_seating_and_moving_rows_cost_the_same_operations_for_2_layers_or_62():
    assert seat_and_select_ops(2) == seat_and_select_ops(62)


def test_each_layers_slot_is_a_view_of_one_buffer_and_gets_its_own_prompts_kv():
    step = seated_step(layers=3)
    step.seat(torch.tensor([5, 1, 2]), torch.tensor([2, 2, 1]), torch.ones(3, 5, dtype=torch.bool))
    step.select(torch.tensor([2, 5]))  # rows 2 (prompt 1) and 5 (prompt 2) to the front

    storages = {keys.untyped_storage().data_ptr() for keys, _ in step.kv}
    assert len(storages) == 1
    for i, (keys_BHSD, values_BHSD) in enumerate(step.kv):
        assert keys_BHSD.shape == (6, 2, 9, 8) and keys_BHSD.is_contiguous()
        assert keys_BHSD[:2, :, :5].flatten(1).unique(dim=1).flatten().tolist() == [100 * i + 1, 100 * i + 2]
        assert torch.equal(values_BHSD[:2, :, :5], -keys_BHSD[:2, :, :5])
        assert keys_BHSD[:2, :, 5:].abs().sum() == 0, "the answer's positions are empty"
