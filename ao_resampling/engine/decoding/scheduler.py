"""Which sample sits in which row of the decode step: continuous batching as pure bookkeeping, no tensors.

The step decodes a fixed number of rows (its CUDA graphs are captured for that many). A row holds one sample (one
answer of one query) from its prompt to its stop token; when it finishes, its row is free, and once enough rows are
free (``refill_at``) the next pending samples take them: their queries' prompts are prefilled and they decode beside
the rows already running. So the step stays full until the queue drains, instead of lasting as long as the longest
answer of a fixed batch. Then, once at most a quarter of the rows are live, the step shrinks onto a rung of a fixed
ladder (``rung``), so a stage captures a graph per rung once and the tail does not decode a full step for a few rows;
with CUDA graphs, not below ``GRAPH_MIN_ROWS`` (there a smaller step costs the same and a new rung a capture).

A query's samples may be split over two refills (a row count smaller than a query's n, or the last free rows):
each refill prefills the prompts of the queries it admits, and a sample's answer does not depend on which rows, which
refill or which neighbours it had (its random numbers are its own: streams.py).

``SlotScheduler`` is driven by the sampler (sampler.py): ``admit`` when rows are free, ``finish`` with the rows whose
samples ended, ``compact`` when the tail moves the live rows to the front.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# Refill once 1/8 of the rows are free. Idle rows cost steps; a refill costs its seating (the KV copies into the
# rows: 4.3 ms at 27B on an H100 in session 15, 0.5 ms since the seat is one Triton launch) and the first tokens'
# draw (~2 ms); the prompt passes are per block of queries, not per refill. At the real oracle's answer lengths ~13
# of 273 rows end every step. Replayed on the scheduler (bench/refill_sim.py, 10,000 samples, 273 rows): 1/4 888
# steps and 133 refills, 1/8 835 and 243, 1/16 811 and 407, every row at once 796 and 752. With 37.1 ms a step and
# ~6 ms a refill 1/8 and 1/12 were the cheapest (~1.3 s under 1/4); with ~2.5 ms a refill the model puts 1/12 and
# 1/16 ~0.45 s under 1/8, unmeasured (the H100 profiles of 20 targets: 1/8 took 181 steps to 1/4's 190, session 13;
# 1/8 8.99 s, 1/16 8.87 s with the old seat, session 15, within one run's noise).
REFILL_FRACTION = 8
# The tail shrinks the step only once at most a quarter of its rows are live: a 27B step is mostly the weights'
# read, so fewer rows save little per step, and every new (rows, cut length) costs a CUDA graph capture (~0.3 s).
COMPACT_AT = 4
# Where the step replays CUDA graphs, the ladder stops at this many rows. A decode step reads every weight once
# whatever its rows (54 GB at 27B, ~16 ms on an H100) and does 2 FLOPs per weight per row: below ~100 rows the read
# is the step (the H100 reaches its matmul peak near ~300 FLOPs per byte, the H200 ~200, an A100 ~150), so a rung
# below 64 rows decodes no faster, and each new (rows, cut length) costs a capture (an eager step and the capture,
# ~0.4 s at 27B). Eager steps (a CPU, a model over several GPUs) capture nothing: their ladder goes down to 1.
GRAPH_MIN_ROWS = 64


class Admittable(Protocol):
    """What the scheduler reads of a query (sampler.Query has it)."""

    key: str
    n: int


@dataclass(frozen=True)
class Seat:
    """Sample ``sample`` of query ``query`` (an index into the queries) decodes in row ``row``."""

    query: int
    sample: int
    row: int


def rung(n_live: int, rows: int, floor: int = 1) -> int:
    """The fewest rows of the ladder ``rows``, ceil(rows / 2), ceil(rows / 4), ..., 1 that hold ``n_live`` rows and
    are at least ``floor`` (``rows`` itself when it is below the floor)."""
    while rows > 1 and -(-rows // 2) >= max(n_live, floor):
        rows = -(-rows // 2)
    return rows


def refill_rows(rows: int, fraction: int | None = None) -> int:
    """How many free rows start a refill: 1/``fraction`` of the rows (``REFILL_FRACTION`` unless given), at least 1."""
    return max(1, rows // (REFILL_FRACTION if fraction is None else fraction))


class SlotScheduler:
    def __init__(self, queries: Sequence[Admittable], rows: int, refill_at: int | None = None, min_rows: int = 1):
        if rows < 1:
            raise ValueError(f"a decode step needs at least one row, got {rows}")
        self.rows = rows  # the step's row count now (shrinks on the ladder once the queue is empty)
        self.min_rows = min_rows  # the ladder's lowest rung (GRAPH_MIN_ROWS where the step replays CUDA graphs)
        self.refill_at = max(1, refill_at) if refill_at is not None else refill_rows(rows)
        self.pending: deque[tuple[int, int]] = deque((q, s) for q, query in enumerate(queries)
                                                     for s in range(query.n))
        self.seats: dict[int, Seat] = {}  # row -> the sample decoding there

    @property
    def free_rows(self) -> list[int]:
        return [row for row in range(self.rows) if row not in self.seats]

    @property
    def live(self) -> int:
        return len(self.seats)

    def done(self) -> bool:
        return not self.pending and not self.seats

    def admit(self) -> list[Seat]:
        """Seat pending samples in free rows, if enough rows are free (or none is decoding); else nothing."""
        free = self.free_rows
        if not self.pending or not free or (self.seats and len(free) < min(self.refill_at, len(self.pending))):
            return []
        seated = []
        for row in free:
            if not self.pending:
                break
            query, sample = self.pending.popleft()
            seated.append(Seat(query, sample, row))
            self.seats[row] = seated[-1]
        return seated

    def finish(self, rows: Sequence[int]) -> list[Seat]:
        """The samples of ``rows`` have ended: their rows are free. Returns their seats."""
        return [self.seats.pop(row) for row in rows]

    def compaction(self) -> list[int] | None:
        """Once nothing is pending and at most 1/COMPACT_AT of the rows are live: the rows to keep, live ones first
        (in row order), down to the lowest rung of the ladder that holds them (not below ``min_rows``); None when the
        step keeps its rows."""
        if self.pending or not self.seats or self.live * COMPACT_AT > self.rows:
            return None
        target = rung(self.live, self.rows, self.min_rows)
        if target >= self.rows:
            return None
        live = sorted(self.seats)
        idle = [row for row in range(self.rows) if row not in self.seats]
        return (live + idle)[:target]

    def compact(self, keep: Sequence[int]) -> None:
        """Row ``keep[i]`` is now row i; the step has ``len(keep)`` rows."""
        moved = {new: self.seats[old] for new, old in enumerate(keep) if old in self.seats}
        if len(moved) != len(self.seats):
            raise ValueError("a compaction must keep every live row")
        self.seats = {new: Seat(seat.query, seat.sample, new) for new, seat in moved.items()}
        self.rows = len(keep)
