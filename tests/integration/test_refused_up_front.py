"""What the tool cannot honour is refused before work starts, in one ``error:`` line with exit 2: a layer the model
does not have, a window longer than any prompt, an embedding model that does not exist, a bad judge flag on a run
folder (never "meta.config not usable; using defaults"), a baseline longer than the context window. And a run folder's
settings are its own: one bad value in meta.config drops that value alone, and ``baseline`` records what it sampled
with, so the next plain command goes on. The CLI in-process (typer's runner) on the tiny model and the real tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ao_resampling import pipeline
from ao_resampling.cli import app
from ao_resampling.engine.loading import models
from ao_resampling.errors import EXIT_USAGE
from ao_resampling.results import RESULTS_NAME, dump_results, load_results_file
from ao_resampling.stages import baseline as baseline_stage
from tests.support.results_factory import make_results

TINY = ["--preset", "experiment", "--model", "synthetic:tiny", "--oracle-lora", "random", "--num-targets", "1",
        "--num-questions", "1"]
RUN = ["run", *TINY, "--device", "cpu", "--dtype", "float32", "--samples", "2", "--max-new-tokens", "2",
       "--no-judge", "--embedding-model", "none", "--quiet"]
SWEEP = ["sweep", *TINY, "--device", "cpu", "--dtype", "float32", "--samples", "2", "--set", "max_new_tokens=2",
         "--embedding-model", "none", "--no-judge", "--quiet"]


@pytest.fixture(autouse=True)
def shared_tokenizer(monkeypatch, gemma_tokenizer):
    real = models.load_tokenizer
    monkeypatch.setattr(models, "load_tokenizer", lambda spec: gemma_tokenizer
                        if spec.startswith("synthetic:") or spec == "gemma3-270m-gguf" else real(spec))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if any command loads weights: every refusal here must come before."""
    def load(config):
        raise AssertionError(f"the model was loaded ({config.model}) before the refusal")

    monkeypatch.setattr(pipeline, "load_oracle", load)
    monkeypatch.setattr(baseline_stage, "load_oracle", load)


def invoke(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def refused(result, message: str) -> None:
    """Exit 2, the message in the tool's one error line, no traceback."""
    assert result.exit_code == EXIT_USAGE, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in result.output, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def answers_in(folder: Path) -> int:
    if not (folder / RESULTS_NAME).exists():
        return 0
    from ao_resampling.store import ResultsStore

    return sum(len(r.responses) for r in ResultsStore(folder).load().runs)


# ---------------------------------------------------------------------------------------------------------------------
# run and sweep: before the model loads


@pytest.mark.parametrize("args, message", [
    pytest.param(["--set", "layer_percent=100"], "field 'layer_percent'", id="layer_percent_100"),
    pytest.param(["--set", "injection_layer=99"], "injection_layer = 99: layer 99 does not exist in model "
                 "'synthetic:tiny', whose layers are 0..3", id="injection_layer_99"),
    pytest.param(["--set", "position_rule=window:1000000000000"], "rule window:1000000000000 reads tokens",
                 id="window_of_10_to_the_12"),
    pytest.param(["--embedding-model", "no-such/embedder"], "embedding model 'no-such/embedder'",
                 id="embedding_model_not_found"),
    pytest.param(["--judge-base-url", "not a url"], "field 'judge_base_url'", id="base_url_not_a_url"),
])
def test_run_refuses_before_the_model_loads(tmp_path, no_model, args, message):
    out = tmp_path / "run"
    refused(invoke(*RUN, *args, "--out", out), message)
    assert answers_in(out) == 0


def test_sweep_with_no_values_is_one_line(tmp_path):
    refused(invoke(*SWEEP, "--vary", "temperature=,", "--out", tmp_path / "sweep"), "no values")


def test_sweep_checks_every_conditions_layers_before_any_runs_and_the_corrected_command_goes_on(tmp_path, monkeypatch,
                                                                                                no_model):
    out = tmp_path / "sweep"
    refused(invoke(*SWEEP, "--vary", "injection_layer=1,99", "--out", out),
            "condition injection_layer=99: setting injection_layer = 99: layer 99 does not exist")
    assert not (out / "sweep.json").exists()  # nothing that would refuse the corrected command
    assert answers_in(out / "injection_layer=1") == 0  # condition 1 did not run
    monkeypatch.undo()  # the corrected sweep may load the model
    result = invoke(*SWEEP, "--vary", "injection_layer=1,2", "--out", out)
    assert result.exit_code == 0, result.output
    assert [answers_in(out / name) for name in ("injection_layer=1", "injection_layer=2")] == [2, 2]


# ---------------------------------------------------------------------------------------------------------------------
# judge, baseline, report: flags over a run folder


def write_folder(folder: Path, **config: object) -> Path:
    results = make_results([[None]] * 2)
    results.meta.config = {"embedding_model": "none", **config}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RESULTS_NAME).write_text(dump_results(results))
    return folder


