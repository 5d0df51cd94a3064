"""Top-p sampling step on a (rows x 262k) logit matrix: the fallback nucleus methods, and the whole sampling step.

    python bench/bench_nucleus.py --rows 760

A random-weight model's next-token distribution is nearly flat, so every row's nucleus holds most of the vocabulary
and every row takes the full-nucleus fallback: the worst case. A trained model's distribution is peaked and its
nucleus fits in the top-256 candidates (``peaked`` below). ``bisection`` is the sampler's first fallback (40 halvings
of a threshold, three full-size tensors a pass), kept here only as the baseline the sort replaced.
"""

from __future__ import annotations

import argparse

import torch

from cuda_timing import cuda_ms  # bench/, beside this script

from ao_resampling.engine.decoding.nucleus import nucleus_threshold, sample_next_tokens


def bisection_threshold(scaled_BV: torch.Tensor, log_z_B1: torch.Tensor, top_p: float, iters: int = 40):
    probs_BV = (scaled_BV - log_z_B1).exp()
    lo_B1 = scaled_BV.min(-1, keepdim=True).values
    hi_B1 = scaled_BV.max(-1, keepdim=True).values + 1
    for _ in range(iters):
        mid_B1 = (lo_B1 + hi_B1) / 2
        enough_B1 = (probs_BV * (scaled_BV >= mid_B1)).sum(-1, keepdim=True) >= top_p
        lo_B1 = torch.where(enough_B1, mid_B1, lo_B1)
        hi_B1 = torch.where(enough_B1, hi_B1, mid_B1)
    return lo_B1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=760)
    ap.add_argument("--vocab", type=int, default=262_208)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_nucleus.py times CUDA kernels; it needs a GPU")
    T, p = args.temperature, args.top_p
    g = torch.Generator(device="cuda").manual_seed(0)
    flat_BV = (torch.randn(args.rows, args.vocab, device="cuda", generator=g) * 0.5).bfloat16()
    peaked_BV = flat_BV.clone()
    peaked_BV[:, :8] += 30  # a trained model: the nucleus is a handful of tokens
    scaled_BV = flat_BV.float() / T
    log_z_B1 = scaled_BV.logsumexp(-1, keepdim=True)
    streams = dict(keys_B=torch.arange(args.rows, device="cuda") * 7919, steps_B=torch.zeros(args.rows,
                                                                                               dtype=torch.long,
                                                                                               device="cuda"))

    sort_bf16 = nucleus_threshold(flat_BV, log_z_B1, temperature=T, top_p=p)
    sort_fp32 = nucleus_threshold(scaled_BV, log_z_B1, temperature=1.0, top_p=p)
    bisect = bisection_threshold(scaled_BV, log_z_B1, p)
    kept_BV = flat_BV >= sort_bf16
    rows_fp32 = (kept_BV != (scaled_BV >= sort_fp32)).any(-1).sum().item()
    rows_bisect = (kept_BV != (scaled_BV >= bisect)).any(-1).sum().item()
    # bf16 logits tie in groups of hundreds; a group whose cumulative mass lands within float rounding of top_p can
    # be kept by one summation order and not by another, so a few rows may differ between methods on a GPU.
    print(f"{args.rows} rows x {args.vocab} vocab; rows whose kept set differs from the bf16 sort's: "
          f"float32 sort {rows_fp32}, bisection {rows_bisect}")
    for name, fn in [
        ("fallback: sort bf16 logits (nucleus_threshold)", lambda: nucleus_threshold(flat_BV, log_z_B1,
                                                                                      temperature=T, top_p=p)),
        ("fallback: sort float32 scaled logits", lambda: nucleus_threshold(scaled_BV, log_z_B1, temperature=1.0,
                                                                           top_p=p)),
        ("fallback: 40-step bisection (replaced)", lambda: bisection_threshold(scaled_BV, log_z_B1, p)),
        ("whole step, flat rows (every row falls back)", lambda: sample_next_tokens(flat_BV, temperature=T, top_p=p,
                                                                                    **streams)),
        ("whole step, peaked rows (top-256 candidates)", lambda: sample_next_tokens(peaked_BV, temperature=T,
                                                                                    top_p=p, **streams)),
    ]:
        print(f"{name:<50} {cuda_ms(fn):8.2f} ms")


if __name__ == "__main__":
    main()
