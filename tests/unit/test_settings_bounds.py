"""Settings the tool cannot honour are refused where they are read, naming the field (config.py, positions.py), and a
run folder's config is its meta.config field by field (``config_of_folder``): one value this version refuses drops
that value alone, never the folder's other settings; a bad command-line flag is the user's error, not the folder's."""

from __future__ import annotations

import time

import pytest

from ao_resampling.config import ConfigError, ExperimentConfig, build_config, config_of_folder
from ao_resampling.inputs.positions import Landmarks, resolve
from ao_resampling.position_rules import PositionError, PositionRule


@pytest.mark.parametrize("overrides, field", [
    pytest.param({"layer_percent": 100}, "layer_percent", id="read_layer_one_past_the_last"),
    pytest.param({"steering_coefficient": 1e39}, "steering_coefficient", id="coefficient_that_overflows"),
    pytest.param({"embedding_model": ""}, "embedding_model", id="empty_embedding_model"),
    pytest.param({"judge_base_url": "not a url"}, "judge_base_url", id="base_url_not_a_url"),
    pytest.param({"judge_base_url": "ftp://host/v1"}, "judge_base_url", id="base_url_not_http"),
    pytest.param({"judge_base_url": "https:///v1"}, "judge_base_url", id="base_url_without_host"),
])
def test_values_the_tool_cannot_use_are_refused_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        build_config(overrides=overrides)


def test_the_last_layer_and_real_urls_are_accepted():
    config = build_config(overrides={"layer_percent": 99, "judge_base_url": "http://127.0.0.1:8000/v1"})
    assert int(62 * 99 / 100) == 61  # Gemma 3 27B's last layer: the read layer always exists below 100%
    assert config.layer_percent == 99


def test_a_huge_window_is_refused_before_its_positions_are_listed():
    marks = Landmarks(n_tokens=40, assistant_start_idx=30)
    started = time.perf_counter()
    with pytest.raises(PositionError, match=r"window:1000000000000 reads tokens -999999999969\.\.30, outside"):
        resolve(PositionRule("window", 10**12), marks, target_id="t1")  # MemoryError when the list was built first
    assert time.perf_counter() - started < 1
    assert resolve(PositionRule("window", 31), marks) == list(range(0, 31))


# ---------------------------------------------------------------------------------------------------------------------
# A run folder's config


META = {"model": "synthetic:tiny", "oracle_lora": "random", "embedding_model": "none", "bootstrap_resamples": 300,
        "judge_timeout_s": 30.0}


def test_one_bad_meta_value_drops_that_field_alone_and_says_which():
    config, notes = config_of_folder({**META, "judge_timeout_s": -1}, {}, source="f/results.json")
    assert config.judge_timeout_s == ExperimentConfig.model_fields["judge_timeout_s"].default
    # Every other setting is still the folder's: its model and its embedding model, not the defaults.
    assert (config.model, config.embedding_model, config.bootstrap_resamples) == ("synthetic:tiny", "none", 300)
    assert len(notes) == 1 and "f/results.json" in notes[0] and "'judge_timeout_s' = -1" in notes[0]


def test_meta_keys_of_another_version_are_named_and_ignored():
    config, notes = config_of_folder({**META, "colour": "red"}, {}, source="f")
    assert config.embedding_model == "none" and notes == ["note: f: meta.config field 'colour' is not a setting of "
                                                          "this version; ignored"]


@pytest.mark.parametrize("flags, field", [
    pytest.param({"judge_timeout_s": 0}, "judge_timeout_s", id="timeout_0"),
    pytest.param({"judge_concurrency": 0}, "judge_concurrency", id="concurrency_0"),
    pytest.param({"judge_api": "foo"}, "judge_api", id="api_foo"),
    pytest.param({"judge_repeat_fraction": 2}, "judge_repeat_fraction", id="repeat_fraction_2"),
    pytest.param({"batch_rows": 0}, "batch_rows", id="batch_rows_0"),
    pytest.param({"embedding_model": ""}, "embedding_model", id="embedding_model_empty"),
])
def test_a_bad_flag_is_the_users_error_naming_the_field(flags, field):
    with pytest.raises(ConfigError, match=f"command-line flags: field '{field}'"):
        config_of_folder(META, {**flags, "judge_model": None}, source="f")


def test_flags_stand_over_the_folders_values_and_none_is_not_given():
    config, notes = config_of_folder(META, {"judge_timeout_s": 5.0, "embedding_model": None}, source="f")
    assert (config.judge_timeout_s, config.embedding_model, notes) == (5.0, "none", [])
