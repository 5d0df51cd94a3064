"""cli.py's shared flag declarations: the judge's seven flags, declared once, stand on each command where its
``judge_flags`` parameter stands (so ``--help`` lists them in the same place) and reach the command as one dict."""

from __future__ import annotations

import inspect

import pytest
from typer.testing import CliRunner

from ao_resampling import cli

JUDGE_FLAGS = ["judge_model", "judge_api", "judge_base_url", "judge_concurrency", "judge_timeout_s",
               "judge_max_retries", "clusters"]


def test_the_command_gets_the_seven_values_as_one_dict():
    seen = {}

    @cli._with_judge_flags
    def command(results: str, judge_flags: cli.JudgeFlags = None, quiet: bool = False) -> None:
        seen.update(results=results, judge_flags=judge_flags, quiet=quiet)

    assert list(inspect.signature(command).parameters) == ["results", *JUDGE_FLAGS, "quiet"]
    values = {name: f"v{i}" for i, name in enumerate(JUDGE_FLAGS)}
    command("folder", quiet=True, **values)
    assert seen == {"results": "folder", "judge_flags": values, "quiet": True}


@pytest.mark.parametrize("flag, expected", [([], True), (["--no-clusters"], False), (["--clusters"], True)])
def test_sweep_takes_the_cluster_flag_too(monkeypatch, flag, expected):
    """`sweep` judges each condition, so it takes --clusters/--no-clusters as run, judge and baseline do."""
    from ao_resampling import sweep

    seen = []

    def stop(base, overrides):
        seen.append(base.clusters)
        raise sweep.SweepError("stop here")

    monkeypatch.setattr(sweep, "plan_conditions", stop)
    result = CliRunner().invoke(cli.app, ["sweep", "--vary", "temperature=0.5,1.0", *flag])
    assert result.exit_code == 2 and "stop here" in result.output
    assert seen == [expected]
