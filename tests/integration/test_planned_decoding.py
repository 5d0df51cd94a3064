"""meta.decoding is the decoding the answers were drawn with: planned from the model's files, checked on load."""

from __future__ import annotations

import pytest

from ao_resampling import pipeline
from ao_resampling.errors import PipelineError
from ao_resampling.stages.generate import generate, load_oracle
from ao_resampling.stages.plan import prepare
from ao_resampling.config import build_config
from ao_resampling.results import load_results_file


def tiny(tmp_path, **overrides):
    settings = dict(model="synthetic:tiny", oracle_lora="random", dtype="float32", device="cpu", num_targets=2,
                    num_questions=1, samples_per_query=2, max_new_tokens=2, judge=False, embedding_model="none")
    return build_config(preset="experiment", overrides={**settings, **overrides})


@pytest.mark.parametrize("top_k, expected", [(None, 64), (5, 5), (0, 0)], ids=["model's", "run's", "off"])
def test_meta_and_every_response_record_the_effective_decoding(tmp_path, top_k, expected):
    config = tiny(tmp_path, top_k=top_k)
    pipeline.run_experiment(config, tmp_path / "run", progress=False, log=lambda _: None)
    results = load_results_file(tmp_path / "run" / "results.json")
    meta = results.meta.decoding
    # synthetic stand-ins carry google/gemma-3-27b-it's generation_config: top_k 64, eos [1, 106]
    assert (meta.top_k, meta.eos_token_ids) == (expected, [1, 106])
    assert all(r.decoding == meta for run in results.runs for r in run.responses)


def test_a_model_that_decodes_otherwise_than_planned_is_refused(tmp_path):
    config = tiny(tmp_path)
    store, _ = prepare(config, tmp_path / "run")
    oracle = load_oracle(config)
    oracle.model.get_base_model().generation_config.top_k = 3  # as if its generation_config.json had been edited
    with pytest.raises(PipelineError, match="'top_k': 3"):
        generate(store, config, oracle=oracle, progress=False)
