"""The generate stage: the oracle's answers to every planned run, each run journaled once its answers are in.

``generate`` samples the runs still missing answers (``pending_runs``): it reads each target's activations with the
base model (``capture_targets``, adapter off) and has the oracle answer with them injected (engine/decoding/sampler.py's
``Sampler``, or the plain sequential reference); under torchrun, ranks.py hands each rank its share
(``runs_filter``) and its own journal. Loading the model and running the sampler are common/sampling.py's, shared
with the target-model baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ao_resampling.config import ExperimentConfig
from ao_resampling.engine.decoding.sampler import Layout, Query, Sample
from ao_resampling.engine.hooks import capture_activations_at
from ao_resampling.engine.loading import models
from ao_resampling.engine.reference import sample_sequential
from ao_resampling.errors import PipelineError
from ao_resampling.events import responses_event
from ao_resampling.inputs.answer_lengths import answer_lengths_for, load_answer_lengths
from ao_resampling.results import Results, Run
from ao_resampling.stages.common.sampling import load_oracle, loaded_decoding, make_sampler, run_sampler, to_responses
from ao_resampling.store import ResultsStore

CAPTURE_BATCH = 32  # targets are short; a few passes over half the model, not one per handful


def pending_runs(results: Results, n: int) -> list[Run]:
    return [r for r in results.runs if len(r.responses) < n]


def generate(store: ResultsStore, config: ExperimentConfig, *, oracle: models.LoadedOracle | None = None,
             progress: bool = True, runs_filter: Callable[[Run], bool] | None = None,
             last_use: bool = False) -> Layout | None:
    """Sample the missing answers; each run is journaled (and kept in ``store.results``) once its n answers are in.
    Returns how the stage decoded (None if nothing was left to sample). ``last_use``: the caller will not use
    ``oracle`` again (a model loaded here is not either): the LoRA stays merged, no copy of the base weights."""
    results = store.results
    todo = [r for r in pending_runs(results, config.samples_per_query) if runs_filter is None or runs_filter(r)]
    if not todo:
        return None
    if oracle is None:
        oracle, last_use = load_oracle(config), True
    if oracle.read_layer != results.meta.layer:
        raise PipelineError(f"the model reads layer {oracle.read_layer} ({config.layer_percent}%), the plan says "
                            f"{results.meta.layer}")
    decoding = loaded_decoding(oracle, config, results.meta.decoding, where=str(store.results_path))
    lengths = load_answer_lengths(config.answer_lengths) if config.answer_lengths else None
    acts = capture_targets(oracle, {r.target_id: r for r in todo}.values())
    n = config.samples_per_query
    queries = [Query(key=r.run_id, input_ids=tuple(r.oracle_input_ids), n=n, vectors_KD=acts[r.target_id],
                     positions_K=tuple(r.placeholder_positions),
                     answer_lengths=None if lengths is None else answer_lengths_for(
                         lengths, seed=config.decode_seed, run_id=r.run_id, n=n,
                         max_new_tokens=decoding.max_new_tokens))
               for r in todo]

    def journal(run_id: str, samples: list[Sample]) -> None:
        store.record([responses_event(run_id, to_responses(run_id, samples, decoding))])

    if config.sampler == "sequential":
        for q in queries:  # one query at a time, journaled as it finishes
            for key, samples in sample_sequential(oracle.model, oracle.tokenizer, [q],
                                                  injection_layer=oracle.injection_layer,
                                                  coefficient=config.steering_coefficient,
                                                  decoding=decoding).items():
                journal(key, samples)
        return Layout(rows=1, rows_setting="sequential", runs=len(queries))
    sampler = make_sampler(oracle, config, decoding, last_use=last_use)
    run_sampler(sampler, queries, on_answers=journal, progress=progress,
                resume="re-run the same command to continue")
    return sampler.layout


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
