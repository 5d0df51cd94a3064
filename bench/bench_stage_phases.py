"""Where one generate stage's time goes, phase by phase, on the model the stage runs on.

    python bench/bench_stage_phases.py --model synthetic:gemma-3-27b --tokenizer DIR \
        --targets target_model_queries.json --questions sycophancy_questions.json --budgets 768

The stage is: capture, host copy of the weights the LoRA merge writes into, merge, batches (the first one captures
the CUDA graphs, the later ones replay them), unmerge and restore. Each phase is timed alone here (same options as
the pipeline's sampler), for each of ``--variants``; with ``--profile``, 32 decode steps of a steady batch are
profiled and their GPU time split by kernel kind (matmul, softmax, sort/top-k, reductions, copies, elementwise).
Each batch also prints its graph captures and drops of finished rows; with ``--eos-rate 0.03`` the answers end at
<end_of_turn> at varied lengths, as real ones do, so the drops and their captures show. Takes bench_generation.py's
flags (the first of ``--budgets``).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import defaultdict

import torch

from bench_generation import Bench, check_greedy, check_noise, parse_args
from ao_resampling.engine.decoding.decode_step import StaticDecodeStep
from ao_resampling.engine.decoding.sampler import DecodeParams

# Kernel kinds by name, first match wins (CUDA kernel names of torch 2.11 / cuBLAS on an H200).
KINDS = [
    ("matmul", re.compile(r"nvjet|gemm|cutlass|xmma|cublas|sm90_", re.I)),
    ("softmax", re.compile(r"softmax", re.I)),
    ("sort/top-k", re.compile(r"sort|topk|radix|gatherTopK|bitonic", re.I)),
    ("reduction", re.compile(r"reduce", re.I)),
    ("copy/cat", re.compile(r"memcpy|memset|copy|cat|index|gather|scatter", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|triton", re.I)),
]


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(label: str, fn, results: dict):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    results[label] = time.perf_counter() - t
    print(f"  {label}: {results[label]:.2f} s", flush=True)
    return out


def profile_steps(bench: Bench, variant: str, budget: int, steps: int) -> None:
    """Profile one steady batch of ``steps`` decode steps (after a warm-up batch of the same shape)."""
    from torch.profiler import ProfilerActivity, profile

    sampler = bench.sampler(variant, budget, DecodeParams(0.7, 0.9, steps, 0, min_new_tokens=steps))
    chunk = bench.queries[: budget // bench.args.samples]
    with sampler.stage():
        sampler.generate(chunk)  # warm-up: graphs captured
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            sync()
            t = time.perf_counter()
            sampler.generate(chunk)
            sync()
            wall = time.perf_counter() - t
    by_kind: dict[str, float] = defaultdict(float)
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    for e in kernels:
        by_kind[kind_of(e.key)] += e.self_device_time_total / 1e3
    total = sum(by_kind.values())
    rows = len(chunk) * bench.args.samples
    print(f"\nprofile: {variant}, {rows} rows, prefill + {steps} steps: wall {wall * 1e3:.0f} ms, "
          f"GPU {total:.0f} ms ({total / steps:.1f} ms a step, prefill included)")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<12} {ms:8.1f} ms  {ms / steps:6.2f} ms/step  {ms / total:5.1%}")
    print("\ntop kernels:")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]:
        print(f"  {e.self_device_time_total / 1e3:8.1f} ms {e.count:6d}x  [{kind_of(e.key)}] {e.key[:100]}")


@contextlib.contextmanager
def counting_graph_work():
    """Counts of the decode step's graph captures (each one an eager step plus a capture) and drops of finished rows
    inside the block: with --eos-rate, what a batch of answers that end early spends besides decoding."""
    counts = {"captures": 0, "drops": 0}
    capture, select = StaticDecodeStep._run_then_capture, StaticDecodeStep.select

    def counted_capture(step, cut):
        counts["captures"] += 1
        return capture(step, cut)

    def counted_select(step, keep_N):
        counts["drops"] += 1
        return select(step, keep_N)

    StaticDecodeStep._run_then_capture, StaticDecodeStep.select = counted_capture, counted_select
    try:
        yield counts
    finally:
        StaticDecodeStep._run_then_capture, StaticDecodeStep.select = capture, select


def host_copy_trials(gib: float = 4.0) -> None:
    """Ways to get page-locked host memory for the weight copy, each timed on ``gib`` GiB (fresh memory each)."""
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device="cuda")

    def pinned_alloc():
        return torch.empty(n, dtype=torch.uint8, pin_memory=True)

    def touched_then_registered():
        host = torch.empty(n, dtype=torch.uint8)
        host.zero_()  # fault the pages in, on every core
        torch.cuda.cudart().cudaHostRegister(host.data_ptr(), n, 0)
        return host

    def pageable_copy():
        return src.cpu()

    results: dict[str, float] = {}
    for label, fn in [("pin_memory=True alloc", pinned_alloc), ("touch + cudaHostRegister", touched_then_registered),
                      ("pageable device->host copy", pageable_copy)]:
        out = timed(f"{label}, {gib:g} GiB", fn, results)
        if label != "pageable device->host copy":
            timed("  then device->host copy into it", lambda: out.copy_(src, non_blocking=True), results)
        if label.startswith("touch"):
            torch.cuda.cudart().cudaHostUnregister(out.data_ptr())
        del out


def main() -> None:
    args = parse_args()
    budget = int(args.budgets.split(",")[0])
    bench = Bench(args)
    print(f"load {bench.load_s:.1f} s, capture {bench.capture_s:.2f} s", flush=True)
    if args.eos_rate:
        bench.end_answers()
    if torch.cuda.is_available():
        host_copy_trials()
    results: dict[str, float] = {}
    per_batch = budget // args.samples
    batches = [bench.queries[i:i + per_batch]
               for i in range(0, min(len(bench.queries), args.phase_batches * per_batch), per_batch)]
    pad_to = max(len(q.input_ids) for q in bench.queries)
    for variant in args.variants.split(","):
        sampler = bench.sampler(variant, budget)
        stage = sampler.stage()
        timed(f"{variant}: stage start (host copy of the weights the merge writes, merge)", stage.__enter__, results)
        try:
            for i, batch in enumerate(batches):
                with counting_graph_work() as counts:
                    timed(f"{variant}: batch {i} ({len(batch) * args.samples} rows)",
                          lambda: sampler.generate(batch, pad_to=pad_to), results)
                print(f"    {counts['captures']} graph captures, {counts['drops']} drops of finished rows", flush=True)
        finally:
            timed(f"{variant}: stage end (unmerge, restore)", lambda: stage.__exit__(None, None, None), results)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            print(f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
            torch.cuda.reset_peak_memory_stats()
    if args.profile:
        for variant in args.variants.split(",")[-1:]:
            profile_steps(bench, variant, budget, steps=32)
    if args.noise:
        check_noise(bench, args.noise)
    if args.check:
        check_greedy(bench.model, bench.tokenizer, bench.queries[: args.check], args.max_new_tokens,
                     bench.min_new_tokens)


if __name__ == "__main__":
    main()
