"""How many decode steps and refills a stage takes at each refill threshold: the sampler's loop replayed on the
scheduler alone (no model, a CPU, seconds), with the real oracle's answer lengths drawn as the stand-in draws them.

    python bench/refill_sim.py --answer-lengths ../shared/data/ao_answer_lengths.json --rows 273 \
        --fractions 2,4,8,12,16,32

The counts are exact for the stand-in's lengths (the same draw per (seed, run, sample) as a run makes); the seconds
are a model: each full step ``--step-ms``, each step of the tail's smaller rung ``--rung-step-ms``, each refill
``--seat-ms`` (the H100 profile of session 13: 38.5, ~25 and 4.6 ms; bench/README.md).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from ao_resampling.engine.decoding.scheduler import GRAPH_MIN_ROWS, SlotScheduler, refill_rows
from ao_resampling.inputs.answer_lengths import answer_lengths_for, load_answer_lengths


@dataclass(frozen=True)
class Q:
    key: str
    n: int


def replay(lengths: dict[str, tuple[int, ...]], rows: int, fraction: int) -> dict:
    """The sampler's loop (sampler._Run.answers): admit and seat (the first token drawn), hand over the ended,
    compact, step (one more token for every live row)."""
    queries = [Q(key, len(n)) for key, n in lengths.items()]
    slots = SlotScheduler(queries, rows, refill_at=refill_rows(rows, fraction), min_rows=GRAPH_MIN_ROWS)
    drawn: dict[int, int] = {}
    steps_by_rows: dict[int, int] = {}
    refills = seated = 0
    while not slots.done():
        seats = slots.admit()
        if seats:
            refills += 1
            seated += len(seats)
            drawn.update({seat.row: 1 for seat in seats})
        ended = [row for row, seat in slots.seats.items()
                 if drawn[row] >= lengths[queries[seat.query].key][seat.sample]]
        slots.finish(ended)
        keep = slots.compaction()
        if keep is not None:
            drawn = {new: drawn[old] for new, old in enumerate(keep) if old in drawn}
            slots.compact(keep)
        if slots.live:
            steps_by_rows[slots.rows] = steps_by_rows.get(slots.rows, 0) + 1
            for row in slots.seats:
                drawn[row] += 1
    return {"steps": sum(steps_by_rows.values()), "steps_by_rows": steps_by_rows, "refills": refills,
            "rows_per_refill": round(seated / refills, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--answer-lengths", required=True)
    p.add_argument("--rows", type=int, default=273)
    p.add_argument("--runs", type=int, default=1000, help="queries (100 targets x 10 questions)")
    p.add_argument("--n", type=int, default=10, help="samples per query")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=120)
    p.add_argument("--fractions", default="2,4,8,12,16,32")
    p.add_argument("--step-ms", type=float, default=38.5)
    p.add_argument("--rung-step-ms", type=float, default=25.0)
    p.add_argument("--seat-ms", type=float, default=4.6)
    p.add_argument("--json")
    args = p.parse_args()
    table = load_answer_lengths(args.answer_lengths)
    lengths = {f"run{i:04d}": answer_lengths_for(table, seed=args.seed, run_id=f"run{i:04d}", n=args.n,
                                                 max_new_tokens=args.max_new_tokens) for i in range(args.runs)}
    tokens = sum(sum(n) for n in lengths.values())
    print(f"{args.runs * args.n} samples, {tokens} tokens: at least {-(-tokens // args.rows)} full steps of "
          f"{args.rows} rows")
    out = {"rows": args.rows, "tokens": tokens, "by_fraction": {}}
    for fraction in [int(f) for f in args.fractions.split(",")]:
        r = replay(lengths, args.rows, fraction)
        full = r["steps_by_rows"].get(args.rows, 0)
        r["model_s"] = round((full * args.step_ms + (r["steps"] - full) * args.rung_step_ms
                              + r["refills"] * args.seat_ms) / 1000, 2)
        out["by_fraction"][fraction] = r
        print(f"refill at 1/{fraction:<3} ({max(1, args.rows // fraction)} rows free): {r['steps']} steps "
              f"{r['steps_by_rows']}, {r['refills']} refills of {r['rows_per_refill']} rows: ~{r['model_s']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
