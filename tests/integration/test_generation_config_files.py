"""The plan records the decoding HF generate will do, read from the model's files before any weights load."""

from __future__ import annotations

import json

import pytest

from ao_resampling.engine.loading import models
from ao_resampling.engine.decoding.settings import UnsupportedGenerationConfig


def write_model_dir(tmp_path, generation: dict | None):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "eos_token_id": 1,
                                                      "bos_token_id": 2, "pad_token_id": 0}))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return str(tmp_path)


def test_the_checkpoints_generation_config_file_is_read(tmp_path):
    spec = write_model_dir(tmp_path, {"do_sample": True, "top_k": 7, "top_p": 0.5, "eos_token_id": [1, 106]})
    config = models.generation_config_of(spec)
    assert (config.top_k, config.top_p, config.eos_token_id) == (7, 0.5, [1, 106])


def test_without_the_file_it_comes_from_config_json_as_from_pretrained_does(tmp_path):
    config = models.generation_config_of(write_model_dir(tmp_path, None))
    assert config.eos_token_id == 1 and config.top_k is None


def test_synthetic_stand_ins_carry_gemma_3_instructs():
    config = models.generation_config_of("synthetic:gemma-3-27b")
    assert (config.top_k, config.top_p, config.eos_token_id) == (64, 0.95, [1, 106])
    with pytest.raises(models.ModelLoadError):
        models.generation_config_of("synthetic:nope")


def test_an_unsupported_field_is_refused_at_plan_time_naming_it(tmp_path):
    from ao_resampling.engine.decoding.settings import resolve_decoding

    spec = write_model_dir(tmp_path, {"do_sample": True, "repetition_penalty": 1.3})
    with pytest.raises(UnsupportedGenerationConfig, match="repetition_penalty=1.3"):
        resolve_decoding(models.generation_config_of(spec), temperature=0.7, top_p=0.9, top_k=None,
                         max_new_tokens=8, seed=0, fallback_eos=[1])


def test_a_corrupt_generation_config_file_is_refused_not_ignored(tmp_path):
    spec = write_model_dir(tmp_path, None)
    (tmp_path / "generation_config.json").write_text('{"top_k": 64,')
    with pytest.raises(models.ModelLoadError, match="generation_config.json"):
        models.generation_config_of(spec)
