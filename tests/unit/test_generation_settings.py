"""engine/decoding/settings.py: the run's decoding over the model's generation_config over HF's defaults (no model)."""

from __future__ import annotations

import re

import pytest
from transformers import GenerationConfig

from ao_resampling.config import ConfigError, build_config
from ao_resampling.engine.decoding.settings import UNSUPPORTED_FIELDS, UnsupportedGenerationConfig, resolve_decoding
from ao_resampling.results import Decoding

GEMMA_3_27B_IT = dict(do_sample=True, top_k=64, top_p=0.95, eos_token_id=[1, 106], bos_token_id=2, pad_token_id=0)


def resolve(config, top_k=None, fallback=(1,), temperature=0.7):
    return resolve_decoding(config, temperature=temperature, top_p=0.9, top_k=top_k, max_new_tokens=120, seed=0,
                            fallback_eos=fallback)


def test_the_real_checkpoints_generation_config_gives_upstreams_decoding():
    sampling = resolve(GenerationConfig(**GEMMA_3_27B_IT))
    assert (sampling.temperature, sampling.top_k, sampling.top_p, sampling.eos_token_ids) == (0.7, 64, 0.9, (1, 106))


@pytest.mark.parametrize("run_top_k,expected", [(None, 64), (0, 0), (5, 5)])
def test_the_runs_top_k_overrides_the_models(run_top_k, expected):
    assert resolve(GenerationConfig(**GEMMA_3_27B_IT), top_k=run_top_k).top_k == expected


def test_no_model_top_k_is_hfs_default_and_no_eos_falls_back_to_the_tokenizers():
    sampling = resolve(GenerationConfig(), fallback=(106, 1))
    assert (sampling.top_k, sampling.eos_token_ids) == (50, (1, 106))
    assert resolve(None, fallback=(1,)).eos_token_ids == (1,)
    assert resolve(GenerationConfig(eos_token_id=7)).eos_token_ids == (7,)


@pytest.mark.parametrize("field,value", [("repetition_penalty", 1.1), ("min_p", 0.05), ("typical_p", 0.9),
                                         ("no_repeat_ngram_size", 3), ("bad_words_ids", [[5]]),
                                         ("suppress_tokens", [3]), ("num_beams", 2), ("min_new_tokens", 4)])
def test_a_field_that_changes_sampling_is_refused_by_name(field, value):
    with pytest.raises(UnsupportedGenerationConfig, match=re.escape(f"{field}={value!r}")):
        resolve(GenerationConfig(**GEMMA_3_27B_IT, **{field: value}))


def test_default_values_of_those_fields_are_accepted():
    defaults = {"repetition_penalty": 1.0, "typical_p": 1.0, "no_repeat_ngram_size": 0, "num_beams": 1}
    assert set(defaults) <= set(UNSUPPORTED_FIELDS)
    assert resolve(GenerationConfig(**GEMMA_3_27B_IT, **defaults)).top_k == 64


def test_a_decoding_written_before_top_k_and_eos_were_recorded_still_loads():
    old = Decoding.model_validate({"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 120, "seed": 0})
    assert (old.top_k, old.eos_token_ids) == (None, None)
    new = Decoding.model_validate(old.model_dump() | {"top_k": 64, "eos_token_ids": [1, 106]})
    assert (new.top_k, new.eos_token_ids) == (64, (1, 106))


def test_top_k_setting_and_cli_flag():
    assert build_config(overrides={"top_k": 0}).top_k == 0 and build_config().top_k is None
    with pytest.raises(ConfigError, match="field 'top_k'"):
        build_config(overrides={"top_k": -1})


def test_top_k_cli_flag_reaches_the_config(monkeypatch):
    from typer.testing import CliRunner

    from ao_resampling import cli, pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "run_experiment", lambda config, *a, **k: seen.setdefault("config", config) and 1 / 0)
    CliRunner().invoke(cli.app, ["run", "--top-k", "7", "--no-judge", "--out", "/nonexistent/x"])
    assert seen["config"].top_k == 7


def test_a_decoding_without_the_effective_fields_dumps_as_before():
    """Resumed stages compare dumped decodings (baseline meta): an unset top_k / eos must not make them differ."""
    before = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 240, "do_sample": True, "seed": 0}
    assert Decoding(**before).model_dump(mode="json") == before
    assert Decoding(**before, top_k=64).model_dump(mode="json") == before | {"top_k": 64}


@pytest.mark.parametrize("value", [-5, 10.7, "abc", True])
def test_a_top_k_hf_would_refuse_is_refused_naming_it(value):
    with pytest.raises(UnsupportedGenerationConfig, match=re.escape(f"top_k={value!r}")):
        resolve(GenerationConfig(**dict(GEMMA_3_27B_IT, top_k=value)))


@pytest.mark.parametrize("field,value", [("stop_strings", ["\n\n"]), ("max_time", 5.0), ("dola_layers", "low")])
def test_stopping_criteria_the_sampler_lacks_are_refused_by_name(field, value):
    with pytest.raises(UnsupportedGenerationConfig, match=re.escape(f"{field}={value!r}")):
        resolve(GenerationConfig(**GEMMA_3_27B_IT, **{field: value}))


def test_the_runs_eos_ids_come_from_the_model_and_an_empty_list_falls_back_to_the_tokenizers():
    assert resolve(GenerationConfig(**dict(GEMMA_3_27B_IT, eos_token_id=[]))).eos_token_ids == (1,)
    assert resolve(GenerationConfig(**GEMMA_3_27B_IT), fallback=(7,)).eos_token_ids == (1, 106), \
        "the model's stop ids replace the tokenizer's, they are not added to them"


def test_greedy_decoding_records_top_k_and_top_p_off():
    greedy = resolve(GenerationConfig(**GEMMA_3_27B_IT), temperature=0)
    assert (greedy.do_sample, greedy.top_k, greedy.top_p) == (False, 0, 1.0)


def test_the_decoding_is_one_immutable_value():
    import pydantic

    decoding = resolve(GenerationConfig(**GEMMA_3_27B_IT))
    with pytest.raises(pydantic.ValidationError):
        decoding.temperature = 1.0
    assert decoding.is_resolved and decoding.model_dump() == {
        "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 120, "do_sample": True, "seed": 0, "top_k": 64,
        "eos_token_ids": (1, 106)}
