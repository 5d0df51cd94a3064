"""A refill's seat at the 27B shape, timed alone: where its ~4 ms a refill go (profile_stage.py, H100).

    python bench/bench_seat.py --rows 273 --refill 34

A ``SlotStep`` with Gemma 3 27B's KV layout (62 layers, 16 KV heads of 128, bfloat16) and no model: the prompt
buffer of one prompt pass (32 prompts of ``--prompt`` positions) is filled with random KV, then rows are seated from
it as the sampler seats them, 10 samples a prompt in the order the queue holds them:

- ``refill``: ``--refill`` rows, free rows scattered over the step (a fixed seed), as a refill at 1/8 of the rows;
- ``first fill``: every row of the step, as a stage's first seat.

Each is timed six ways: ``SlotStep.seat`` as it runs (wall clock between two synchronisations, as profile_stage.py
times it, and CUDA events); its KV copies alone (``triton_kernels.seat_prompts``, one launch a tensor); the copies
without Triton (one strided copy a run of rows sharing a prompt); the same, the bytes seen as 8-byte words; the row
bookkeeping alone (masks, write and RoPE positions); and the seat before session 16 (a gather of up to 32 rows'
prompts, then an indexed write). The copies are first checked to leave the same KV. The achieved bandwidth counts
the prompt KV read once a row and written once a row (rows of one prompt re-read it, partly from L2).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cuda_timing import cuda_ms  # bench/, beside this script

from ao_resampling.engine.decoding import triton_kernels
from ao_resampling.engine.decoding.decode_step import PromptCache, SlotStep, copy_runs, seat_runs

LAYERS, KV_HEADS, HEAD_DIM, PROMPTS, SAMPLES = 62, 16, 128, 32, 10


def wall_ms(fn, repeats: int) -> float:
    """Mean milliseconds of ``fn`` between two synchronisations (host work included), after one warm-up."""
    fn()
    total = 0.0
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        total += time.perf_counter() - started
    return 1000 * total / repeats


def seated_step(rows: int, prompt: int, new_tokens: int, device: torch.device) -> tuple[SlotStep, torch.Tensor]:
    step = SlotStep(None, rows, prompt, max_new_tokens=new_tokens, sliding_window=None, device=device,
                    graphs=False, devices=[device] * LAYERS)
    cache = PromptCache(step)
    for layer in range(LAYERS):
        keys, values = (torch.randn(PROMPTS, KV_HEADS, prompt, HEAD_DIM, device=device, dtype=torch.bfloat16)
                        for _ in range(2))
        cache.update(keys, values, layer)
    mask_QP = torch.ones(PROMPTS, prompt, dtype=torch.bool, device=device)
    step.seat(torch.arange(rows, device=device), torch.arange(rows, device=device) // SAMPLES % PROMPTS, mask_QP)
    return step, mask_QP


def old_seat_copies(step: SlotStep, rows_N: torch.Tensor, query_of_N: torch.Tensor) -> None:
    """The seat's KV copies before session 16: up to the buffer's prompts a gather, then an indexed write."""
    for slots, prompts in zip(step._slots, step._prompt_kv):
        chunk = prompts[0].shape[1]
        for start in range(0, rows_N.shape[0], chunk):
            rows_C, query_of_C = rows_N[start:start + chunk], query_of_N[start:start + chunk]
            for slot_LBHSD, prompt_LQHPD in zip(slots, prompts):
                slot_LBHSD[:, rows_C, :, :step.P] = prompt_LQHPD.index_select(1, query_of_C)


def run_copies(step: SlotStep, runs: list[tuple[int, int, int]], words: bool = False) -> None:
    """The seat's KV copies as ``SlotStep.seat`` makes them without Triton; ``words``: the same bytes seen as 8-byte
    integers (a quarter of the elements for the strided copy kernel to index)."""
    for slots, prompts in zip(step._slots, step._prompt_kv):
        for slot_LBHSD, prompt_LQHPD in zip(slots, prompts):
            if words:
                slot_LBHSD, prompt_LQHPD = slot_LBHSD.view(torch.int64), prompt_LQHPD.view(torch.int64)
            copy_runs(slot_LBHSD, prompt_LQHPD, runs)


def triton_copies(step: SlotStep, rows_N: torch.Tensor, query_of_N: torch.Tensor) -> None:
    """The copies as ``SlotStep.seat`` makes them where Triton works: ``triton_kernels.seat_prompts``, one launch a
    tensor (a program a layer, row and KV head)."""
    for slots, prompts in zip(step._slots, step._prompt_kv):
        for slot_LBHSD, prompt_LQHPD in zip(slots, prompts):
            triton_kernels.seat_prompts(slot_LBHSD, prompt_LQHPD, rows_N, query_of_N)


def check_same_copies(step: SlotStep, rows_N: torch.Tensor, query_of_N: torch.Tensor, runs) -> None:
    """The two ways of copying leave the same KV in the seated rows (each row holds its prompt's)."""
    kept = []
    copies = [lambda: old_seat_copies(step, rows_N, query_of_N), lambda: run_copies(step, runs),
              lambda: run_copies(step, runs, words=True)]
    if triton_kernels.available(rows_N.device, "seat"):
        copies.append(lambda: triton_copies(step, rows_N, query_of_N))
    for copy in copies:
        for slot_LBHSD, _ in step._slots:
            slot_LBHSD[:, rows_N] = 0
        copy()
        kept.append([slot_LBHSD[:, rows_N, :, :step.P].clone() for slots in step._slots for slot_LBHSD in slots])
    prompts = [prompt_LQHPD[:, query_of_N] for prompts in step._prompt_kv for prompt_LQHPD in prompts]
    if not all(all(torch.equal(a, b) for b in rest) for a, *rest in zip(prompts, *kept)):
        raise SystemExit("the seat's copies differ from the gather's")


def time_seat(step: SlotStep, mask_QP: torch.Tensor, rows: list[int], repeats: int) -> dict:
    device = mask_QP.device
    first_query = 7  # a block's queue starts mid-query: the first prompt's samples are split over two refills
    query_of = [(first_query + i) // SAMPLES % PROMPTS for i in range(len(rows))]
    rows_N, query_of_N = torch.tensor(rows, device=device), torch.tensor(query_of, device=device)
    runs = seat_runs(rows, query_of)
    check_same_copies(step, rows_N, query_of_N, runs)
    moved = 2 * len(rows) * LAYERS * KV_HEADS * step.P * HEAD_DIM * 2 * 2  # keys and values, read and written
    seat = lambda: step.seat(rows_N, query_of_N, mask_QP)  # noqa: E731
    result = {
        "rows": len(rows), "runs": len(runs), "moved_gb": round(moved / 1e9, 3),
        "seat_wall_ms": wall_ms(seat, repeats), "seat_cuda_ms": cuda_ms(seat, repeats),
        "copies_cuda_ms": cuda_ms(lambda: run_copies(step, runs), repeats),
        "word_copies_cuda_ms": cuda_ms(lambda: run_copies(step, runs, words=True), repeats),
        "bookkeeping_cuda_ms": cuda_ms(lambda: step._start_rows(rows_N, query_of_N, mask_QP), repeats),
        "old_copies_cuda_ms": cuda_ms(lambda: old_seat_copies(step, rows_N, query_of_N), repeats),
    }
    if triton_kernels.available(device, "seat"):  # what seat_wall_ms and seat_cuda_ms ran
        result["triton_copies_cuda_ms"] = cuda_ms(lambda: triton_copies(step, rows_N, query_of_N), repeats)
    for name in ("copies", "word_copies", "triton_copies", "old_copies"):
        if f"{name}_cuda_ms" in result:
            result[f"{name}_tb_per_s"] = round(moved / (result[f"{name}_cuda_ms"] / 1000) / 1e12, 2)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=273, help="the step's rows (273: the H100's auto at real lengths)")
    ap.add_argument("--refill", type=int, default=34, help="rows a refill seats (1/8 of 273)")
    ap.add_argument("--prompt", type=int, default=39, help="the prompt region P (the experiment's longest prompt)")
    ap.add_argument("--new-tokens", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_seat.py times CUDA copies; it needs a GPU")
    step, mask_QP = seated_step(args.rows, args.prompt, args.new_tokens, torch.device("cuda"))
    free = sorted(torch.randperm(args.rows, generator=torch.Generator().manual_seed(0))[:args.refill].tolist())
    out = {"device": torch.cuda.get_device_name(), "layers": LAYERS, "prompt": args.prompt,
           "refill": time_seat(step, mask_QP, free, args.repeats),
           "first fill": time_seat(step, mask_QP, list(range(args.rows)), max(3, args.repeats // 4))}
    print(json.dumps(out, indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
