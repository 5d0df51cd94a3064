"""The experiment's own workload for the benchmarks: the oracle loaded as the stage loads it, the plan's runs as
sampler queries (real AO prompts from the real targets and questions, activations captured from the model itself).

``add_workload_arguments`` declares the options every bench script that samples the stage shares; ``load_workload``
turns them into ``Workload``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ao_resampling.config import Decoding, ExperimentConfig, build_config
from ao_resampling.engine.decoding.sampler import Query, Sampler
from ao_resampling.inputs.answer_lengths import answer_lengths_for, load_answer_lengths
from ao_resampling.stages.common.sampling import load_oracle
from ao_resampling.stages.generate import capture_targets
from ao_resampling.stages.plan import build_plan, planned_decoding


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="synthetic:gemma-3-27b")
    p.add_argument("--tokenizer")
    p.add_argument("--targets", type=Path, required=True)
    p.add_argument("--questions", type=Path, required=True)
    p.add_argument("--answer-lengths", type=Path, help="end the stand-in's answers at these lengths (else forced)")
    p.add_argument("--num-targets", type=int, default=100)
    p.add_argument("--rows", default="auto")
    p.add_argument("--no-merge", action="store_true", help="decode with the LoRA as adapter modules")


@dataclass
class Workload:
    config: ExperimentConfig
    oracle: object  # stages.common.sampling's loaded oracle: model, tokenizer, injection_layer
    decoding: Decoding
    queries: list[Query]
    device: str
    load_s: float = 0.0

    def sampler(self, rows=None, decoding: Decoding | None = None, merge: bool | None = None) -> Sampler:
        return Sampler(self.oracle.model, self.oracle.tokenizer, decoding=decoding or self.decoding,
                       injection_layer=self.oracle.injection_layer, coefficient=1.0,
                       rows=self.config.batch_rows if rows is None else rows,
                       merge_lora=self.config.merge_lora if merge is None else merge)


def load_workload(args: argparse.Namespace) -> Workload:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = args.rows if args.rows == "auto" else int(args.rows)
    config = build_config(overrides=dict(
        model=args.model, tokenizer=args.tokenizer, oracle_lora="random", targets=args.targets,
        questions=args.questions, num_targets=args.num_targets, device=device,
        dtype="bfloat16" if device == "cuda" else "float32", batch_rows=rows, merge_lora=not args.no_merge,
        answer_lengths=args.answer_lengths))
    t = time.perf_counter()
    oracle = load_oracle(config)
    load_s = round(time.perf_counter() - t, 1)
    plan, _ = build_plan(config, oracle.tokenizer)
    decoding = planned_decoding(config, oracle.tokenizer)
    acts = capture_targets(oracle, {r.target_id: r for r in plan.runs}.values())
    lengths = load_answer_lengths(args.answer_lengths) if args.answer_lengths else None
    queries = [Query(key=r.run_id, input_ids=tuple(r.oracle_input_ids), n=config.samples_per_query,
                     vectors_KD=acts[r.target_id], positions_K=tuple(r.placeholder_positions),
                     answer_lengths=None if lengths is None else answer_lengths_for(
                         lengths, seed=0, run_id=r.run_id, n=config.samples_per_query,
                         max_new_tokens=decoding.max_new_tokens))
               for r in plan.runs]
    return Workload(config, oracle, decoding, queries, device, load_s)


def print_result(out: dict, json_path: Path | None) -> None:
    """The bench's JSON object, with the peak GPU memory, printed (and written to ``json_path``)."""
    if torch.cuda.is_available():
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    text = json.dumps(out, indent=1)
    print(text)
    if json_path:
        json_path.write_text(text)
