"""``run --gpus 2`` killed with ``kill -9`` (the launcher, which became torchrun): its ranks end with it and the run
folder's lock is free, instead of two orphaned ranks finishing the run while rank 0 holds the folder. Two CPU ranks
of the tiny model, real processes; the ranks are found as the launcher's children in /proc."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ao_resampling.store import FolderBusyError, folder_lock

WAIT_S = 120
# Long answers: the run must still be going when it is killed (minutes of decoding on a CPU), so that ranks that
# outlived the launcher would show.
COMMAND = ["run", "--gpus", "2", "--preset", "experiment", "--model", "synthetic:tiny", "--oracle-lora", "random",
           "--dtype", "float32", "--device", "cpu", "--num-targets", "4", "--num-questions", "2", "--samples", "8",
           "--max-new-tokens", "2000", "--set", "top_p=1.0", "--set", "temperature=1.0", "--no-judge",
           "--embedding-model", "none", "--quiet"]


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while the folder was read
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status is left to collect


def wait_for(condition, what: str, log: Path, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"no {what} within {timeout_s} s:\n{log.read_text()[-3000:]}")


def test_kill_9_of_the_launcher_ends_its_ranks_and_frees_the_folder(tmp_path):
    out, log = tmp_path / "run", tmp_path / "launcher.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with open(log, "w") as sink:
        launcher = subprocess.Popen([sys.executable, "-m", "ao_resampling", *COMMAND, "--out", str(out)],
                                    cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT)
    ranks: list[int] = []
    try:

        def rank_0_holds_the_folder() -> bool:
            ranks[:] = children(launcher.pid)
            try:
                return len(ranks) == 2 and json.loads((out / ".lock").read_text())["pid"] in ranks
            except (OSError, ValueError):
                return False

        wait_for(rank_0_holds_the_folder, "two ranks with rank 0 holding the lock", log)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=10)
        wait_for(lambda: not any(alive(pid) for pid in ranks), "end of both ranks after the launcher's", log,
                 timeout_s=30)
    finally:  # what this test started is stopped, whatever failed
        if launcher.poll() is None:
            launcher.kill()
        for pid in [p for p in ranks if alive(p)]:
            os.kill(pid, signal.SIGKILL)

    def folder_is_free() -> bool:  # the next command on the folder is not refused as busy
        try:
            with folder_lock(out):
                return True
        except FolderBusyError:  # on a loaded machine the lock goes a moment after the last process is reaped
            return False

    wait_for(folder_is_free, "the folder's lock to be free", log, timeout_s=30)
    assert not (out / "report").exists()  # the ranks ended with the launcher, not by finishing the run
