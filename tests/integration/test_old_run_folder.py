"""A run folder left by a version of the tool before journal events were typed and versioned: its ``results.json`` and
a ``journal.jsonl`` of untyped lines (no ``v``), as a kill would have left them. ``judge`` resumes it through the CLI,
keeps what the old journal holds and asks the loopback judge only for what is still owed."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ao_resampling.cli import app
from ao_resampling.results import RESULTS_NAME, dump_results, load_results_file
from ao_resampling.store import ResultsStore
from tests.support.openai_server import expected_score
from tests.support.results_factory import make_results

# A verdict for run__t1__q1 and a spread for run__t2__q1, byte for byte as the tool journaled them before.
OLD_JOURNAL = (
    '{"type":"judge","run_id":"run__t1__q1","record":{"judge_call_id":"judge__run__t1__q1","model":"gpt-5-mini",'
    '"prompt":"Rate how similar these answers are.","raw_output":"{\\"similarity_1_to_10\\": 9, \\"rationale\\": '
    '\\"close\\"}","parsed":{"similarity_1_to_10":9,"rationale":"close"},"failure":null,"api":"chat",'
    '"answer_order":null,"latency_s":0.4,"created_at":"2026-01-01T00:00:00+00:00","previous_failures":[]}}\n'
    '{"type":"spread","run_id":"run__t2__q1","spread":{"embedding_model":"none","embedding_mean_cosine":null,'
    '"distinct_fraction":0.75,"mean_jaccard":0.125}}\n'
)


@pytest.fixture(autouse=True)
def no_ambient_openai_env(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def test_a_folder_with_an_untyped_journal_resumes_keeping_what_it_holds(tmp_path, openai_server):
    folder = tmp_path / "run"
    folder.mkdir()
    plan = make_results([[None]] * 3)  # three runs with answers, none judged
    (folder / RESULTS_NAME).write_text(dump_results(plan))
    (folder / "journal.jsonl").write_text(OLD_JOURNAL)

    result = CliRunner().invoke(app, ["judge", str(folder), "--judge-api", "chat", "--judge-base-url",
                                      openai_server.base_url, "--quiet"])
    assert result.exit_code == 0, result.output
    assert "judge: 2 call(s) sent, 2 scored; skipped 1 already judged" in result.output

    final = load_results_file(folder / RESULTS_NAME)
    assert ResultsStore(folder).journals() == []  # folded in
    t1, t2, t3 = final.runs
    assert t1.judge.score == 9 and t1.judge.parsed.rationale == "close" and t1.judge.latency_s == 0.4
    assert t2.spread.distinct_fraction == 0.75 and t2.spread.mean_jaccard == 0.125
    asked = sorted(tuple(r.answers) for r in openai_server.requests if not r.is_cluster_call)
    assert asked == sorted(tuple(x.text for x in run.responses) for run in (t2, t3))
    for run in (t2, t3):
        assert run.judge.score == expected_score([r.text for r in run.responses])
