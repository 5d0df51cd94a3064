"""How many rows the decode step can hold on this card: the KV slots and the step's own working memory, sized from
the text config, against the memory left once the weights are loaded and the LoRA merged.

A row is one sample from its prompt to its last token: a KV slot of (prompt region + max_new_tokens) positions in
every layer, ``kv_bytes_per_position`` each (Gemma 3 27B: 62 layers x 16 KV heads x 128 x 2 (K, V) x 2 bytes,
~0.5 MB), plus what one decode step allocates per row (hidden states, the MLP's intermediate, the logits and the
sampler's float32 copies of them). Besides the rows, a prefill of the prompts a refill admits and a fixed reserve
(the CUDA context's and the allocator's slack) are set aside, and only ``1 - SAFETY`` of what is left is used.

``rows_that_fit`` is pure arithmetic on those numbers (testable without a GPU); ``free_bytes`` asks the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ao_resampling.engine.loading.models import head_dim

SAFETY = 0.10  # share of the free memory left unused: fragmentation, the allocator's rounding, graph pools
RESERVE_BYTES = 2 << 30  # CUDA context, cuBLAS workspaces, the sampling's scratch
CPU_ROWS = 64  # on a CPU, memory is not what limits the rows: a batch as large as the CPU tests and demo need
STEP_HIDDEN_COPIES = 12  # hidden-size activations alive at once in a decoder layer (residual, norms, q/k/v, o, ...)
STEP_LOGIT_BYTES = 14  # per vocabulary entry and row: bf16 logits + float32 scaled copy + top-k/probability scratch


class BatchTooLarge(ValueError):
    """An explicit row count that cannot fit on the card (the caller turns it into the tool's error)."""


@dataclass(frozen=True)
class RowBudget:
    """What a row and a refill cost, in bytes."""

    kv_per_position: int  # every layer's key and value for one position of one row
    step_per_row: int  # a decode step's working memory per row
    prefill_per_token: int  # a prefill's KV and activations per prompt token

    def per_row(self, positions: int) -> int:
        return self.kv_per_position * positions + self.step_per_row


def row_budget(text_config, dtype: torch.dtype) -> RowBudget:
    """The per-row costs of a decoder with this text config, in ``dtype``."""
    size = torch.tensor([], dtype=dtype).element_size()
    kv = text_config.num_hidden_layers * text_config.num_key_value_heads * head_dim(text_config) * 2 * size
    hidden, intermediate = text_config.hidden_size, text_config.intermediate_size
    activations = (STEP_HIDDEN_COPIES * hidden + 3 * intermediate) * size
    step = activations + text_config.vocab_size * STEP_LOGIT_BYTES
    return RowBudget(kv_per_position=kv, step_per_row=step, prefill_per_token=kv + activations)


def rows_that_fit(free_bytes: int, budget: RowBudget, *, prompt_len: int, max_new_tokens: int,
                  prefill_tokens: int) -> int:
    """The most rows whose KV slots and step fit in ``free_bytes`` with the safety margin, beside a refill's
    prefill of ``prefill_tokens`` prompt tokens and the fixed reserve. 0 if not even one fits."""
    usable = free_bytes * (1 - SAFETY) - RESERVE_BYTES - budget.prefill_per_token * prefill_tokens
    return max(0, int(usable // budget.per_row(prompt_len + max_new_tokens)))


def free_bytes(device: torch.device) -> int | None:
    """Memory the allocator can still get on ``device`` (its free memory + what torch holds unused); None on a
    CPU.

    Torch's unused cached blocks go back to the device first (``empty_cache``): blocks freed before the stage (the
    weights q/k/v were stacked from, a previous stage's KV slots) would be split by the stage's first small
    allocations, and then neither a slot buffer (one tensor of ~10 GiB a device at 27B) nor a CUDA graph's private
    pool, which cannot draw on torch's general cache, could use them: on an H100 a capture ran out of memory with
    10 GiB held unused that way."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
