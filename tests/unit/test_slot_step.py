"""The slot step's KV layout: the layers on one device share one buffer, so seating rows costs a few operations a
device, not a few a layer (~250 small kernels a refill at 27B with one buffer a layer), and a seat copies the prompt
buffer's KV straight into the rows, a run of rows sharing a prompt at a time, with no gathered temporary (the first
fill seats every row: one gather of them all was 2.7 GB at 27B on an 80 GB card)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ao_resampling.engine.decoding.decode_step import PromptCache, SlotStep, seat_runs

CPU = torch.device("cpu")
PROMPTS, P, H, D = 3, 5, 2, 8


class CountOps(TorchDispatchMode):
    """Each operation's name, and the most elements of any new tensor one made (not a view of its inputs)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.largest_new = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest_new = max(self.largest_new, t.numel())
        return out


def seated_step(layers: int, rows: int = 8) -> SlotStep:
    step = SlotStep(None, rows, P, max_new_tokens=4, sliding_window=None, device=CPU, graphs=False,
                    devices=[CPU] * layers)
    cache = PromptCache(step)
    for i in range(layers):  # prompt q of layer i holds 100 * i + q
        kv = (100.0 * i + torch.arange(PROMPTS, dtype=torch.float32)).view(PROMPTS, 1, 1, 1).expand(PROMPTS, H, P, D)
        cache.update(kv.clone(), -kv.clone(), i)
    step.seat(torch.tensor([0]), torch.tensor([0]), torch.ones(PROMPTS, P, dtype=torch.bool))  # allocates the slots
    return step


def seat_ops(layers: int, rows: list[int], prompts: list[int]) -> CountOps:
    step = seated_step(layers)
    with CountOps() as ops:
        step.seat(torch.tensor(rows), torch.tensor(prompts), torch.ones(PROMPTS, P, dtype=torch.bool))
    return ops


def test_seating_runs_the_same_operations_for_2_layers_or_62():
    assert seat_ops(2, [5, 1, 2], [2, 2, 1]).ops == seat_ops(62, [5, 1, 2], [2, 2, 1]).ops


def test_a_seat_copies_straight_into_the_rows_without_a_kv_sized_temporary():
    layers = 4
    ops = seat_ops(layers, list(range(8)), [0, 1, 2, 0, 1, 2, 0, 1])  # 8 rows from a buffer of 3 prompts
    assert ops.largest_new < H * P * D, "no new tensor as large as one layer of one prompt's KV"
    assert ops.ops.count("aten.copy_.default") == 2 * 8, "a copy a row (no two neighbours share a prompt)"


def test_consecutive_rows_seating_one_prompt_are_one_copy():
    ops = seat_ops(62, [3, 4, 5, 0, 1, 7], [1, 1, 1, 2, 2, 2])
    assert ops.ops.count("aten.copy_.default") == 2 * 3, "runs (3-5, prompt 1), (0-1, 2), (7, 2): keys and values"


@pytest.mark.parametrize(("rows", "prompts", "runs"), [
    ([], [], []),
    ([4], [0], [(4, 1, 0)]),
    ([0, 1, 2, 3], [0, 0, 1, 1], [(0, 2, 0), (2, 2, 1)]),
    ([2, 3, 5, 6], [0, 0, 0, 0], [(2, 2, 0), (5, 2, 0)]),  # a gap in the rows ends a run
    ([3, 2], [0, 0], [(3, 1, 0), (2, 1, 0)]),  # rows in falling order are not consecutive
])
def test_seat_runs(rows, prompts, runs):
    assert seat_runs(rows, prompts) == runs


def test_each_layers_slot_is_a_view_of_one_buffer_and_gets_its_own_prompts_kv():
    step = seated_step(layers=3)
    rows, prompts = [7, 1, 2, 6, 4], [2, 2, 1, 0, 1]  # more rows than the buffer's prompts; rows 1-2 one run
    step.seat(torch.tensor(rows), torch.tensor(prompts), torch.ones(PROMPTS, P, dtype=torch.bool))
    step.select(torch.tensor([2, 7, 6]))  # to the front: prompts 1, 2, 0

    assert len({keys.untyped_storage().data_ptr() for keys, _ in step.kv}) == 1
    for i, (keys_BHSD, values_BHSD) in enumerate(step.kv):
        assert keys_BHSD.shape == (8, H, P + 4, D) and keys_BHSD.is_contiguous()
        assert keys_BHSD[:3, :, :P].flatten(1).unique(dim=1).flatten().tolist() == [100 * i + q for q in (1, 2, 0)]
        assert torch.equal(values_BHSD[:3, :, :P], -keys_BHSD[:3, :, :P])
        assert keys_BHSD[:3, :, P:].abs().sum() == 0, "the answer's positions are empty"
    assert step.rows == 3
