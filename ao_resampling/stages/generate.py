"""The generate stage: the oracle's answers to every planned run, batched, each finished batch journaled.

``generate`` samples the runs still missing answers (``pending_runs``): it reads each target's activations with the
base model (``capture_targets``, adapter off) and has the oracle answer with them injected (engine/decoding/sampler.py's
``BatchedSampler``, or the plain sequential reference); under torchrun, ranks.py hands each rank its share
(``runs_filter``) and its own journal. ``load_oracle`` loads the model a config names; ``to_responses`` is how sampled
answers are stored (the target-model baseline stores its replies the same way).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ao_resampling.config import ExperimentConfig
from ao_resampling.engine.loading import adapters, models
from ao_resampling.engine.hooks import capture_activations_at
from ao_resampling.engine.reference import sample_sequential
from ao_resampling.engine.decoding.sampler import BatchedSampler, DecodeParams, Query, Sample, effective_sampling
from ao_resampling.errors import PipelineError
from ao_resampling.results import Decoding, Response, Results, Run
from ao_resampling.stages.plan import decoding
from ao_resampling.events import responses_event
from ao_resampling.store import ResultsStore

CAPTURE_BATCH = 32  # targets are short; a few passes over half the model, not one per handful


def pending_runs(results: Results, n: int) -> list[Run]:
    return [r for r in results.runs if len(r.responses) < n]


def to_responses(run_id: str, samples: list[Sample], decode: Decoding) -> list[dict]:
    return [Response(sample_id=f"{run_id}__s{i:02d}", text=s.text, decoding=decode, n_tokens=s.n_tokens,
                     finish_reason=s.finish_reason, text_stripped=False).model_dump(mode="json")
            for i, s in enumerate(samples)]


def generate(store: ResultsStore, config: ExperimentConfig, *, oracle: models.LoadedOracle | None = None,
             progress: bool = True, runs_filter: Callable[[Run], bool] | None = None) -> int:
    """Sample the missing answers; each finished batch is journaled. Returns how many runs were sampled."""
    results = store.load()
    todo = [r for r in pending_runs(results, config.samples_per_query) if runs_filter is None or runs_filter(r)]
    if not todo:
        return 0
    oracle = oracle or load_oracle(config)
    if oracle.read_layer != results.meta.layer:
        raise PipelineError(f"the model reads layer {oracle.read_layer} ({config.layer_percent}%), the plan says "
                            f"{results.meta.layer}")
    acts = capture_targets(oracle, {r.target_id: r for r in todo}.values())
    queries = [Query(key=r.run_id, input_ids=tuple(r.oracle_input_ids), n=config.samples_per_query,
                     vectors_KD=acts[r.target_id], positions_K=tuple(r.placeholder_positions)) for r in todo]
    params = decode_params(config)
    decode = decoding(config, effective_sampling(oracle.model, oracle.tokenizer, params))
    planned = results.meta.decoding
    if planned is not None and planned.top_k is not None and planned != decode:  # older plans did not record it
        raise PipelineError(f"the loaded model decodes with {decode.model_dump()}, but the plan in "
                            f"{store.results_path} recorded {planned.model_dump()} (its generation_config changed?)")

    def journal(batch: dict[str, list[Sample]]) -> None:
        store.journal.append_many([responses_event(run_id, to_responses(run_id, samples, decode))
                                   for run_id, samples in batch.items()])

    if config.sampler == "sequential":
        for q in queries:  # one query at a time, journaled as it finishes
            journal(sample_sequential(oracle.model, oracle.tokenizer, [q], injection_layer=oracle.injection_layer,
                                      coefficient=config.steering_coefficient, params=params))
    else:
        batched_sampler(oracle, config, params).run(queries, on_batch=journal, progress=progress)
    return len(todo)


def decode_params(config: ExperimentConfig, max_new_tokens: int | None = None) -> DecodeParams:
    """The run's sampling settings for the sampler (the model's generation_config fills what they leave open)."""
    return DecodeParams(temperature=config.temperature, top_p=config.top_p, seed=config.decode_seed,
                        max_new_tokens=config.max_new_tokens if max_new_tokens is None else max_new_tokens,
                        top_k=config.top_k)


def batched_sampler(oracle: models.LoadedOracle, config: ExperimentConfig, params: DecodeParams, *,
                    use_adapter: bool = True) -> BatchedSampler:
    """The fast sampler with the run's batch budgets; ``use_adapter=False`` samples the base model (the baseline)."""
    return BatchedSampler(oracle.model, oracle.tokenizer, injection_layer=oracle.injection_layer,
                          coefficient=config.steering_coefficient, params=params, max_rows=config.batch_rows,
                          max_tokens=config.batch_tokens, use_adapter=use_adapter, merge_lora=config.merge_lora,
                          fused=config.fused_kernels)


def load_oracle(config: ExperimentConfig) -> models.LoadedOracle:
    """The base model with the oracle adapter, as ``config`` names them (engine/loading/adapters.py loads)."""
    return adapters.load_oracle(model=config.model, tokenizer=config.tokenizer, oracle_lora=config.oracle_lora,
                                dtype=config.dtype, device=config.device, device_map=config.device_map,
                                layer_percent=config.layer_percent, injection_layer=config.injection_layer)


def capture_targets(oracle: models.LoadedOracle, runs: Iterable[Run]) -> dict[str, torch.Tensor]:
    """The base model's residual (adapter off) at each target's read positions -> {target_id: acts_KD}.

    The K positions of a run (its ``context_positions``, resolved from the position rule) are read in one pass;
    vector k goes to placeholder k. Every run of a plan shares K, so a chunk is one rectangular batch.
    """
    runs = list(runs)
    acts: dict[str, torch.Tensor] = {}
    for start in range(0, len(runs), CAPTURE_BATCH):
        chunk = runs[start:start + CAPTURE_BATCH]
        acts_BKD = capture_activations_at(oracle.model, [r.context_input_ids for r in chunk],
                                          [r.context_positions for r in chunk], oracle.read_layer,
                                          oracle.tokenizer.pad_token_id)
        acts.update({r.target_id: a for r, a in zip(chunk, acts_BKD)})
    return acts
