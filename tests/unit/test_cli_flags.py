"""cli.py's flags: every setting a user sets often has a flag on every command that uses it, and each flag reaches
the config that command runs with.

What the commands take is read from the commands typer builds (their click options), and what each flag must set
is written out here by hand: a test that read cli.SETTINGS, the table the commands are built from, would agree with
any mistake in it. The pipeline's entry points are replaced by a stand-in that records the config and stops, so no
model loads and nothing is judged.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from ao_resampling import cli, pipeline
from ao_resampling import sweep as sweeps
from ao_resampling.errors import AOResamplingError
from ao_resampling.results import dump_results
from ao_resampling.stages import baseline, judge, plan
from tests.support.results_factory import make_results

# field -> (the flag and its value as a user types them, the value the config must then hold). No value is the demo
# preset's, so each one shows that the flag was read.
SET_OFTEN = {
    "model": (["--model", "synthetic:tiny"], "synthetic:tiny"),
    "tokenizer": (["--tokenizer", "some/tokenizer"], "some/tokenizer"),
    "oracle_lora": (["--oracle-lora", "some/lora-dir"], "some/lora-dir"),
    "dtype": (["--dtype", "float16"], "float16"),
    "device": (["--device", "cuda:1"], "cuda:1"),
    "device_map": (["--device-map", "auto"], "auto"),
    "batch_rows": (["--batch-rows", "12"], 12),
    "targets": (["--targets", "t.json"], Path("t.json")),
    "questions": (["--questions", "pool.txt"], Path("pool.txt")),
    "questions_variable": (["--questions-variable", "my_questions"], "my_questions"),
    "num_targets": (["--num-targets", "7"], 7),
    "num_questions": (["--num-questions", "5"], 5),
    "layer_percent": (["--layer-percent", "25"], 25),
    "position_rule": (["--position-rule", "window:3"], "window:3"),
    "samples_per_query": (["--samples", "6"], 6),
    "max_new_tokens": (["--max-new-tokens", "33"], 33),
    "temperature": (["--temperature", "0.3"], 0.3),
    "top_p": (["--top-p", "0.5"], 0.5),
    "top_k": (["--top-k", "20"], 20),
    "judge_model": (["--judge-model", "judge-x"], "judge-x"),
    "judge_api": (["--judge-api", "chat"], "chat"),
    "judge_base_url": (["--judge-base-url", "http://127.0.0.1:9/v1"], "http://127.0.0.1:9/v1"),
    "judge_concurrency": (["--judge-concurrency", "3"], 3),
    "judge_timeout_s": (["--judge-timeout-s", "7.5"], 7.5),
    "judge_max_retries": (["--judge-max-retries", "2"], 2),
    "clusters": (["--no-clusters"], False),
    "judge_repeats": (["--judge-repeats", "2"], 2),
    "judge_repeat_fraction": (["--repeat-fraction", "0.5"], 0.5),
    "embedding_model": (["--embedding-model", "none"], "none"),
    "baseline": (["--baseline"], True),
    "baseline_max_new_tokens": (["--baseline-max-new-tokens", "50"], 50),
}
# The other fields, set with --set (or in the TOML file), and why they have no flag of their own.
SET_RARELY = {
    "injection_layer": "the published AO injects at layer 1",
    "steering_coefficient": "1 is the published AO; swept with --vary",
    "question_seed": "reproducibility, not a knob",
    "decode_seed": "reproducibility, not a knob",
    "sampler": "the sequential sampler is a reference for checks",
    "merge_lora": "speed only, the same math",
    "answer_lengths": "stand-in runs only",
    "judge": "the commands' --no-judge",
    "bootstrap_seed": "reproducibility, not a knob",
    "bootstrap_resamples": "the CI's precision; the default is enough",
}
JUDGING = ["judge_model", "judge_api", "judge_base_url", "judge_concurrency", "judge_timeout_s", "judge_max_retries",
           "clusters"]
# The commands that run (part of) the experiment, and the settings each one uses.
USES = {
    "run": list(SET_OFTEN),
    "sweep": list(SET_OFTEN),  # every condition is a run
    "prepare": list(SET_OFTEN),  # the plan records them all, so `run` with the same flags continues it
    "judge": [*JUDGING, "judge_repeats", "judge_repeat_fraction"],
    "baseline": ["baseline_max_new_tokens", "device", "device_map", "batch_rows", *JUDGING, "embedding_model"],
    "report": ["embedding_model"],
}
CASES = [pytest.param(command, field, id=f"{command}-{field}") for command, fields in USES.items() for field in fields]


@functools.cache  # the app's commands are fixed: built once, not for each of ~120 cases
def flags_of(command: str) -> frozenset[str]:
    """The options `ao-resampling COMMAND` accepts, as typer built them (both spellings of a --x/--no-x switch)."""
    click_command = typer.main.get_command(cli.app).commands[command]
    return frozenset(flag for param in click_command.params for flag in (*param.opts, *param.secondary_opts))


@pytest.mark.parametrize("command, field", CASES)
def test_the_command_has_the_flag(command, field):
    argv, _ = SET_OFTEN[field]
    assert argv[0] in flags_of(command), f"`ao-resampling {command}` has no {argv[0]} (for {field})"


def test_every_config_field_is_either_a_flag_or_set_rarely_for_a_reason():
    """A new ExperimentConfig field must be placed: a flag on the commands that use it, or --set with a reason."""
    from ao_resampling.config import ExperimentConfig

    assert set(ExperimentConfig.model_fields) == set(SET_OFTEN) | set(SET_RARELY)
    assert not set(SET_OFTEN) & set(SET_RARELY)


def test_gpus_is_on_run_and_not_on_sweep():
    """A sweep runs in one process (sweep.run_sweep refuses a torchrun world), so it has no --gpus to offer."""
    assert "--gpus" in flags_of("run")
    assert "--gpus" not in flags_of("sweep")


class Stop(AOResamplingError):
    """Raised by the stand-in entry point once it has the config: the command ends there (exit 2)."""


@pytest.fixture
def run_folder(tmp_path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.json").write_text(dump_results(make_results([[None]])))
    return folder


@pytest.fixture
def seen(monkeypatch) -> list:
    """The configs the pipeline's entry points were called with, in place of the real ones."""
    configs = []

    def record(config):
        configs.append(config)
        raise Stop("stopped before any work")

    monkeypatch.setattr(pipeline, "run_experiment", lambda config, *a, **k: record(config))
    monkeypatch.setattr(sweeps, "plan_conditions", lambda base, overrides: record(base))
    monkeypatch.setattr(plan, "prepare", lambda config, out_dir: record(config))
    monkeypatch.setattr(judge, "judge_stage", lambda store, config, **k: record(config))
    monkeypatch.setattr(baseline, "baseline_stage", lambda store, config, **k: record(config))
    monkeypatch.setattr(pipeline, "report_of", lambda results, config, **k: record(config))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")  # judge and baseline check for judge access first
    return configs


