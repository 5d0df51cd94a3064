"""The weight matmuls of one 27B decode step at each row count: which row counts the card's matmul tiles fill.

    python bench/bench_rows.py --rows 16:513:16 --extra 8,272 --json rows.json

A decode step of Gemma 3 27B is mostly its linear layers: per decoder layer q, k, v, o, gate, up and down (x62), then
the LM head. Their cost does not grow smoothly with the rows: cuBLAS cuts the rows into tiles (64 or 128 of them),
so a row count just past a tile boundary pays for a nearly empty tile. This times each projection of the 27B
text config (bf16, random weights) at every row count asked for, and prints the step's matmul milliseconds, the
microseconds per row (what a sample's token costs), and the same for q/k/v and gate/up fused into one matmul
each. The rows the sampler picks for a card (``memory.rows_that_fit``) can be compared with the best nearby count.

In a real step each of the 62 layers has its own weights, read from HBM. A single q weight (44 MB) fits in an
H100's 50 MB L2 cache, so timing one matrix over and over would time the cache: each projection cycles through
copies of its weight totalling at least ``FLUSH_BYTES``, so every call reads its weight from memory.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from cuda_timing import cuda_ms  # bench/, beside this script

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS = 5376, 21504, 32, 16, 128, 262_208, 62
FLUSH_BYTES = 256 * 2**20  # several times the largest L2 of these cards (H100 50 MB, H200 50 MB)


def projections() -> dict[str, tuple[int, int, int]]:
    """name -> (in features, out features, times per step)."""
    return {"q": (HIDDEN, HEADS * HEAD_DIM, LAYERS), "k": (HIDDEN, KV_HEADS * HEAD_DIM, LAYERS),
            "v": (HIDDEN, KV_HEADS * HEAD_DIM, LAYERS), "o": (HEADS * HEAD_DIM, HIDDEN, LAYERS),
            "gate": (HIDDEN, INTERMEDIATE, LAYERS), "up": (HIDDEN, INTERMEDIATE, LAYERS),
            "down": (INTERMEDIATE, HIDDEN, LAYERS), "lm_head": (HIDDEN, VOCAB, 1),
            "qkv fused": (HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM, LAYERS),
            "gate_up fused": (HIDDEN, 2 * INTERMEDIATE, LAYERS)}


def row_counts(spec: str, extra: str) -> list[int]:
    start, stop, step = (int(x) for x in spec.split(":"))
    return sorted(set(range(start, stop, step)) | {int(x) for x in extra.split(",") if x})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="16:513:16", help="start:stop:step")
    ap.add_argument("--extra", default="272", help="comma-separated row counts to add")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_rows.py times CUDA matmuls; it needs a GPU")
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    weights = {name: [torch.randn(out, inp, **bf16) * inp**-0.5 for _ in range(-(-FLUSH_BYTES // (2 * out * inp)))]
               for name, (inp, out, _) in projections().items()}
    results = []
    print(f"{torch.cuda.get_device_name()}: ms per decode step (matmuls only) by rows; us per row")
    for rows in row_counts(args.rows, args.extra):
        x = {inp: torch.randn(rows, inp, **bf16) for inp, _, _ in projections().values()}
        ms = {name: cuda_ms(lambda ws=itertools.cycle(weights[name]), a=x[inp]: a @ next(ws).T, args.repeats) * times
              for name, (inp, _, times) in projections().items()}
        separate = sum(ms[n] for n in ("q", "k", "v", "o", "gate", "up", "down", "lm_head"))
        fused = separate - sum(ms[n] for n in ("q", "k", "v", "gate", "up")) + ms["qkv fused"] + ms["gate_up fused"]
        results.append({"rows": rows, "step_ms": round(separate, 2), "us_per_row": round(1000 * separate / rows, 1),
                        "fused_step_ms": round(fused, 2), "fused_us_per_row": round(1000 * fused / rows, 1),
                        "ms": {k: round(v, 3) for k, v in ms.items()}})
        print(f"  rows {rows:4d}: {separate:7.2f} ms  {1000 * separate / rows:6.1f} us/row   "
              f"fused q/k/v, gate/up: {fused:7.2f} ms  {1000 * fused / rows:6.1f} us/row")
        del x
    best = min(results, key=lambda r: r["us_per_row"])
    print(f"cheapest per row: {best['rows']} rows, {best['us_per_row']} us/row")
    if args.json:
        args.json.write_text(json.dumps({"card": torch.cuda.get_device_name(), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
