"""The sampler's pure bookkeeping: each sample's random stream (streams.py) and which sample sits in which row
(scheduler.py), checked against independent computations (Python integers, brute-force replays)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from ao_resampling.engine.decoding import streams
from ao_resampling.engine.decoding.scheduler import SlotScheduler, rung

# ---------------------------------------------------------------------------------------------------------------------
# streams.py


def fmix32_python(h: int) -> int:
    """murmur3's 32-bit finaliser on Python integers (the reference the int64 tensor version must equal)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


@given(xs=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=50), constant=st.integers(0, 2**32 - 1))
def test_32_bit_products_never_leave_int64(xs, constant):
    got = streams._mul32(torch.tensor(xs, dtype=torch.long), constant).tolist()
    assert got == [(x * constant) % 2**32 for x in xs]


@given(xs=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=50))
def test_the_finaliser_is_murmur3s(xs):
    assert streams._fmix32(torch.tensor(xs, dtype=torch.long)).tolist() == [fmix32_python(x) for x in xs]


def test_uniforms_are_uniform_and_independent_across_keys_steps_and_tokens():
    """Kolmogorov-Smirnov against U(0, 1) along each axis the stream is keyed by, and no correlation between
    neighbouring token ids or steps (fixed keys: the p-values are what they are, not tuned)."""
    keys_B = torch.tensor([streams.sample_key(0, f"run{i}", i % 10) for i in range(400)])
    ids_BC = torch.arange(256).expand(400, 256)
    u0_BC = streams.uniforms(keys_B, torch.zeros(400, dtype=torch.long), ids_BC)
    u1_BC = streams.uniforms(keys_B, torch.ones(400, dtype=torch.long), ids_BC)
    for sample in (u0_BC.flatten(), u0_BC[:, 0], u0_BC[0], u1_BC[:, 17]):
        assert stats.kstest(sample.numpy(), "uniform").pvalue > 1e-3
    assert abs(stats.pearsonr(u0_BC[:, :-1].flatten(), u0_BC[:, 1:].flatten()).statistic) < 0.01
    assert abs(stats.pearsonr(u0_BC.flatten(), u1_BC.flatten()).statistic) < 0.01
    assert 0 < float(u0_BC.min()) and float(u0_BC.max()) < 1


def test_a_samples_key_is_its_seed_run_and_index():
    key = streams.sample_key(0, "q001__a", 3)
    assert key == streams.sample_key(0, "q001__a", 3)
    others = {streams.sample_key(1, "q001__a", 3), streams.sample_key(0, "q001__b", 3),
              streams.sample_key(0, "q001__a", 4)}
    assert key not in others and len(others) == 3
    assert 0 <= key < 2**63


# ---------------------------------------------------------------------------------------------------------------------
# scheduler.py


@dataclass(frozen=True)
class Q:
    key: str
    n: int


def replay(ns: list[int], rows: int, lifetimes: dict[tuple[int, int], int], refill_at: int | None = None):
    """Drive the scheduler as the sampler does: seat, let each sample live ``lifetimes[(q, s)]`` steps, finish,
    compact. Returns the seat log and the row counts stepped."""
    scheduler = SlotScheduler([Q(f"q{i}", n) for i, n in enumerate(ns)], rows, refill_at)
    age: dict[int, int] = {}
    seated, rows_stepped = [], []
    for _ in range(10_000):
        if scheduler.done():
            break
        for seat in scheduler.admit():
            assert seat.row not in age, "a row holds one sample at a time"
            age[seat.row] = 0
            seated.append((seat.query, seat.sample))
        ended = [row for row, seat in scheduler.seats.items() if age[row] >= lifetimes[seat.query, seat.sample]]
        for seat in scheduler.finish(ended):
            del age[seat.row]
        keep = scheduler.compaction()
        if keep is not None:
            live_before = {scheduler.seats[row] for row in scheduler.seats}
            age = {new: age[old] for new, old in enumerate(keep) if old in age}
            scheduler.compact(keep)
            assert {(s.query, s.sample) for s in scheduler.seats.values()} == \
                {(s.query, s.sample) for s in live_before}, "a compaction keeps every live sample"
        if scheduler.live:
            rows_stepped.append(scheduler.rows)
            assert scheduler.live <= scheduler.rows
            age = {row: a + 1 for row, a in age.items()}
    assert scheduler.done()
    return seated, rows_stepped


