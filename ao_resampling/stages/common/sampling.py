"""How a stage samples with the loaded model, shared by the AO answers (stages/generate.py) and the target model's own
replies (stages/baseline.py): the model a config names (``load_oracle``), the plan's decoding checked against it
(``loaded_decoding``), the sampler with the run's row count (``make_sampler``; the adapter off for the baseline), its
memory failures as the tool's errors (``run_sampler``), and how sampled answers are stored (``to_responses``).
"""

from __future__ import annotations

import torch

from ao_resampling.config import Decoding, ExperimentConfig
from ao_resampling.engine.decoding import triton_kernels
from ao_resampling.engine.decoding.memory import BatchTooLarge
from ao_resampling.engine.decoding.sampler import Query, Sample, Sampler
from ao_resampling.engine.decoding.settings import model_generation_config, run_decoding
from ao_resampling.engine.loading import adapters, models
from ao_resampling.errors import PipelineError
from ao_resampling.results import Response


def to_responses(run_id: str, samples: list[Sample], decode: Decoding) -> list[dict]:
    return [Response(sample_id=f"{run_id}__s{i:02d}", text=s.text, decoding=decode, n_tokens=s.n_tokens,
                     finish_reason=s.finish_reason, text_stripped=False).model_dump(mode="json")
            for i, s in enumerate(samples)]


def run_sampler(sampler: Sampler, queries: list[Query], *, resume: str, **kwargs) -> dict[str, list[Sample]]:
    """``sampler.run``, its memory failures as the tool's errors: a row count that cannot fit is refused before any
    decoding; an out-of-memory error that still happens ends in one line (the runs journaled before it are kept)."""
    try:
        return sampler.run(queries, **kwargs)
    except BatchTooLarge as e:
        raise PipelineError(f"{e}; lower --batch-rows or leave it at 'auto'") from e
    except torch.OutOfMemoryError as e:
        first = str(e).splitlines()[0] if str(e) else "CUDA out of memory"
        raise PipelineError(f"out of GPU memory while decoding ({first}); every run journaled before it is kept: "
                            f"{resume} with a smaller --batch-rows") from e


def make_sampler(oracle: models.LoadedOracle, config: ExperimentConfig, decoding: Decoding, *,
                 use_adapter: bool = True, last_use: bool = False) -> Sampler:
    """The sampler with the run's row count; ``use_adapter=False`` samples the base model (the baseline);
    ``last_use``: nothing uses the model after this stage (the LoRA stays merged, no copy of the base weights)."""
    return Sampler(oracle.model, oracle.tokenizer, decoding=decoding, injection_layer=oracle.injection_layer,
                   coefficient=config.steering_coefficient, rows=config.batch_rows, use_adapter=use_adapter,
                   merge_lora=config.merge_lora, last_use=last_use)


def loaded_decoding(oracle: models.LoadedOracle, config: ExperimentConfig, planned: Decoding | None, *,
                    where: str) -> Decoding:
    """The plan's decoding, checked against the loaded model's generation_config (it may have changed since the
    plan was written). A plan of an older version that did not record the merge gets it from the loaded model."""
    loaded = run_decoding(config, model_generation_config(oracle.model),
                          fallback_eos=models.stop_token_ids(oracle.tokenizer))
    if planned is None or not planned.is_resolved:
        return loaded
    if planned.model_dump() != loaded.model_dump():
        raise PipelineError(f"the loaded model decodes with {loaded.model_dump()}, but the plan in {where} recorded "
                            f"{planned.model_dump()} (its generation_config changed?)")
    return planned


def load_oracle(config: ExperimentConfig) -> models.LoadedOracle:
    """The base model with the oracle adapter, as ``config`` names them (engine/loading/adapters.py loads). On one
    GPU the decode step's Triton kernels compile on a thread of their own meanwhile (``compile_kernels_early``)."""
    if config.device.startswith("cuda") and not config.device_map:
        compile_kernels_early(config)
    return adapters.load_oracle(model=config.model, tokenizer=config.tokenizer, oracle_lora=config.oracle_lora,
                                dtype=config.dtype, device=config.device, device_map=config.device_map,
                                layer_percent=config.layer_percent, injection_layer=config.injection_layer)


def compile_kernels_early(config: ExperimentConfig) -> None:
    """Start compiling the Triton kernels the sampler's decode step will use for the configured model (its sizes
    from its config alone), so a machine's first process does not compile them inside the first stage."""
    try:
        text = models.model_text_config(config.model)
    except models.ModelLoadError:
        return  # the load that follows says what is wrong with the model
    triton_kernels.compile_in_background(torch.device(config.device), hidden_size=text.hidden_size,
                                         head_dim=models.head_dim(text), query_heads=text.num_attention_heads,
                                         kv_heads=text.num_key_value_heads, dtype=models.DTYPES[config.dtype])
