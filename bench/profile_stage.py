"""Where the generation stage's time goes: decode steps, draws, refills (prefill + seating), host bookkeeping.

    python bench/profile_stage.py --model synthetic:gemma-3-27b --tokenizer DIR --targets T --questions Q \
        --answer-lengths ao_answer_lengths.json --num-targets 20 --refill-fractions 8,4,2 --profile-targets 3

1. The stage as it runs (no synchronisation added), once per refill fraction (``scheduler.REFILL_FRACTION``):
   seconds, decode steps, refills, graphs captured, and seconds per step.
2. The same stage with each phase timed between two ``torch.cuda.synchronize`` calls: the decode step (graph
   replay), the draw, the prompt pass of a refill, the seating of its rows, the finished-row check; the rest of the
   wall time is host work between phases. The added synchronisation slows the loop a little; the split is what counts.
3. ``torch.profiler`` over a small stage: the CUDA kernels by total time, and the GPU's busy time against the wall.

Prints one JSON object (also to ``--json``). On a random-weight model the numbers are about speed only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload import add_workload_arguments, load_workload, print_result  # noqa: E402

import ao_resampling.engine.decoding.scheduler as scheduler  # noqa: E402
from ao_resampling.engine.decoding import sampler as sampler_module  # noqa: E402
from ao_resampling.engine.decoding.decode_step import SlotStep, synced_clock  # noqa: E402
from ao_resampling.engine.decoding.merge import merged_lora  # noqa: E402


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(p)
    p.add_argument("--refill-fractions", default=str(scheduler.REFILL_FRACTION),
                   help="comma-separated: refill once 1/F of the rows are free")
    p.add_argument("--profile-targets", type=int, default=3, help="targets of the profiled stage; 0 = none")
    p.add_argument("--top-kernels", type=int, default=30)
    p.add_argument("--json", type=Path)
    return p.parse_args()


def clock() -> float:
    """The time once the GPU's queued work is done (the sampler's own ``synced_clock``, on this machine's device)."""
    return synced_clock(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


@contextlib.contextmanager
def phase_timers(totals: dict[str, list[float]]):
    """Time the sampler's phases, each between two synchronisations: totals[name] = [seconds, calls]."""
    targets = [(SlotStep, "__call__", "decode step"), (SlotStep, "seat", "seat rows"),
               (sampler_module.Sampler, "draw", "draw"), (sampler_module.Sampler, "prefill", "prefill"),
               (sampler_module._Run, "_ended", "ended check"), (sampler_module._Run, "_compact", "compact")]
    originals = []

    def timed(fn, name):
        def wrapper(*args, **kwargs):
            t = clock()
            result = fn(*args, **kwargs)
            totals[name][0] += clock() - t
            totals[name][1] += 1
            return result
        return wrapper

    for owner, attribute, name in targets:
        fn = getattr(owner, attribute)
        originals.append((owner, attribute, fn))
        setattr(owner, attribute, timed(fn, name))
    try:
        yield
    finally:
        for owner, attribute, fn in originals:
            setattr(owner, attribute, fn)


def run_stage(work, queries) -> dict:
    stage = work.sampler(merge=False)  # merged once for all stages in main(), as a run merges its own model
    t = clock()
    result = stage.run(queries, progress=False)
    seconds = clock() - t
    layout = stage.layout
    return {"seconds": round(seconds, 2), "samples": sum(len(v) for v in result.values()),
            "tokens": sum(s.n_tokens for v in result.values() for s in v), "rows": layout.rows,
            "decode_steps": layout.decode_steps, "refills": layout.refills,
            "graphs": len(layout.captured_graphs), "captured": layout.captured_graphs,
            "capture_s": round(layout.capture_s, 2), "prompt_s": round(layout.prompt_s, 2),
            "setup_s": round(layout.setup_s, 2), "teardown_s": round(layout.teardown_s, 2),
            "ms_per_step": round(1000 * seconds / max(1, layout.decode_steps), 1)}


def kernel_table(prof, top: int) -> dict:
    rows = []
    busy_us = 0.0
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if device_us and event.device_type == torch.autograd.DeviceType.CUDA:
            busy_us += device_us
            rows.append((device_us, event.count, event.key))
    rows.sort(reverse=True)
    return {"gpu_busy_s": round(busy_us / 1e6, 2),
            "kernels": [{"ms": round(us / 1000, 1), "calls": n, "name": name[:120]} for us, n, name in rows[:top]]}


def main() -> None:
    args = arguments()
    work = load_workload(args)
    if not args.no_merge:  # the LoRA folded in for good, as a run's own model (merge.py, restore=False): no stage
        merged_lora(work.oracle.model, restore=False).__enter__()  # pays a snapshot and a restore
    out: dict = {"device": torch.cuda.get_device_name() if work.device == "cuda" else "cpu", "load_s": work.load_s,
                 "queries": len(work.queries), "answer_lengths": str(args.answer_lengths or "forced")}
    default_fraction = scheduler.REFILL_FRACTION
    out["by_refill_fraction"] = {}
    for fraction in [int(f) for f in args.refill_fractions.split(",")]:
        scheduler.REFILL_FRACTION = fraction
        out["by_refill_fraction"][fraction] = run_stage(work, work.queries)
        print(fraction, out["by_refill_fraction"][fraction], flush=True)
    scheduler.REFILL_FRACTION = default_fraction

    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    with phase_timers(totals):
        timed = run_stage(work, work.queries)
    phases = {name: {"s": round(s, 2), "calls": n, "ms_per_call": round(1000 * s / max(1, n), 2)}
              for name, (s, n) in totals.items()}
    inside = totals["decode step"][0] + totals["draw"][0] + totals["prefill"][0] + totals["seat rows"][0] \
        + totals["ended check"][0] + totals["compact"][0]
    out["phases"] = {"stage": timed, "phases": phases,
                     "host_between_phases_s": round(timed["seconds"] - inside, 2),
                     "note": "draw includes the first draw of each refill; the phases are timed between syncs"}
    print(json.dumps(out["phases"], indent=1), flush=True)

    if args.profile_targets and work.device == "cuda":
        few = work.queries[:args.profile_targets * work.config.num_questions]
        run_stage(work, few)  # graphs of these shapes captured outside the profile
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            profiled = run_stage(work, few)
        out["profile"] = {"stage": profiled, **kernel_table(prof, args.top_kernels)}
    print_result(out, args.json)


if __name__ == "__main__":
    main()
