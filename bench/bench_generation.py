"""Generation-stage benchmark of the sampler on the experiment's own workload, plus the checks that go with a number:

    python bench/bench_generation.py --model synthetic:gemma-3-27b --tokenizer DIR \
        --targets target_model_queries.json --questions sycophancy_questions.json \
        --answer-lengths ao_answer_lengths.json --check 4 --noise 4 --sequential-samples 1

- the stage: every (target, question) run of the plan, n samples each, through ``Sampler`` (rows sized to the card
  unless ``--rows``); ``--answer-lengths`` ends the stand-in's answers at the real oracle's lengths, without it a
  random model runs every answer to max_new_tokens (the forced, worst-case workload);
- ``--check Q``: Q queries, greedy, token for token against HF ``generate`` (through refills: rows = Q - 1);
- ``--noise Q``: teacher-forced log-probs (bench/noise.py) of the merged and the unmerged decode against HF at
  batch 1 with the adapter unmerged (as the reference code runs), beside HF's own batch-Q noise;
- ``--sequential-samples S``: S samples one ``generate`` call each (the original script's way), for the ratio.

Prints one JSON object (also to ``--json``). On a random-weight model the numbers are about speed only.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from noise import noise_check  # noqa: E402  (bench/noise.py, beside this file)

from workload import add_workload_arguments, load_workload, print_result  # noqa: E402

from ao_resampling.engine.decoding.sampler import Sampler  # noqa: E402
from ao_resampling.engine.reference import sample_hf_batched, sample_sequential  # noqa: E402


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(p)
    p.add_argument("--check", type=int, default=0)
    p.add_argument("--noise", type=int, default=0)
    p.add_argument("--noise-steps", type=int, default=120)
    p.add_argument("--sequential-samples", type=int, default=0)
    p.add_argument("--skip-stage", action="store_true")
    p.add_argument("--json", type=Path)
    return p.parse_args()


def main() -> None:
    args = arguments()
    work = load_workload(args)
    oracle, decoding, queries, device = work.oracle, work.decoding, work.queries, work.device
    out: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "load_s": work.load_s}

    def sampler(rows, decode=decoding, merge=work.config.merge_lora) -> Sampler:
        return work.sampler(rows, decode, merge)

    if not args.skip_stage:
        stage = work.sampler()
        t = time.perf_counter()
        result = stage.run(queries, progress=False)
        seconds = time.perf_counter() - t
        n_tokens = sum(s.n_tokens for v in result.values() for s in v)
        out["stage"] = {"seconds": round(seconds, 1), "samples": sum(len(v) for v in result.values()),
                        "tokens": n_tokens, "tokens_per_s": round(n_tokens / seconds),
                        "layout": dataclasses.asdict(stage.layout)}
        out["stage"]["layout"]["captured_graphs"] = len(stage.layout.captured_graphs)
    if args.check:
        greedy = decoding.model_copy(update={"temperature": 0.0, "do_sample": False, "top_k": 0, "top_p": 1.0})
        few = [dataclasses.replace(q, n=1, answer_lengths=None) for q in queries[:args.check]]
        ours = sampler(max(1, args.check - 1), greedy).run(few, progress=False)
        hf = sample_hf_batched(oracle.model, oracle.tokenizer, few, injection_layer=oracle.injection_layer,
                               coefficient=1.0, decoding=greedy)
        out["greedy_check"] = f"{sum(ours[q.key][0].token_ids == hf[q.key][0].token_ids for q in few)}/{len(few)}"
    if args.noise:
        out["noise"] = noise_check(sampler, oracle, queries[:args.noise], decoding, steps=args.noise_steps)
    if args.sequential_samples:
        one = [dataclasses.replace(queries[0], n=args.sequential_samples, answer_lengths=None)]
        t = time.perf_counter()
        sample_sequential(oracle.model, oracle.tokenizer, one, injection_layer=oracle.injection_layer,
                          coefficient=1.0, decoding=decoding)
        out["sequential_s_per_sample"] = round((time.perf_counter() - t) / args.sequential_samples, 2)
        if "stage" in out:
            per_sample = out["stage"]["seconds"] / out["stage"]["samples"]
            out["ratio_to_sequential"] = round(out["sequential_s_per_sample"] / per_sample)
    print_result(out, args.json)


if __name__ == "__main__":
    main()
