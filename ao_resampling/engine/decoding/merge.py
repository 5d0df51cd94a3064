"""The LoRA folded into the base weights while a stage decodes, layer by layer, and the base weights put back.

Decoding with the adapter unmerged runs two extra small matmuls per adapted module per step; merged, the step is the
base model's. PEFT's ``merge_adapter`` makes each module's whole delta ``B @ A * scaling`` at once (for a 27B MLP
projection a 231 MB temporary, on a card already full of weights and KV cache: the merge OOMed inside PEFT at the
experiment's defaults on an 80 GB card). ``merged_lora`` adds the delta a block of output rows at a time
(``MERGE_CHUNK_BYTES`` of temporaries at most), in the adapter's dtype as PEFT does, then casts and adds it.

Unmerging would subtract the delta again, which in bf16 does not give the original weights back (off by up to an
ulp); whatever runs next (a capture, the baseline) must see the base model. So the originals are copied to host
memory first and copied back afterwards, bit for bit (one page-locked buffer: ``page_locked_host``). While merged,
PEFT's adapter layers are switched off, so the forward is the merged base layer alone.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from ao_resampling.engine.loading.adapters import check_base_weights, mark_base_weights_gone

MERGE_CHUNK_BYTES = 64 << 20  # temporaries of the merge: at most this many bytes of delta at a time


def lora_modules(model: nn.Module) -> list[nn.Module]:
    """PEFT LoRA layers wrapping a Linear base layer (what the merge folds)."""
    return [m for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")
            and isinstance(m.base_layer, nn.Linear)]


def _delta_rows(module: nn.Module, adapter: str, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of the module's ``B @ A * scaling``, computed as PEFT's ``get_delta_weight`` does (in
    the adapter's dtype; float32 on a CPU for half-precision adapters)."""
    if getattr(module, "fan_in_fan_out", False):
        raise NotImplementedError("fan_in_fan_out LoRA layers are not merged here")
    a = module.lora_A[adapter].weight
    b = module.lora_B[adapter].weight[start:stop]
    if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    return (b @ a) * module.scaling[adapter]


def merge_module(module: nn.Module) -> None:
    """W += B @ A * scaling for every active adapter of one module, a block of output rows at a time."""
    weight = module.base_layer.weight
    adapters = [a for a in module.active_adapters if a in module.lora_A]
    for adapter in adapters:
        if getattr(module, "use_dora", {}).get(adapter, False):
            raise NotImplementedError(f"DoRA adapter {adapter!r}: merge it with PEFT")
        in_features = module.lora_A[adapter].weight.shape[1]
        rows = max(1, MERGE_CHUNK_BYTES // (in_features * 4))
        with torch.no_grad():
            for start in range(0, weight.shape[0], rows):
                stop = min(start + rows, weight.shape[0])
                weight[start:stop] += _delta_rows(module, adapter, start, stop).to(weight.dtype)


@contextlib.contextmanager
def merged_lora(model: nn.Module, *, restore: bool = True) -> Iterator[None]:
    """Inside: the LoRA folded into the weights, PEFT's adapter layers off. After: the base weights, bit for bit.

    ``restore=False``, for a stage that is the model's last use in the process: no snapshot (~51 GB copied to host
    memory and back at 27B, and the first stage's page-locking of that buffer: seconds each), the merge kept, the
    adapter layers left off, and the model marked so any later use of it as the base model is refused
    (adapters.check_base_weights)."""
    check_base_weights(model)
    modules = lora_modules(model)
    if not modules or not hasattr(model, "disable_adapter"):
        yield
        return
    if not restore:
        mark_base_weights_gone(model)  # first: a merge cut short leaves no usable base either
        for module in modules:
            merge_module(module)
        model.base_model.disable_adapter_layers()  # the forward is the merged base layer alone, from now on
        yield
        return
    originals = weights_snapshot([m.base_layer.weight for m in modules])
    try:
        for module in modules:
            merge_module(module)
        with model.disable_adapter():
            yield
    finally:
        restore_weights(originals)


def weights_snapshot(params: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, copy on the host) for each parameter.

    The copies of a GPU model go, with asynchronous copies, into one page-locked host buffer (``page_locked_host``):
    27B, ~51 GB each way at PCIe speed, seconds. Locking the pages is what costs: one ``pin_memory=True`` tensor per
    weight took 38.9 s a stage on the H200 (torch's pinned allocator rounds each up to a power of two, ~60 GB, and
    faults the pages in on one thread); pageable copies ~40 s. The buffer is kept for the next stage of the process.
    """
    cuda = any(param.is_cuda for param in params)
    offsets, total = [], 0
    for param in params:
        offsets.append(total)
        total += -(-param.numel() * param.element_size() // 64) * 64  # 64-byte aligned slots
    buffer = page_locked_host(total) if cuda else torch.empty(total, dtype=torch.uint8)
    pairs = []
    for param, offset in zip(params, offsets):
        nbytes = param.numel() * param.element_size()
        host = buffer[offset:offset + nbytes].view(param.dtype).view(param.shape)
        pairs.append((param, host.copy_(param.detach(), non_blocking=param.is_cuda)))
    _wait_for_copies(params)
    return pairs


_HOST_BUFFER: list[torch.Tensor] = []  # the last page-locked buffer, reused while it is large enough


def page_locked_host(nbytes: int) -> torch.Tensor:
    """``nbytes`` of page-locked host memory (uint8), reused from one call to the next.

    Ordinary memory whose pages every core faults in at once (``zero_`` runs on all threads), then registered with
    CUDA in one call: half the time of ``pin_memory=True`` on the H200 (4 GiB: 1.04 s against 1.94 s), and exactly
    the size asked for. Falls back to torch's pinned allocator if the registration is refused. One holder at a time:
    the next call hands out the same memory (a stage's snapshot is restored before the next stage takes its own).
    """
    if _HOST_BUFFER and _HOST_BUFFER[0].numel() >= nbytes:
        return _HOST_BUFFER[0]
    _HOST_BUFFER.clear()  # the smaller one is freed (and unregistered) first
    host = torch.empty(nbytes, dtype=torch.uint8)
    host.zero_()
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(host.data_ptr(), nbytes, 0)) != 0:
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    else:
        weakref.finalize(host, cudart.cudaHostUnregister, host.data_ptr())
    _HOST_BUFFER.append(host)
    return host


def restore_weights(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write the snapshot back, bit for bit."""
    with torch.no_grad():
        for param, host in pairs:
            param.copy_(host, non_blocking=param.is_cuda)
    _wait_for_copies([param for param, _ in pairs])


def _wait_for_copies(params: list[torch.Tensor]) -> None:
    for device in {p.device for p in params if p.is_cuda}:
        torch.cuda.synchronize(device)
