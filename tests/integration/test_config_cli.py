"""The CLI's ``prepare`` (real Gemma 3 tokenizer): settings from flags, TOML and --set, errors that name the file and
the field, folders made with other settings refused, and ``prepare`` on the real experiment's data (100 targets x 10
of the 16 questions, read from JSON or straight out of a research ``.py``). config.py alone: tests/unit/test_config.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ao_resampling.cli import app
from ao_resampling.results import load_results_file

ROW = re.compile(r"^(q\d{3})\s+(\d+)\s+(\d+)\s+([\d,]+)\s+(.+)$", re.M)
PREPARE_27B = ["prepare", "--preset", "experiment", "--model", "synthetic:gemma-3-27b", "--oracle-lora", "random"]
PREPARE_TINY = ["prepare", "--preset", "experiment", "--model", "synthetic:tiny", "--oracle-lora", "random"]


def invoke(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# ao-resampling prepare


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shared_data):
    """``prepare`` on the real data (100 x 10 questions with the 27B shapes), run once for the tests below."""
    out = tmp_path_factory.mktemp("prepare") / "plan"
    result = invoke(*PREPARE_27B, "--targets", shared_data / "target_model_queries.json",
                    "--questions", shared_data / "sycophancy_questions.json", "--out", out)
    return result, out


def test_prepare_prints_the_read_position_of_every_target(prepared, gemma_tokenizer):
    result, out = prepared
    assert result.exit_code == 0, result.output
    rows = ROW.findall(result.output)
    assert len(rows) == 100 and [r[0] for r in rows] == [f"q{i:03d}" for i in range(1, 101)]
    assert {r[4] for r in rows} == {"'<start_of_turn>'"} and all(r[3] == r[2] for r in rows)

    results = load_results_file(out / "results.json")
    assert len(results.runs) == 1000 and len(results.ao_questions) == 10
    assert (results.meta.layer, results.meta.num_layers) == (31, 62)
    assert "layer 31 of 62" in result.output and "1000 runs planned" in result.output
    start_of_turn = gemma_tokenizer.convert_tokens_to_ids("<start_of_turn>")
    table = {target_id: (int(n), int(idx)) for target_id, n, idx, _, _ in rows}
    for run in results.runs:
        assert table[run.target_id] == (len(run.context_input_ids), run.assistant_start_idx)
        assert run.context_input_ids[run.assistant_start_idx] == start_of_turn


def test_prepare_reads_questions_from_a_research_py_file(prepared, shared_data, tmp_path):
    _, json_out = prepared
    questions = json.loads((shared_data / "sycophancy_questions.json").read_text())
    script = tmp_path / "sycophancy.py"
    script.write_text(
        "import torch  # never executed: the file is parsed, not run\n\n"
        f"initial_question = {questions[0]!r}\n"
        f"followup_questions = [\n" + "".join(f"    {q!r},\n" for q in questions[1:]) + "]\n"
        "sycophancy_questions = [initial_question] + followup_questions\n"
    )
    out = tmp_path / "plan"
    result = invoke(*PREPARE_27B, "--targets", shared_data / "target_model_queries.json",
                    "--questions", script, "--out", out)
    assert result.exit_code == 0, result.output
    from_py, from_json = load_results_file(out / "results.json"), load_results_file(json_out / "results.json")
    assert from_py.ao_questions == from_json.ao_questions
    assert [r.run_id for r in from_py.runs] == [r.run_id for r in from_json.runs]
    assert len(from_py.runs) == 1000 and from_py.meta.layer == 31


@pytest.mark.parametrize("targets, field", [
    pytest.param([{"id": "a", "messages": [{"role": "user", "content": "hi"}]},
                  {"id": "b", "messages": [{"role": "robot", "content": "beep"}]}],
                 "item 1 (id 'b'): field 'messages[0].role'", id="bad_role"),
    pytest.param([{"id": "a", "messages": [{"role": "user"}]}], "field 'messages[0].content'", id="missing_content"),
    pytest.param([{"id": "a", "mesages": []}], "field 'mesages'", id="typo"),
])
def test_bad_targets_file_exits_2_naming_file_and_field(tmp_path, targets, field):
    path = tmp_path / "targets.json"
    path.write_text(json.dumps(targets))
    result = invoke(*PREPARE_TINY, "--targets", path, "--out", tmp_path / "plan")
    assert result.exit_code == 2
    assert str(path) in result.output and field in result.output
    assert not (tmp_path / "plan" / "results.json").exists()


@pytest.mark.parametrize("rule", ["window:3", "last_user_token"])
def test_prepare_table_shows_the_tokens_the_position_rule_reads(tmp_path, gemma_tokenizer, rule):
    out = tmp_path / "plan"
    result = invoke(*PREPARE_TINY, "--set", "num_targets=3", "--set", f"position_rule={rule}", "--out", out)
    assert result.exit_code == 0, result.output
    shown = {line.split()[0]: line for line in result.output.splitlines()[1:4]}
    assert f"token(s) read ({rule})" in result.output.splitlines()[0]
    for run in load_results_file(out / "results.json").runs:  # independent: the plan's ids and positions
        tokens = gemma_tokenizer.convert_ids_to_tokens([run.context_input_ids[i] for i in run.context_positions])
        assert shown[run.target_id].split(None, 4)[3:] == [",".join(map(str, run.context_positions)),
                                                           " ".join(map(repr, tokens))]
        assert tokens != ["<start_of_turn>"]


def test_set_reaches_fields_that_also_have_flags(tmp_path):
    out = tmp_path / "plan"
    result = invoke(*PREPARE_TINY, "--set", "num_targets=3", "--set", "question_seed=5", "--set", "num_questions=2",
                    "--set", "temperature=0.3", "--out", out)
    assert result.exit_code == 0, result.output
    results = load_results_file(out / "results.json")
    assert len(results.targets) == 3 and len(results.runs) == 6
    assert (results.meta.question_seed, results.meta.config["temperature"]) == (5, 0.3)
    # A different question seed draws other questions (so --set really reached the sampler).
    other = tmp_path / "other"
    assert invoke(*PREPARE_TINY, "--set", "num_targets=3", "--set", "num_questions=2", "--out", other).exit_code == 0
    assert load_results_file(other / "results.json").ao_questions != results.ao_questions


@pytest.mark.parametrize("args, message", [
    pytest.param(["--set", "colour=red"], "field 'colour'", id="unknown_field"),
    pytest.param(["--set", "num_targets=zero"], "field 'num_targets'", id="bad_value"),
    pytest.param(["--set", "num_targets"], "--set expects key=value", id="no_equals"),
    pytest.param(["--set", "steering_coefficient=NaN"], "field 'steering_coefficient'", id="nan"),
    pytest.param(["--set", "temperature=inf"], "field 'temperature'", id="inf"),
])
def test_bad_set_exits_2(tmp_path, args, message):
    result = invoke(*PREPARE_TINY, *args, "--out", tmp_path / "plan")
    assert result.exit_code == 2
    assert message in result.output


def test_config_file_and_flags_on_the_command_line(tmp_path):
    toml = write_toml(tmp_path / "exp.toml", "num_targets = 2\nnum_questions = 3\n")
    out = tmp_path / "plan"
    result = invoke(*PREPARE_TINY, "--config", toml, "--num-questions", "1", "--out", out)
    assert result.exit_code == 0, result.output
    results = load_results_file(out / "results.json")
    assert (len(results.targets), len(results.ao_questions)) == (2, 1)

    broken = write_toml(tmp_path / "broken.toml", "num_targets = -1\n")
    result = invoke(*PREPARE_TINY, "--config", broken, "--out", tmp_path / "other")
    assert result.exit_code == 2
    assert str(broken) in result.output and "field 'num_targets'" in result.output


def test_prepare_refuses_a_folder_made_with_other_settings(tmp_path):
    out = tmp_path / "plan"
    assert invoke(*PREPARE_TINY, "--num-targets", "2", "--num-questions", "2", "--out", out).exit_code == 0
    before = (out / "results.json").read_text()
    # Same settings: accepted, nothing rewritten.
    assert invoke(*PREPARE_TINY, "--num-targets", "2", "--num-questions", "2", "--out", out).exit_code == 0
    assert (out / "results.json").read_text() == before

    result = invoke(*PREPARE_TINY, "--num-targets", "2", "--num-questions", "2", "--set", "decode_seed=7",
                    "--out", out)
    assert result.exit_code == 2
    assert "decode_seed: 0 -> 7" in result.output
    assert (out / "results.json").read_text() == before


TWO_TARGETS = [{"id": "a", "messages": [{"role": "user", "content": "Hello there"}]},
               {"id": "b", "messages": [{"role": "user", "content": "How are you?"}]}]


def test_prepare_refuses_a_folder_planned_from_edited_targets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("t.json").write_text(json.dumps(TWO_TARGETS))
    args = [*PREPARE_TINY, "--targets", "t.json", "--num-targets", "2", "--num-questions", "2", "--out", "plan"]
    assert invoke(*args).exit_code == 0
    before = Path("plan/results.json").read_text()

    # The same file named by its absolute path is the same plan: accepted, nothing rewritten.
    absolute = [*PREPARE_TINY, "--targets", tmp_path / "t.json", "--num-targets", "2", "--num-questions", "2",
                "--out", tmp_path / "plan"]
    result = invoke(*absolute)
    assert result.exit_code == 0, result.output
    assert Path("plan/results.json").read_text() == before

    edited = json.loads(json.dumps(TWO_TARGETS))
    edited[1]["messages"][0]["content"] = "Edited under the same file name"
    Path("t.json").write_text(json.dumps(edited))
    result = invoke(*args)
    assert result.exit_code == 2
    assert "targets whose messages changed: b\n" in result.output
    assert Path("plan/results.json").read_text() == before


def test_prepare_refuses_a_folder_planned_from_an_edited_question_pool(tmp_path):
    pool = [f"Question {i}: what does the assistant think?" for i in range(5)]
    path = tmp_path / "q.json"
    path.write_text(json.dumps(pool))
    args = [*PREPARE_TINY, "--questions", path, "--num-targets", "1", "--num-questions", "5", "--out", tmp_path / "p"]
    assert invoke(*args).exit_code == 0
    pool[3] = "Question 3, reworded after the plan was written?"
    path.write_text(json.dumps(pool))
    result = invoke(*args)
    assert result.exit_code == 2
    assert "questions whose text changed: aoq_03\n" in result.output


@pytest.mark.parametrize("args, message", [
    pytest.param(["--set", "max_new_tokens=5000"],
                 r"oracle prompt of question aoq_\d+ \(e\.g\. run__\S+\): \d+ tokens \+ max_new_tokens 5000 > 4096",
                 id="oracle_prompt_plus_answer"),
    pytest.param(["--targets", "LONG"], r"target long: \d{4} tokens > 4096", id="long_target"),
])
def test_prepare_refuses_what_does_not_fit_the_context_window(tmp_path, args, message):
    long = [*TWO_TARGETS[:1], {"id": "long", "messages": [{"role": "user", "content": "word " * 4200}]}]
    (tmp_path / "long.json").write_text(json.dumps(long))
    args = [tmp_path / "long.json" if a == "LONG" else a for a in args]
    result = invoke(*PREPARE_TINY, "--num-targets", "2", "--num-questions", "1", *args, "--out", tmp_path / "p")
    assert result.exit_code == 2
    assert "model 'synthetic:tiny' takes at most 4096 positions" in result.output
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "p" / "results.json").exists()


def _with_meta_config(data: dict, **extra) -> dict:
    data["meta"]["config"].update(extra)  # as a newer (or older) tool version might have written it
    return data


@pytest.mark.parametrize("damage, message", [
    pytest.param(lambda text: text[: len(text) // 2], "not valid JSON", id="truncated_results"),
    pytest.param(lambda text: json.dumps(_with_meta_config(json.loads(text), colour="red")),
                 "meta.config is not a config this version understands", id="foreign_meta_config"),
    # What an older version wrote for `--temperature inf`: the refusal names the field, not only a count.
    pytest.param(lambda text: json.dumps(_with_meta_config(json.loads(text), temperature=float("inf"))),
                 "field 'temperature': Value error, expected a finite number", id="infinite_meta_config"),
])
def test_prepare_on_a_damaged_folder_exits_2_naming_it(tmp_path, damage, message):
    out = tmp_path / "plan"
    assert invoke(*PREPARE_TINY, "--num-targets", "1", "--num-questions", "1", "--out", out).exit_code == 0
    path = out / "results.json"
    damaged = damage(path.read_text())
    assert damaged != path.read_text()
    path.write_text(damaged)
    result = invoke(*PREPARE_TINY, "--num-targets", "1", "--num-questions", "1", "--out", out)
    assert result.exit_code == 2
    assert str(path) in result.output and message in result.output
