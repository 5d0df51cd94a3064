"""The generation stage over two ranks (torchrun, gloo, CPU), end to end on the tiny random model.

Two ranks must write the file one process writes: the same runs in the same order, and with greedy decoding the same
answers. A re-run after a rank died mid-way (its journal cut off mid-line, here written by hand) finishes exactly the
runs that are missing, whatever number of ranks wrote the earlier journals. A rank that fails a step stops every rank
with its message; none is left waiting at a barrier.

Each launch under torchrun is a real subprocess (a few seconds of process start and model load per rank); the
one-process reference runs in this process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ao_resampling.cli import app
from ao_resampling.store import ResultsStore

SAMPLES = 2
COMMAND = ["run", "--preset", "experiment", "--model", "synthetic:tiny", "--oracle-lora", "random",
           "--dtype", "float32", "--device", "cpu", "--num-targets", "3", "--num-questions", "2",
           "--samples", str(SAMPLES), "--max-new-tokens", "4", "--temperature", "1.0", "--no-judge",
           "--embedding-model", "none", "--quiet"]
TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", *args]


def launch(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


def run_ok(command: list[str], cwd: Path) -> str:
    done = launch(command, cwd)
    assert done.returncode == 0, (f"{' '.join(command)}\n--- stdout\n{done.stdout[-3000:]}"
                                  f"\n--- stderr\n{done.stderr[-5000:]}")
    return done.stdout


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def one_process(runs_dir) -> dict:
    """The same command without torchrun, run in this process: the reference the ranks are held to."""
    out = runs_dir / "one_process"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(runs_dir)
        done = CliRunner().invoke(app, [*COMMAND, "--out", str(out)], catch_exceptions=False)
    assert done.exit_code == 0, done.output[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def two_ranks(runs_dir) -> tuple[dict, str]:
    out = runs_dir / "two_ranks"
    stdout = run_ok(torchrun(2, "-m", "ao_resampling", *COMMAND, "--out", str(out)), runs_dir)
    return json.loads((out / "results.json").read_text()), stdout


def answers(results: dict) -> dict[str, list[str]]:
    return {r["run_id"]: [s["text"] for s in r["responses"]] for r in results["runs"]}


def test_two_ranks_write_the_runs_one_process_writes(one_process, two_ranks, runs_dir):
    merged, stdout = two_ranks

    assert [r["run_id"] for r in merged["runs"]] == [r["run_id"] for r in one_process["runs"]], "plan order"
    assert all([s["sample_id"] for s in r["responses"]] == [f"{r['run_id']}__s{i:02d}" for i in range(SAMPLES)]
               for r in merged["runs"]), "every run has all its answers, once"
    assert merged["ao_questions"] == one_process["ao_questions"] and merged["targets"] == one_process["targets"]
    assert merged.keys() == one_process.keys() and merged["meta"].keys() == one_process["meta"].keys()
    assert not list((runs_dir / "two_ranks").glob("journal*.jsonl")), "the rank journals are folded in"
    assert "rank 1: sampled 3 runs" in stdout, "6 runs of equal cost: three each"
    assert (runs_dir / "two_ranks" / "report" / "report.md").exists(), "rank 0 ran the analysis"


def test_sampled_answers_do_not_depend_on_the_number_of_ranks(one_process, two_ranks):
    """Each sample draws from its own stream (seed, run, sample index): sharding the runs over two processes, with
    other rows beside each sample, changes none of the answers, and the merged file says how it was made."""
    merged, _ = two_ranks

    assert answers(merged) == answers(one_process)
    assert len({text for texts in answers(merged).values() for text in texts}) > len(merged["runs"]), "sampled"
    assert merged["runs"] == one_process["runs"], "token counts, finish reasons, spread: all the same"
    assert (merged["meta"]["decode_layout"]["processes"], one_process["meta"]["decode_layout"]["processes"]) == (2, 1)


def test_a_rerun_after_a_rank_died_finishes_exactly_the_missing_runs(one_process, runs_dir):
    """The plan plus journals of an earlier attempt with three ranks: rank 1 died mid-write, rank 2 finished one run."""
    out = runs_dir / "resumed"
    out.mkdir()
    plan = json.loads(json.dumps(one_process))
    for run in plan["runs"]:
        run["responses"], run["spread"] = [], None
    (out / "results.json").write_text(json.dumps(plan))
    run_ids = [r["run_id"] for r in plan["runs"]]
    survivors = {run_ids[0]: "rank0", run_ids[3]: "rank1", run_ids[5]: "rank2"}

    def event(run_id: str, tag: str) -> str:
        responses = [{"sample_id": f"{run_id}__s{i:02d}", "text": f"kept from {tag}", "n_tokens": 4,
                      "finish_reason": "length", "decoding": plan["meta"]["decoding"]} for i in range(SAMPLES)]
        return json.dumps({"type": "responses", "run_id": run_id, "responses": responses}) + "\n"

    (out / "journal.rank0.jsonl").write_text(event(run_ids[0], "rank0"))
    torn = event(run_ids[4], "torn")
    (out / "journal.rank1.jsonl").write_text(event(run_ids[3], "rank1") + torn[: len(torn) // 2])
    (out / "journal.rank2.jsonl").write_text(event(run_ids[5], "rank2"))

    stdout = run_ok([sys.executable, "-m", "ao_resampling", *COMMAND, "--gpus", "2", "--out", str(out)], runs_dir)

    resumed = ResultsStore(out).load()
    assert [r.run_id for r in resumed.runs] == run_ids
    assert all([s.sample_id for s in r.responses] == [f"{r.run_id}__s{i:02d}" for i in range(SAMPLES)]
               for r in resumed.runs), "every run complete, no answer twice"
    texts = {r.run_id: [s.text for s in r.responses] for r in resumed.runs}
    for run_id, tag in survivors.items():
        assert texts[run_id] == [f"kept from {tag}"] * SAMPLES, "finished work is never redone"
    redone = answers(one_process)
    for run_id in set(run_ids) - set(survivors):
        assert texts[run_id] == redone[run_id], "the missing runs (the torn one too) are sampled as usual"
    assert "rank 1: sampled" in stdout and not list(out.glob("journal*.jsonl"))


FAILING_STEP = """
import sys
from ao_resampling import ranks
from ao_resampling.config import ExperimentConfig
from ao_resampling.pipeline import PipelineError

here = ranks.start(ExperimentConfig(device="cpu"))
try:
    with ranks.together(here, "the test step"):
        if here.rank == 1:
            raise ValueError("rank 1 cannot go on")
except (PipelineError, ValueError) as e:
    print(f"rank {here.rank} stopped: {type(e).__name__}: {e}", flush=True)
    sys.exit(3)
finally:
    ranks.stop()
    import gc; gc.freeze()  # exit at once, as the CLI does
"""


def test_a_failing_rank_stops_every_rank_with_its_message(tmp_path):
    script = tmp_path / "failing_step.py"
    script.write_text(FAILING_STEP)

    done = launch(torchrun(2, str(script)), tmp_path)

    assert done.returncode != 0
    assert "rank 1 stopped: ValueError: rank 1 cannot go on" in done.stdout
    assert ("rank 0 stopped: PipelineError: the test step failed on rank 1: ValueError: rank 1 cannot go on"
            in done.stdout), "the waiting rank names the failing one instead of hanging"
