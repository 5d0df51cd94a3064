"""Crash safety of ``ao-resampling run``, with real SIGKILLs: the CLI runs as a subprocess on the tiny model against
a loopback judge that answers slowly. It is killed once while generating and once while judging, and re-run each
time (the last re-run, which is not killed, in this process); it must finish with every planned run present once,
complete, and nothing that was journaled before a kill done again.

To see that journaled answers are *kept* rather than regenerated (with one query per batch, a regenerated answer
would come out the same), the answers journaled before the first kill are marked in the journal: a re-run that
regenerated them would drop the mark.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ao_resampling.cli import app
from ao_resampling.stages.common.prompts import build_prompt
from ao_resampling.results import load_results_file
from ao_resampling.store import ResultsStore
from tests.support.openai_server import FakeOpenAIServer, expected_score

N_TARGETS, N_QUESTIONS, N_SAMPLES = 4, 3, 2
N_RUNS = N_TARGETS * N_QUESTIONS
WAIT_S = 60  # the longest any one wait may take before the test fails (rather than hangs)
CANARY = " [journaled before the kill]"


def run_args(out: Path, server: FakeOpenAIServer) -> list[str]:
    return [
        "run", "--preset", "experiment", "--model", "synthetic:tiny",
        "--oracle-lora", "random", "--dtype", "float32", "--device", "cpu",
        "--num-targets", str(N_TARGETS), "--num-questions", str(N_QUESTIONS), "--samples", str(N_SAMPLES),
        # One query per batch (several journal writes to be killed between); a tiny top_p keeps the random model's
        # flat nucleus on the sampler's fast path, so each batch takes a fraction of a second. Top-k off: under the
        # model's generation_config top-k, a tiny top_p would leave one token (greedy), and the tiny model's greedy
        # answers barely depend on the target, so runs could not be told apart by their answers.
        "--batch-rows", str(N_SAMPLES), "--max-new-tokens", "16", "--top-p", "0.0005", "--top-k", "0",
        "--judge-api", "chat", "--judge-base-url", server.base_url, "--judge-concurrency", "2",
        "--embedding-model", "none", "--out", str(out), "--quiet",
    ]


def command(out: Path, server: FakeOpenAIServer) -> list[str]:
    return [sys.executable, "-m", "ao_resampling", *run_args(out, server)]


class Cli:
    """One ``ao-resampling run`` subprocess, its output in a log file (a full pipe would block it)."""

    def __init__(self, args: list[str], cwd: Path, log: Path):
        env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg",
                   # One thread: the test process (and its judge server) share the CPU, and a tiny model's small ops
                   # are ~10x slower when torch's threads must contend for busy cores.
                   OMP_NUM_THREADS="1")
        self.log = log
        self._file = open(log, "w")
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=self._file, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()[-4000:]

    def kill_when(self, condition, what: str) -> None:
        """SIGKILL the process as soon as ``condition()`` holds; fail if it exits or the wait runs out first."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.close()
                pytest.fail(f"the run ended (exit {self.proc.returncode}) before {what}:\n{self.output()}")
            if condition():
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(timeout=WAIT_S)
                self.close()
                return
            time.sleep(0.02)
        self.stop()
        pytest.fail(f"no {what} within {WAIT_S} s:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.close()

    def close(self) -> None:
        self._file.close()


def journal_events(folder: Path) -> list[dict]:
    """The complete events journaled so far (a torn last line is skipped, as the loader does)."""
    events = []
    for path in sorted(folder.glob("journal*.jsonl")):
        try:  # bytes: a line still being written may end inside a multi-byte character
            lines = path.read_bytes().split(b"\n")
        except FileNotFoundError:  # folded into results.json (compacted) since the glob
            continue
        for line in lines[:-1]:  # the last element is "" or a line still being written
            if line.strip():
                events.append(json.loads(line))
    return events


def mark_journaled_answers(folder: Path) -> dict[str, list[str]]:
    """Append CANARY to every answer in the journal (keeping any torn tail as it is); returns the marked texts."""
    marked: dict[str, list[str]] = {}
    for path in sorted(folder.glob("journal*.jsonl")):
        lines = path.read_bytes().split(b"\n")  # bytes: the torn tail may end inside a multi-byte character
        for i, line in enumerate(lines[:-1]):
            event = json.loads(line) if line.strip() else None
            if event and event["type"] == "responses":
                for response in event["responses"]:
                    response["text"] += CANARY
                marked[event["run_id"]] = [r["text"] for r in event["responses"]]
                lines[i] = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()
        path.write_bytes(b"\n".join(lines))
    return marked


def load_quietly(folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn last line is expected after a SIGKILL
        return ResultsStore(folder).load()


@pytest.fixture
def slow_judge():
    # Slow enough that judging 12 runs (a verdict and a cluster call each) two calls at a time takes ~3 s: time to be
    # killed in the middle of it.
    with FakeOpenAIServer(delay_s=0.25) as server:
        yield server


def test_killed_twice_then_resumed_loses_and_repeats_nothing(tmp_path, slow_judge, monkeypatch):
    out = tmp_path / "run"
    args = command(out, slow_judge)

    # 1. Killed while generating: at least one batch journaled, not all.
    cli = Cli(args, tmp_path, tmp_path / "run1.log")
    try:
        cli.kill_when(lambda: any(e["type"] == "responses" for e in journal_events(out)), "a journaled batch")
    finally:
        cli.stop()
    plan = [r.run_id for r in load_results_file(out / "results.json").runs]
    assert len(plan) == N_RUNS
    after_first_kill = load_quietly(out)
    generated = {r.run_id for r in after_first_kill.runs if r.responses}
    assert 1 <= len(generated) < N_RUNS, "the kill did not land during generation"
    assert not slow_judge.requests
    marked = mark_journaled_answers(out)
    assert set(marked) == generated

    # 2. Re-run; killed while judging: some verdicts journaled, not all.
    cli = Cli(args, tmp_path, tmp_path / "run2.log")
    try:
        cli.kill_when(lambda: sum(e["type"] == "judge" for e in journal_events(out)) >= 2, "journaled verdicts")
    finally:
        cli.stop()
    after_second_kill = load_quietly(out)
    assert all(len(r.responses) == N_SAMPLES for r in after_second_kill.runs)  # generation had finished
    judged_before = {r.run_id: r.judge for r in after_second_kill.runs if r.judge is not None}
    assert 2 <= len(judged_before) < N_RUNS, "the kill did not land during judging"
    n_requests_before = len(slow_judge.requests)

    # 3. Re-run to the end: in this process (only the kills need a process of their own), and with a judge that
    # answers at once (its delay was there to be killed in the middle of; nothing is killed now).
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    slow_judge.delay_s = 0.0
    last = CliRunner().invoke(app, run_args(out, slow_judge), catch_exceptions=False)
    assert last.exit_code == 0, last.output[-4000:]

    final = load_results_file(out / "results.json")
    assert ResultsStore(out).journals() == []
    assert [r.run_id for r in final.runs] == plan  # none lost, none duplicated, plan order kept
    by_id = final.run_by_id()
    questions = {q.id: q.text for q in final.ao_questions}
    for run_id, texts in marked.items():  # journaled before the kill: kept, not generated again
        assert [r.text for r in by_id[run_id].responses] == texts
    for run in final.runs:
        assert len(run.responses) == N_SAMPLES
        assert len({r.sample_id for r in run.responses}) == N_SAMPLES
        assert run.judge is not None and run.judge.failure is None
        assert run.judge.score == expected_score([r.text for r in run.responses])
        assert run.clusters is not None and run.clusters.failure is None  # each run's cluster call too
        texts = [r.text for r in run.responses]
        assert {frozenset(c.answers) for c in run.clusters.parsed.clusters} == {
            frozenset(i for i, u in enumerate(texts, 1) if u == t) for t in texts}
    for run_id, record in judged_before.items():  # verdicts journaled before the kill: kept as they were
        assert by_id[run_id].judge == record

    # Every judge request, across both judging processes, mapped back to its run by the prompt it sent (question and
    # answers). A random model can give two targets the same answers to one question; such runs send one prompt and
    # are counted together.
    runs_of: dict[str, list[str]] = {}
    for run in final.runs:
        prompt = build_prompt(question=questions[run.ao_question_id], answers=[r.text for r in run.responses])
        runs_of.setdefault(prompt, []).append(run.run_id)
    # (The verdict calls: the cluster calls, owed and journaled by the same loop, are checked by their records above.)
    requests = [r for r in slow_judge.requests if not r.is_cluster_call]
    assert {r.prompt for r in requests} <= set(runs_of)
    before = Counter(r.prompt for r in slow_judge.requests[:n_requests_before] if not r.is_cluster_call)
    after = Counter(r.prompt for r in slow_judge.requests[n_requests_before:] if not r.is_cluster_call)
    for prompt, run_ids in runs_of.items():
        n_judged_before = sum(run_id in judged_before for run_id in run_ids)
        n_owed = len(run_ids) - n_judged_before
        assert after[prompt] == n_owed, run_ids  # owed: asked exactly once by the final run; judged: never again
        # Judged ones were asked once; owed ones at most once (the call in flight at the kill).
        assert n_judged_before <= before[prompt] <= n_judged_before + n_owed, run_ids
