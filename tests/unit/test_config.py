"""config.py: where each setting comes from (preset < TOML file < flags < nothing else), errors that name the file
and the field, and which settings a resumed run must share. (The CLI's ``prepare`` on the real data:
tests/integration/test_config_cli.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ao_resampling.config import (
    DEMO,
    REAL_MODEL,
    ConfigError,
    ExperimentConfig,
    build_config,
    diff_settings,
)


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# build_config


def test_precedence_preset_then_file_then_flags(tmp_path):
    toml = write_toml(tmp_path / "exp.toml", "num_targets = 7\nsamples_per_query = 3\ntemperature = 0.5\n")
    config = build_config(preset="demo", config_file=toml, overrides={"samples_per_query": 5, "temperature": None})
    assert config.model == DEMO["model"]  # preset, untouched by the file or the flags
    assert config.max_new_tokens == DEMO["max_new_tokens"]
    assert config.num_targets == 7  # the file beats the preset (4)
    assert config.samples_per_query == 5  # a flag beats the file (3) and the preset (4)
    assert config.temperature == 0.5  # a flag left unset (None) does not hide the file's value
    assert config.question_seed == 0  # nobody set it: the model's default


def test_experiment_preset_is_the_real_experiment():
    config = build_config(preset="experiment")
    assert (config.model, config.num_targets, config.num_questions, config.samples_per_query) == (REAL_MODEL, 100, 10, 10)
    assert config.stand_in_reason() is None


def test_experiment_table_in_toml(tmp_path):
    toml = write_toml(tmp_path / "exp.toml", "[experiment]\nnum_questions = 2\ndecode_seed = 9\n")
    config = build_config(config_file=toml)
    assert (config.num_questions, config.decode_seed) == (2, 9)


@pytest.mark.parametrize("text, key", [
    pytest.param("temperature = 0.1\n[experiment]\nnum_questions = 2\n", "temperature", id="top_level_key"),
    pytest.param("[experiment]\nnum_questions = 2\n[judge]\njudge_model = 'x'\n", "judge", id="unknown_table"),
])
def test_settings_beside_the_experiment_table_are_refused_naming_key_and_file(tmp_path, text, key):
    toml = write_toml(tmp_path / "exp.toml", text)
    with pytest.raises(ConfigError, match=rf"exp\.toml: '{key}' is beside the \[experiment\] table"):
        build_config(config_file=toml)


@pytest.mark.parametrize("text, message", [
    pytest.param("num_targets = \n", "not valid TOML", id="not_toml"),
    pytest.param("colour = 'red'\n", "field 'colour'", id="unknown_field"),
    pytest.param("num_targets = 0\n", "field 'num_targets'", id="out_of_range"),
    pytest.param("dtype = 'float8'\n", "field 'dtype'", id="bad_choice"),
    pytest.param("temperature = 'warm'\n", "field 'temperature'", id="wrong_type"),
])
def test_config_file_errors_name_the_file_and_field(tmp_path, text, message):
    toml = write_toml(tmp_path / "broken.toml", text)
    with pytest.raises(ConfigError) as info:
        build_config(config_file=toml)
    assert str(toml) in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize("table", ["", "[experiment]\n"])
def test_file_paths_in_a_toml_are_taken_from_the_toml_files_folder(tmp_path, monkeypatch, table):
    (tmp_path / "configs").mkdir()
    toml = write_toml(tmp_path / "configs" / "exp.toml",
                      f"{table}targets = 'data/t.json'\nquestions = '{tmp_path}/q.json'\nmodel = 'org/model'\n")
    monkeypatch.chdir(tmp_path)  # wherever the command runs, away from the TOML file
    config = build_config(config_file=Path("configs/exp.toml"))
    assert config.targets.resolve() == tmp_path / "configs" / "data" / "t.json"
    assert config.questions == tmp_path / "q.json"  # absolute: as written
    assert config.model == "org/model"  # a hub id is no path
    # A flag's path is the user's own, relative to where they typed it.
    assert build_config(config_file=toml, overrides={"targets": "mine.json"}).targets == Path("mine.json")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nowhere\.toml: cannot read config file"):
        build_config(config_file=tmp_path / "nowhere.toml")


def test_flag_errors_name_the_field():
    with pytest.raises(ConfigError, match="field 'top_p'"):
        build_config(overrides={"top_p": 0.0})
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        build_config(preset="fast")


FLOAT_FIELDS = [name for name, f in ExperimentConfig.model_fields.items() if f.annotation is float]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), "inf", "NaN"])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_non_finite_floats_are_refused_naming_the_field(name, value):
    # (top_p and judge_repeat_fraction already refused +inf by their upper bound; the rest let it through.)
    with pytest.raises(ConfigError, match=rf"field '{name}': "):
        build_config(overrides={name: value})


def test_every_float_field_is_checked():
    # The list above comes from the annotations; make sure it is not silently empty or missing the known knobs.
    assert {"temperature", "top_p", "steering_coefficient", "judge_timeout_s", "judge_repeat_fraction"} <= set(
        FLOAT_FIELDS)


def test_random_weights_need_a_random_lora():
    with pytest.raises(ConfigError, match="oracle_lora = 'random'"):
        build_config(overrides={"model": "synthetic:tiny"})


# ---------------------------------------------------------------------------------------------------------------------
# Which settings a resumed run must share


def test_plumbing_does_not_change_results_but_decoding_does():
    base = ExperimentConfig()
    plumbing = ExperimentConfig(device="cpu", batch_rows=3, judge_concurrency=1, judge_api="chat",
                                judge_base_url="http://127.0.0.1:1/v1", sampler="sequential", judge_repeats=2,
                                embedding_model="none", merge_lora=False)
    assert plumbing.settings_that_change_results() == base.settings_that_change_results()
    assert diff_settings(base.settings_that_change_results(), plumbing.settings_that_change_results()) == []

    changed = ExperimentConfig(temperature=0.3, decode_seed=4, num_questions=5)
    assert diff_settings(base.settings_that_change_results(), changed.settings_that_change_results()) == [
        "decode_seed: 0 -> 4", "num_questions: 10 -> 5", "temperature: 0.7 -> 0.3",
    ]


def test_batch_rows_are_sized_to_the_card_unless_given():
    assert ExperimentConfig().batch_rows == "auto" and build_config(preset="demo").batch_rows == "auto"
    assert build_config(overrides={"batch_rows": 64}).batch_rows == 64
    for bad in (0, -3, "many"):
        with pytest.raises(ConfigError, match="batch_rows"):
            build_config(overrides={"batch_rows": bad})


def test_settings_of_older_versions_that_changed_no_result_are_dropped():
    """meta.config of a folder made before the step was sized to the card, or before the fused kernels left the
    package: it still resumes."""
    old = ExperimentConfig().model_dump(mode="json") | {"batch_tokens": 131072, "fused_kernels": False}
    assert ExperimentConfig.model_validate(old) == ExperimentConfig()


def test_answer_lengths_are_for_stand_ins_only():
    stand_in = build_config(overrides={"model": "synthetic:tiny", "oracle_lora": "random",
                                       "answer_lengths": "lengths.json"})
    assert stand_in.answer_lengths == Path("lengths.json")
    assert "lengths.json" in stand_in.stand_in_reason(), "flagged like every stand-in"
    with pytest.raises(ConfigError, match="answer_lengths"):
        build_config(overrides={"answer_lengths": "lengths.json"})  # the real model and the trained LoRA
    assert "answer_lengths" not in {"answer_lengths"} - set(stand_in.settings_that_change_results()), \
        "a resume with other answer lengths is refused"


def test_settings_survive_the_trip_through_meta():
    config = ExperimentConfig(model="synthetic:tiny", oracle_lora="random", targets=Path("t.json"))
    stored = json.loads(json.dumps(config.model_dump(mode="json")))  # what results.json meta.config holds
    again = ExperimentConfig.model_validate(stored)
    assert diff_settings(config.settings_that_change_results(), again.settings_that_change_results()) == []


def test_diff_settings_names_keys_on_one_side_only():
    assert diff_settings({"a": 1}, {"a": 1, "b": 2}) == ["b: None -> 2"]


@pytest.mark.parametrize("overrides, why", [
    pytest.param({"model": "synthetic:tiny", "oracle_lora": "random"}, "synthetic:tiny has random weights",
                 id="random_weights"),
    pytest.param({"oracle_lora": "random"}, "a random LoRA stands in for the trained oracle adapter", id="random_lora"),
    pytest.param({}, None, id="the_real_oracle"),
])
def test_the_config_says_why_a_run_is_a_stand_in(overrides, why):
    """One rule, on the config: results.json's meta.stand_in and note, and the run's warning, all come from it."""
    assert ExperimentConfig(**overrides).stand_in_reason() == why


def test_the_cluster_judge_is_on_in_the_experiment_preset_and_may_be_switched_off_on_a_folder():
    """On by default (the experiment preset adds nothing), off with clusters = false; like the other judge plumbing
    it is no result-changing setting, so a folder judged without clusters can be clustered later and vice versa."""
    assert build_config(preset="experiment").clusters is True
    assert build_config(preset="demo").clusters is True
    assert build_config(preset="experiment", overrides={"clusters": False}).clusters is False
    assert "clusters" not in ExperimentConfig().settings_that_change_results()
