"""How the sampler groups queries into batches, and seeds each batch: pure decisions, no tensors.

``plan_batches`` packs queries (each answered n times, one row per answer) under a row budget and a KV-token budget;
``batch_seed`` makes a batch's draws reproducible on a re-run. ``BatchedSampler`` (sampler.py) and the reference
paths (reference.py) share them, so a batch draws the same samples whichever path runs it.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Protocol


class Batchable(Protocol):
    """What batch planning reads of a query (sampling.Query has these)."""

    key: str
    input_ids: tuple[int, ...]
    n: int


def plan_batches(queries: Sequence[Batchable], *, max_new_tokens: int, max_rows: int, max_tokens: int,
                 pad_to: int | None = None) -> list[list[int]]:
    """Group query indices into batches: rows (sum of n) <= max_rows, rows x padded length <= max_tokens.

    Queries are taken longest prompt first, so a batch's members have similar lengths and little padding. The rows
    are spread evenly: as few batches as filling each to max_rows gives, but of similar size, rather than full ones
    and a small last one that would run all its decode steps at a fraction of the GPU. ``pad_to``: every batch is
    padded to this prompt length (the token budget counts it). A single query over budget gets a batch of its own.
    """
    order = sorted(range(len(queries)), key=lambda i: (-len(queries[i].input_ids), queries[i].key))

    def pack(row_limit: int) -> list[list[int]]:
        batches: list[list[int]] = []
        current: list[int] = []
        rows, longest = 0, pad_to or 0
        for i in order:
            q = queries[i]
            new_rows, new_longest = rows + q.n, max(longest, len(q.input_ids))
            if current and (new_rows > row_limit or new_rows * (new_longest + max_new_tokens) > max_tokens):
                batches.append(current)
                current, new_rows, new_longest = [], q.n, max(pad_to or 0, len(q.input_ids))
            current.append(i)
            rows, longest = new_rows, new_longest
        return batches + [current] if current else batches

    full = pack(max_rows)
    if len(full) < 2:
        return full
    # The smallest row limit that still needs no more batches (bisection; the count only grows as the limit falls).
    lo, hi = min(-(-sum(q.n for q in queries) // len(full)), max_rows), max_rows
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(pack(mid)) <= len(full) else (mid + 1, hi)
    balanced = pack(lo)
    return balanced if len(balanced) <= len(full) else full


def batch_seed(seed: int, keys: Sequence[str]) -> int:
    """The same batch of queries draws the same samples on a re-run; any other batch draws independently."""
    return zlib.crc32(f"{seed}|{'|'.join(keys)}".encode())