@pytest.mark.parametrize("command, field", CASES)
def test_the_flag_reaches_the_config(command, field, seen, run_folder, tmp_path):
    argv, expected = SET_OFTEN[field]
    where = [str(run_folder)] if command in ("judge", "baseline", "report") else ["--out", str(tmp_path / "out")]
    result = CliRunner().invoke(cli.app, [command, *where, *argv])
    assert result.exit_code == 2 and "stopped before any work" in result.output, result.output
    assert getattr(seen[-1], field) == expected


def test_a_flag_left_out_leaves_the_preset_and_set_values(seen, tmp_path):
    """An unset flag is no override: --set of the same field and the preset's other values stand."""
    result = CliRunner().invoke(cli.app, ["run", "--out", str(tmp_path / "out"), "--set", "temperature=0.25"])
    assert "stopped before any work" in result.output, result.output
    assert (seen[-1].temperature, seen[-1].samples_per_query, seen[-1].device) == (0.25, 4, "cpu")


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("3", 3)])
def test_batch_rows_takes_a_number_or_auto(seen, tmp_path, value, expected):
    result = CliRunner().invoke(cli.app, ["run", "--out", str(tmp_path / "out"), "--batch-rows", value])
    assert "stopped before any work" in result.output, result.output
    assert seen[-1].batch_rows == expected


def test_a_bad_position_rule_is_one_error_line_naming_the_field(seen, tmp_path):
    result = CliRunner().invoke(cli.app, ["run", "--out", str(tmp_path / "out"), "--position-rule", "window:0"])
    assert result.exit_code == 2 and not seen
    assert "field 'position_rule'" in result.output and "expected 'assistant_start'" in result.output


def test_takes_puts_the_flags_where_settings_stands_and_hands_them_over_as_one_dict():
    got = {}

    @cli._takes("judge_model", "clusters")
    def command(results: str, settings: cli.Settings = None, quiet: bool = False) -> None:
        got.update(results=results, settings=settings, quiet=quiet)

    assert list(inspect.signature(command).parameters) == ["results", "judge_model", "clusters", "quiet"]
    command("folder", quiet=True, judge_model="m", clusters=None)
    assert got == {"results": "folder", "settings": {"judge_model": "m", "clusters": None}, "quiet": True}