@pytest.mark.parametrize("args, field", [
    pytest.param(["judge", "--judge-timeout-s", "0"], "judge_timeout_s", id="judge_timeout_0"),
    pytest.param(["judge", "--judge-concurrency", "0"], "judge_concurrency", id="judge_concurrency_0"),
    pytest.param(["judge", "--judge-api", "foo"], "judge_api", id="judge_api_foo"),
    pytest.param(["judge", "--repeat-fraction", "2"], "judge_repeat_fraction", id="repeat_fraction_2"),
    pytest.param(["judge", "--judge-base-url", "not a url"], "judge_base_url", id="judge_base_url"),
    pytest.param(["baseline", "--batch-rows", "0", "--no-judge"], "batch_rows", id="baseline_batch_rows_0"),
    pytest.param(["report", "--embedding-model", ""], "embedding_model", id="report_embedding_model_empty"),
])
def test_a_bad_flag_on_a_run_folder_is_one_line_naming_it(tmp_path, no_model, args, field):
    folder = write_folder(tmp_path / "run")
    before = (folder / RESULTS_NAME).read_text()
    result = invoke(args[0], folder, *args[1:], "--quiet")
    refused(result, f"error: command-line flags: field '{field}'")
    assert "meta.config not usable" not in result.output and "using defaults" not in result.output
    assert (folder / RESULTS_NAME).read_text() == before


@pytest.fixture
def planned(tmp_path) -> Path:
    """A tiny model's plan (no weights): 1 target x 1 question."""
    out = tmp_path / "run"
    result = invoke("prepare", *TINY, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_a_baseline_longer_than_the_context_window_is_refused_before_the_model_loads(planned, no_model):
    limit = models.model_context_length("synthetic:tiny")
    (run,) = load_results_file(planned / RESULTS_NAME).runs
    too_long = limit - len(run.context_input_ids) + 1
    refused(invoke("baseline", planned, "--baseline-max-new-tokens", too_long, "--device", "cpu", "--no-judge",
                   "--quiet"),
            f"target {run.target_id}: {len(run.context_input_ids)} tokens + baseline_max_new_tokens {too_long} > "
            f"{limit}")


def test_baseline_with_a_missing_embedding_model_fails_before_sampling(planned, no_model):
    result = invoke("baseline", planned, "--embedding-model", "no-such/embedder", "--device", "cpu", "--no-judge",
                    "--quiet")
    refused(result, "embedding model 'no-such/embedder'")


def test_baseline_uses_the_folders_model_when_one_meta_value_is_bad(planned, monkeypatch):
    path = planned / RESULTS_NAME
    results = load_results_file(path)
    results.meta.config["judge_timeout_s"] = -1  # one value this version refuses
    path.write_text(dump_results(results))
    loaded = []

    class Stop(Exception):
        pass

    def load(config):
        loaded.append(config)
        raise Stop

    monkeypatch.setattr(baseline_stage, "load_oracle", load)
    with pytest.raises(Stop):
        invoke("baseline", planned, "--device", "cpu", "--no-judge", "--quiet")
    assert [c.model for c in loaded] == ["synthetic:tiny"]  # the folder's, not google/gemma-3-27b-it
    assert loaded[0].judge_timeout_s == 120.0 and loaded[0].embedding_model == results.meta.config["embedding_model"]


def test_a_file_without_meta_config_baselines_its_own_model(planned, monkeypatch):
    path = planned / RESULTS_NAME
    results = load_results_file(path)
    results.meta.config = None  # an older file: only meta.model says which model made it
    path.write_text(dump_results(results))
    loaded = []
    monkeypatch.setattr(baseline_stage, "load_oracle", lambda config: loaded.append(config.model) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        invoke("baseline", planned, "--device", "cpu", "--no-judge", "--quiet")
    assert loaded == ["synthetic:tiny"]


def test_a_shorter_baseline_is_recorded_so_the_next_plain_command_goes_on(planned):
    args = ["--device", "cpu", "--no-judge", "--embedding-model", "none", "--quiet"]
    first = invoke("baseline", planned, "--baseline-max-new-tokens", "4", *args)
    assert first.exit_code == 0, first.output
    results = load_results_file(planned / RESULTS_NAME)
    assert results.meta.config["baseline_max_new_tokens"] == 4
    assert {r.decoding.max_new_tokens for run in results.baseline.runs for r in run.responses} == {4}
    again = invoke("baseline", planned, *args)  # refused before: "max_new_tokens: 4 -> 240"
    assert again.exit_code == 0, again.output
    assert "0 targets sampled (1 already were)" in again.output
    assert json.loads((planned / RESULTS_NAME).read_text())["meta"]["config"]["baseline_max_new_tokens"] == 4