@settings(max_examples=60, deadline=None)
@given(data=st.data(), ns=st.lists(st.integers(1, 12), min_size=1, max_size=12), rows=st.integers(1, 40))
def test_every_sample_is_seated_exactly_once_and_every_step_stays_on_the_ladder(data, ns, rows):
    lifetimes = {(q, s): data.draw(st.integers(0, 30)) for q, n in enumerate(ns) for s in range(n)}
    seated, rows_stepped = replay(ns, rows, lifetimes)
    assert sorted(seated) == sorted(lifetimes), "every sample once"
    assert seated == sorted(seated), "in queue order: a query's samples one after another"
    ladder = {rows}
    while max(ladder) > 1 and min(ladder) > 1:
        ladder.add(math.ceil(min(ladder) / 2))
    assert set(rows_stepped) <= ladder | {1}


def test_rows_are_refilled_once_enough_are_free_and_the_tail_shrinks():
    # 3 queries x 4 samples, 8 rows, refill at 2 free rows. Sample lifetimes: q0's end at once, q1's late.
    lifetimes = {(0, s): 1 for s in range(4)} | {(1, s): 9 for s in range(4)} | {(2, s): 3 for s in range(4)}
    scheduler = SlotScheduler([Q("q0", 4), Q("q1", 4), Q("q2", 4)], rows=8, refill_at=2)
    first = scheduler.admit()
    assert [(s.query, s.sample, s.row) for s in first] == [(0, i, i) for i in range(4)] + \
        [(1, i, 4 + i) for i in range(4)]
    assert scheduler.admit() == [], "no free row"
    scheduler.finish([0])
    assert scheduler.admit() == [], "1 free row < refill_at"
    scheduler.finish([1, 2, 3])
    assert [(s.query, s.sample, s.row) for s in scheduler.admit()] == [(2, i, i) for i in range(4)]
    assert scheduler.compaction() is None, "nothing is pending only once the queue is empty, and rows are full"
    scheduler.finish([0, 1, 2, 3])
    assert scheduler.compaction() is None, "4 live rows of 8: more than a quarter, the step keeps its rows"
    scheduler.finish([4, 6])
    assert scheduler.compaction() == [5, 7], "2 live rows of 8: the rung of 2, live rows first"
    scheduler.compact([5, 7])
    assert sorted(scheduler.seats) == [0, 1] and scheduler.rows == 2
    _, rows_stepped = replay([4, 4, 4], 8, lifetimes, refill_at=2)
    assert rows_stepped[0] == 8 and rows_stepped[-1] == 8, "q1's 4 rows end together: never a quarter live"


def test_the_last_pending_samples_are_seated_even_below_the_refill_threshold():
    scheduler = SlotScheduler([Q("q0", 8), Q("q1", 1)], rows=8, refill_at=4)
    assert len(scheduler.admit()) == 8
    scheduler.finish([0])
    assert [(s.query, s.row) for s in scheduler.admit()] == [(1, 0)], "one pending sample, one free row: seated"


@given(batch_rows=st.integers(1, 2000), data=st.data())
def test_rung_is_the_smallest_ladder_row_count_that_holds_the_live_rows(batch_rows, data):
    n_live = data.draw(st.integers(1, batch_rows))
    floor = data.draw(st.sampled_from([1, 2, 64, 3000]) | st.integers(1, 2000))
    ladder = [batch_rows]
    while ladder[-1] > 1:
        ladder.append(math.ceil(ladder[-1] / 2))
    assert rung(n_live, batch_rows) == rung(n_live, batch_rows, floor=1)
    got = rung(n_live, batch_rows, floor=floor)
    assert got in ladder and got >= n_live
    assert got >= min(floor, batch_rows), "never below the floor (the rows themselves when they are below it)"
    assert all(r < max(n_live, floor) for r in ladder if r < got), "the lowest rung that holds both"


def test_with_graphs_the_tail_stops_at_the_ladders_floor():
    # 256 rows, the queue drained, 3 live: 256 -> 4 without a floor; with 64, the rung of 64, and no further
    for floor, expected in ((1, 4), (64, 64), (300, None)):
        scheduler = SlotScheduler([Q("q0", 256)], rows=256, min_rows=floor)
        scheduler.admit()
        scheduler.finish(list(range(3, 256)))
        keep = scheduler.compaction()
        assert (None if keep is None else len(keep)) == expected, floor
        if keep is not None:
            assert keep[:3] == [0, 1, 2], "live rows first"
            scheduler.compact(keep)
            assert scheduler.compaction() is None, "on the lowest rung that holds them: no further compaction"
