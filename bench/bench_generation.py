"""Generation-stage benchmark: sequential vs plain HF batching vs the batched sampler, same process, same model.

    python bench/bench_generation.py --model synthetic:gemma-3-27b --tokenizer DIR \
        --targets target_model_queries.json --questions sycophancy_questions.json --full

Answers are forced to max_new_tokens (min_new_tokens = max_new_tokens) so every variant does the worst-case work;
``--eos-rate 0.03`` instead makes the random model end its answers at <end_of_turn> ~3% of steps (loading/end_gate.py), so
rows finish at varied lengths and are dropped as real answers are (tokens/s then counts max_new_tokens per sample:
an upper bound). Decoding is the model's generation_config merged with T=0.7, top_p 0.9 (``--top-k`` overrides).
On a random-weight model the numbers are about speed only. Prints one table; --json writes all numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ao_resampling.inputs import data
from ao_resampling.engine.loading import adapters, models
from ao_resampling.inputs.encoding import encode_target
from ao_resampling.engine.hooks import capture_activations
from ao_resampling.inputs.oracle import build_oracle_query
from ao_resampling.stages.generate import CAPTURE_BATCH
from ao_resampling.engine.reference import sample_hf_batched, sample_sequential
from ao_resampling.engine.decoding.sampler import BatchedSampler, DecodeParams, Query


# Batched-sampler variants: each is one set of BatchedSampler options, named for the lever it changes.
VARIANTS = {
    "merged": dict(merge_lora=True),  # LoRA merged, static cache, gqa_attention, CUDA graphs
    "fused": dict(merge_lora=True, fused=True),  # the same with fused elementwise kernels (fused.py)
    "merged_no_graphs": dict(merge_lora=True, cuda_graphs=False),  # the same, every decode step launched from Python
    "merged_hf_attention": dict(merge_lora=True, attention="hf"),  # the model's own SDPA + repeat_kv on decode
    "unmerged": dict(merge_lora=False),  # LoRA kept as adapter modules while decoding
    "dynamic": dict(merge_lora=True, static_cache=False),  # HF's growing cache (and so its own attention)
}


@dataclass
class Row:
    variant: str
    samples: int
    seconds: float
    samples_per_s: float
    tokens_per_s: float
    peak_gib: float
    ratio_to_sequential: float | None = None


def build_queries(tokenizer, model, layer: int, targets, questions, n_queries: int, n: int) -> list[Query]:
    encoded = [encode_target(tokenizer, [m.model_dump() for m in t.messages], target_id=t.id) for t in targets]
    acts = []
    for start in range(0, len(encoded), CAPTURE_BATCH):
        chunk = encoded[start:start + CAPTURE_BATCH]
        acts.append(capture_activations(model, [e.input_ids for e in chunk], [e.assistant_start_idx for e in chunk],
                                        layer, tokenizer.pad_token_id))
    acts_TD = torch.cat(acts)
    oracle_queries = [build_oracle_query(tokenizer, layer=layer, question=q.text, question_id=q.id) for q in questions]
    queries = []
    for i in range(n_queries):
        t, q = divmod(i, len(oracle_queries))
        oq = oracle_queries[q]
        queries.append(Query(key=f"run__{targets[t % len(targets)].id}__{oq.question_id}__{i}",
                             input_ids=tuple(oq.input_ids), n=n, vectors_KD=acts_TD[t % len(targets)][None],
                             positions_K=tuple(oq.placeholder_positions)))
    return queries


def check_greedy(model, tokenizer, queries: list[Query], max_new_tokens: int, min_new_tokens: int) -> None:
    """Greedy answers, one per query: the fast path with and without CUDA graphs, and plain HF ``generate``."""
    one = [Query(q.key, q.input_ids, 1, q.vectors_KD, q.positions_K) for q in queries]
    params = DecodeParams(temperature=0, top_p=0.9, max_new_tokens=max_new_tokens, seed=0,
                          min_new_tokens=min_new_tokens)

    def fast(**kwargs):
        sampler = BatchedSampler(model, tokenizer, injection_layer=1, coefficient=1.0, params=params,
                                 merge_lora=True, **kwargs)
        return {k: v[0].token_ids for k, v in sampler.run(one, progress=False).items()}

    graphs, eager, fused = fast(), fast(cuda_graphs=False), fast(fused=True)
    hf_attention = fast(attention="hf", cuda_graphs=False)
    plain = {k: v[0].token_ids for k, v in sample_hf_batched(model, tokenizer, one, injection_layer=1,
                                                             coefficient=1.0, params=params).items()}

    def agreement(a: dict, b: dict) -> str:
        same_rows = sum(a[k] == b[k] for k in a)
        prefix = [next((i for i, (x, y) in enumerate(zip(a[k], b[k])) if x != y), len(a[k])) for k in a]
        return f"{same_rows}/{len(a)} answers identical, first difference at token {min(prefix)} at the earliest"

    print(f"greedy check, {len(one)} queries x {max_new_tokens} tokens:")
    print(f"  CUDA graphs vs eager decode steps:          {agreement(graphs, eager)}")
    print(f"  gqa vs HF attention (both fast path):       {agreement(eager, hf_attention)}")
    print(f"  fast path (HF attention) vs HF generate:    {agreement(hf_attention, plain)}")
    print(f"  fast path (unfused) vs HF generate:         {agreement(graphs, plain)}")
    print(f"  fast path (fused kernels) vs HF generate:   {agreement(fused, plain)}", flush=True)


def check_noise(bench: "Bench", n_queries: int) -> None:
    """Per variant, max |d log-prob| vs HF at batch 1, next to HF at batch N vs batch 1 (engine/noise.py)."""
    from ao_resampling.engine.noise import noise_check

    one = [Query(q.key, q.input_ids, 1, q.vectors_KD, q.positions_K) for q in bench.queries[:n_queries]]
    answers = bench.sampler("merged", 512).run(one, progress=False)  # the tokens fed: sampled answers, forced length
    tokens_QT = torch.tensor([answers[q.key][0].token_ids for q in one])
    print(f"noise criterion, {len(one)} queries x {tokens_QT.shape[1]} teacher-forced steps:")
    for variant in bench.args.variants.split(","):
        print(f"  {variant}: {noise_check(bench.sampler(variant, 512), one, tokens_QT).summary()}", flush=True)


def timed(fn, device) -> tuple[float, float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return time.perf_counter() - t, peak, out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic:gemma-3-27b")
    ap.add_argument("--tokenizer", default="gemma3-270m-gguf")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--targets", type=Path, default=None)
    ap.add_argument("--questions", type=Path, default=None)
    ap.add_argument("--num-targets", type=int, default=100)
    ap.add_argument("--num-questions", type=int, default=10)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=120)
    ap.add_argument("--queries", type=int, default=100, help="queries per batched variant (x samples = rows)")
    ap.add_argument("--budgets", default="512,1024", help="max_rows values for the batched sampler")
    ap.add_argument("--tokens-per-row", type=int, default=200, help="max_tokens = max_rows x this")
    ap.add_argument("--sequential-samples", type=int, default=3)
    ap.add_argument("--hf-rows", type=int, default=0, help="rows for one plain HF generate batch (0 = skip)")
    ap.add_argument("--variants", default="merged,merged_hf_attention",
                    help=f"batched variants, comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--full", action="store_true", help="also the whole stage (num_targets x num_questions queries)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of a few decode steps")
    ap.add_argument("--check", type=int, default=0,
                    help="first compare greedy answers to this many queries: graphs vs none, fast path vs HF generate")
    ap.add_argument("--noise", type=int, default=0,
                    help="teacher-force this many queries (max_new_tokens steps) through each variant and HF at batch "
                         "1 and batch N: the numerical-noise criterion for fused kernels (engine/noise.py)")
    ap.add_argument("--top-k", type=int, default=None, help="default: the model's generation_config; 0 = off")
    ap.add_argument("--eos-rate", type=float, default=0.0,
                    help="> 0: answers end at <end_of_turn> with this per-step probability (not forced to full length)")
    ap.add_argument("--phase-batches", type=int, default=3, help="bench_stage_phases.py: batches timed per variant")
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args()


class Bench:
    """One model, its queries and decoding, and the table of timed variants."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        t0 = time.perf_counter()
        self.tokenizer = models.load_tokenizer(args.tokenizer)
        base = models.load_model(args.model, dtype=args.dtype, device=args.device)
        self.model = adapters.attach_oracle(base, "random", rank=args.lora_rank)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.load_s = time.perf_counter() - t0
        self.n_layers = models.num_layers(self.model)
        layer = models.layer_at_percent(self.n_layers, 50)
        self.targets = data.select_targets(data.load_targets(args.targets), args.num_targets)
        pool = data.load_question_pool(args.questions)
        questions = data.sample_questions(pool, min(args.num_questions, len(pool)), 0)
        self.capture_s, _, self.queries = timed(
            lambda: build_queries(self.tokenizer, self.model, layer, self.targets, questions,
                                  args.num_targets * len(questions), args.samples), self.device)
        self.min_new_tokens = 0 if args.eos_rate else args.max_new_tokens
        self.params = DecodeParams(temperature=0.7, top_p=0.9, max_new_tokens=args.max_new_tokens, seed=0,
                                   min_new_tokens=self.min_new_tokens, top_k=args.top_k)
        self.rows: list[Row] = []

    def record(self, variant: str, n_samples: int, seconds: float, peak: float) -> None:
        self.rows.append(Row(variant, n_samples, seconds, n_samples / seconds,
                             n_samples * self.args.max_new_tokens / seconds, peak))
        print(f"  {variant}: {n_samples} samples in {seconds:.1f}s", flush=True)

    def sampler(self, variant: str, budget: int, params: DecodeParams | None = None) -> BatchedSampler:
        return BatchedSampler(self.model, self.tokenizer, injection_layer=1, coefficient=1.0,
                              params=params or self.params, max_rows=budget,
                              max_tokens=budget * self.args.tokens_per_row, **VARIANTS[variant])

    def end_answers(self) -> None:
        from ao_resampling.engine.decoding.sampler import effective_sampling
        from ao_resampling.engine.loading.end_gate import end_answers_at_rate

        rate = self.args.eos_rate
        stop_id = end_answers_at_rate(self.model, effective_sampling(self.model, self.tokenizer, self.params), rate)
        print(f"eos mode: token {stop_id} wins at {rate:.0%} of decode steps")

    def references(self) -> None:
        """The plain HF paths: one sample per generate call, and one padded generate batch."""
        args, model, tokenizer = self.args, self.model, self.tokenizer
        if args.sequential_samples:
            one = [Query(q.key, q.input_ids, 1, q.vectors_KD, q.positions_K)
                   for q in self.queries[: args.sequential_samples]]
            sample_sequential(model, tokenizer, one[:1], injection_layer=1, coefficient=1.0,
                              params=DecodeParams(0.7, 0.9, 4, 0))  # warm-up
            s, peak, _ = timed(lambda: sample_sequential(model, tokenizer, one, injection_layer=1, coefficient=1.0,
                                                         params=self.params), self.device)
            self.record("sequential (1 sample / generate call)", len(one), s, peak)
        if args.hf_rows:
            chunk = self.queries[: max(1, args.hf_rows // args.samples)]
            s, peak, _ = timed(lambda: sample_hf_batched(model, tokenizer, chunk, injection_layer=1, coefficient=1.0,
                                                         params=self.params), self.device)
            self.record(f"HF generate, {len(chunk) * args.samples} rows", len(chunk) * args.samples, s, peak)

    def variants(self) -> tuple[float, str, int] | None:
        """Every batched variant at every row budget; returns the fastest as (samples/s, variant, budget)."""
        args, subset, best = self.args, self.queries[: self.args.queries], None
        for variant in args.variants.split(","):
            for budget in (int(b) for b in args.budgets.split(",")):
                sampler = self.sampler(variant, budget)
                s, peak, out = timed(lambda: sampler.run(subset, progress=False), self.device)
                self.record(f"batched {variant}, max_rows {budget}", len(subset) * args.samples, s, peak)
                if args.eos_rate:
                    lengths = sorted(x.n_tokens for v in out.values() for x in v)
                    n_eos = sum(x.finish_reason == "eos" for v in out.values() for x in v)
                    print(f"    lengths min {lengths[0]} median {lengths[len(lengths) // 2]} max {lengths[-1]}, "
                          f"{n_eos}/{len(lengths)} ended at eos", flush=True)
                if best is None or self.rows[-1].samples_per_s > best[0]:
                    best = (self.rows[-1].samples_per_s, variant, budget)
        return best

    def profile(self, variant: str, budget: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        sampler = self.sampler(variant, budget, DecodeParams(0.7, 0.9, 32, 0, min_new_tokens=32))
        chunk = self.queries[: budget // self.args.samples]
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with sampler.stage():  # merged once, outside the profile: a real run merges once per stage
            sampler.generate(chunk)  # warm-up
            with profile(activities=activities) as prof:
                s, _, _ = timed(lambda: sampler.generate(chunk), self.device)
        sort_by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        print(f"\nprofile: {variant}, {len(chunk) * self.args.samples} rows x 32 steps in {s:.2f}s")
        print(prof.key_averages().table(sort_by=sort_by, row_limit=18, max_name_column_width=60))

    def full_stage(self, variant: str, budget: int) -> None:
        sampler = self.sampler(variant, budget)
        s, peak, _ = timed(lambda: sampler.run(self.queries, progress=False), self.device)
        self.record(f"FULL STAGE: batched {variant}, max_rows {budget}", len(self.queries) * self.args.samples, s,
                    peak)

    def report(self) -> None:
        args, rows = self.args, self.rows
        seq = next((r for r in rows if r.variant.startswith("sequential")), None)
        for r in rows:
            r.ratio_to_sequential = r.samples_per_s / seq.samples_per_s if seq else None
        name = torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu"
        lengths = (f"answers end at eos ({args.eos_rate:.0%} a step), at most {args.max_new_tokens} tokens"
                   if args.eos_rate else f"{args.max_new_tokens} tokens forced per sample")
        print(f"\n{args.model} ({self.n_layers} layers, LoRA r={args.lora_rank}) on {name}; load {self.load_s:.1f}s; "
              f"capture of {len(self.targets)} targets {self.capture_s:.2f}s; {lengths}")
        print(f"{'variant':<44} {'samples':>7} {'s':>8} {'samples/s':>10} {'tokens/s':>9} {'peak GiB':>9} {'x seq':>7}")
        for r in rows:
            ratio = f"{r.ratio_to_sequential:.0f}" if r.ratio_to_sequential else "-"
            print(f"{r.variant:<44} {r.samples:>7} {r.seconds:>8.1f} {r.samples_per_s:>10.2f} {r.tokens_per_s:>9.0f} "
                  f"{r.peak_gib:>9.1f} {ratio:>7}")
        if args.json:
            args.json.write_text(json.dumps({"device": name, "model": args.model, "load_s": self.load_s,
                                             "capture_s": self.capture_s, "rows": [asdict(r) for r in rows]},
                                            indent=1))


def main() -> None:
    args = parse_args()
    bench = Bench(args)
    if args.eos_rate:
        bench.end_answers()
    bench.references()
    if args.check:
        check_greedy(bench.model, bench.tokenizer, bench.queries[: args.check], args.max_new_tokens,
                     bench.min_new_tokens)
    if args.noise:
        check_noise(bench, args.noise)
    best = bench.variants()
    if args.profile and best:
        bench.profile(*best[1:])
    if args.full and best:
        bench.full_stage(*best[1:])
    bench.report()


if __name__ == "__main__":
    main()
