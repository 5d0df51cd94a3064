"""Several GPUs (or CPU processes) with torch.distributed, launched by torchrun: the process group, the ranks'
meetings, the sharding of runs, the launch, and ``generate_shard``: one rank's part of the generation stage. Process
orchestration sits here, beside the pipeline; the engine and the stages know nothing of ranks.

``torchrun --nproc-per-node N -m ao_resampling run ...`` (or ``ao-resampling run --gpus N``, which execs exactly that)
starts N ranks. Each loads its own copy of the model on ``cuda:{LOCAL_RANK}``; rank 0 alone writes the plan (one
question sample, one set of run ids), the others wait for it. The pending runs are then split into shards balanced by
token count (``shard_runs``, pure) and each rank journals its shard into ``journal.rank{r}.jsonl`` beside
``results.json``. When every rank is done, rank 0 folds all journals into one ``results.json`` -- runs in plan order,
the file a single-GPU run writes -- and runs the judge and the analysis alone; the other ranks exit.

Resuming: a rank that dies loses its in-flight batch (torchrun then stops the others, which lose theirs). Pending
runs are always computed from ``results.json`` plus *every* journal, so a re-run with any number of ranks finishes
exactly the missing runs.

The ranks meet only at a few steps, and each meeting also carries failures (``together``): a rank that fails a step
makes every rank stop there with its message, instead of leaving the others waiting at a barrier.

The run folder's lock (store.py) is taken by rank 0 alone (cli.py), before the group forms: the other ranks write
only their own ``journal.rank{r}.jsonl`` and only after rank 0's plan, so rank 0 holding the folder holds it for the
group, and a busy folder stops rank 0 at once and torchrun the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ao_resampling.config import ExperimentConfig
from ao_resampling.engine.decoding.sampler import Layout
from ao_resampling.engine.loading.models import LoadedOracle
from ao_resampling.errors import PipelineError
from ao_resampling.results import Run
from ao_resampling.stages.generate import generate, pending_runs
from ao_resampling.store import ResultsStore

# The longest one rank waits for the others at one step: the slowest shard's generation, or rank 0's plan. A dead
# rank never makes the others wait this long (torchrun stops the whole group when one worker fails).
STEP_TIMEOUT = dt.timedelta(hours=12)
LAUNCHER_PID = "AO_RESAMPLING_LAUNCHER_PID"  # set by ``relaunch`` for the ranks of `--gpus N`
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class World:
    """Where this process stands: rank ``rank`` of ``size``, ``local_rank`` on its host (its GPU index)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place: from the process group once joined, else from torchrun's environment, else alone."""
    env = os.environ
    local_rank = int(env.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), local_rank)
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), local_rank)


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def start(config: ExperimentConfig) -> World:
    """Join the process group when torchrun started several ranks; a single process stays a world of one."""
    die_with_the_launcher()
    here = world()
    if not here.is_distributed or dist.is_initialized():
        return here
    backend = backend_for(config.device)
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(here.local_rank)  # object collectives stage their bytes on the current device
        kwargs["device_id"] = torch.device("cuda", here.local_rank)
    dist.init_process_group(backend=backend, timeout=STEP_TIMEOUT, **kwargs)
    return world()


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_config(config: ExperimentConfig, here: World) -> ExperimentConfig:
    """Each rank its own GPU: ``cuda`` (or ``cuda:K``) becomes ``cuda:{LOCAL_RANK}``; CPU ranks stay on the CPU."""
    if not here.is_distributed:
        return config
    if config.device_map:
        raise PipelineError(
            f"device_map={config.device_map!r} with {here.size} ranks: every rank would spread its model over every "
            "visible GPU. Use either several ranks (one GPU each) or one process with --device-map auto."
        )
    if config.device.startswith("cuda"):
        return config.model_copy(update={"device": f"cuda:{here.local_rank}"})
    return config


@contextlib.contextmanager
def together(here: World, step: str) -> Iterator[None]:
    """Run one step on every rank, then meet; if any rank failed, every rank raises (the failing one its own error).

    A meeting is an all-gather of each rank's error message (None when it succeeded), so it is also a barrier.
    """
    if not here.is_distributed:
        yield
        return
    try:
        yield
    except Exception as e:
        _gather(f"{type(e).__name__}: {e}")
        raise
    failures = [(rank, error) for rank, error in enumerate(_gather(None)) if error is not None]
    if failures:
        raise PipelineError(
            f"{step} failed on " + "; ".join(f"rank {rank}: {error}" for rank, error in failures)
        )


def _gather(error: str | None) -> list[str | None]:
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return errors


# ---------------------------------------------------------------------------------------------------------------------
# Sharding (pure)


def run_cost(run: Run, *, samples: int, max_new_tokens: int) -> int:
    """Tokens a run costs: ``samples`` rows, each its oracle prompt plus ``max_new_tokens`` decoded."""
    return samples * (len(run.oracle_input_ids or ()) + max_new_tokens)


def shard_runs(runs: Sequence[Run], world_size: int, *, samples: int, max_new_tokens: int) -> list[list[str]]:
    """Split runs into ``world_size`` shards of run ids: every run in exactly one, loads balanced by token count.

    Greedy longest-processing-time: costliest run first (ties by run_id), each onto the lightest shard so far (ties by
    shard index). The result depends only on the set of runs, and no shard ends more than one run's cost above the
    lightest. Each shard lists its runs in the order given (the plan's).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    cost = {r.run_id: run_cost(r, samples=samples, max_new_tokens=max_new_tokens) for r in runs}
    if len(cost) != len(runs):
        raise ValueError("shard_runs: duplicate run_id")
    loads = [0] * world_size
    shard_of: dict[str, int] = {}
    for run_id in sorted(cost, key=lambda rid: (-cost[rid], rid)):
        lightest = min(range(world_size), key=lambda s: (loads[s], s))
        shard_of[run_id] = lightest
        loads[lightest] += cost[run_id]
    shards: list[list[str]] = [[] for _ in range(world_size)]
    for r in runs:
        shards[shard_of[r.run_id]].append(r.run_id)
    return shards


def rank_journal_name(rank: int) -> str:
    return f"journal.rank{rank}.jsonl"


# ---------------------------------------------------------------------------------------------------------------------
# Launching


def check_launch(config: ExperimentConfig, nproc: int) -> None:
    """Refuse, before starting N processes, what every one of them would refuse."""
    rank_config(config, World(size=nproc))
    if config.device.startswith("cuda") and torch.cuda.device_count() < nproc:
        raise PipelineError(
            f"--gpus {nproc} asked for, but {torch.cuda.device_count()} CUDA device(s) are visible here"
        )


def torchrun_command(nproc: int, argv: Sequence[str], python: str = sys.executable) -> list[str]:
    """The torchrun command that reruns this CLI invocation on ``nproc`` ranks: the same arguments minus ``--gpus``."""
    args: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            args.append(arg)
    # --standalone: a rendezvous on localhost with a free port, so two runs on one host never collide.
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "ao_resampling", *args]


def relaunch(nproc: int, argv: Sequence[str]) -> None:
    """Replace this process by torchrun running the same command on ``nproc`` ranks (never returns)."""
    command = torchrun_command(nproc, argv)
    os.environ[LAUNCHER_PID] = str(os.getpid())  # exec keeps the pid: torchrun's, the ranks' parent
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


def die_with_the_launcher() -> None:
    """A rank of ``--gpus N`` ends when the torchrun it was started by ends, ``kill -9`` included: torchrun cannot
    forward a SIGKILL, and its ranks would go on, rank 0 holding the run folder's lock, with no one to stop them.
    The kernel kills this process when its parent dies (PR_SET_PDEATHSIG); it loses its in-flight batch, as any kill.
    """
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise PipelineError(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
    if os.getppid() != int(launcher):  # it died before the prctl: no signal will come
        os.kill(os.getpid(), signal.SIGKILL)


def generate_shard(folder: Path, config: ExperimentConfig, here: World, *, oracle: LoadedOracle,
                   progress: bool = True) -> Layout | None:
    """This rank's part of the generation stage, after rank 0 has written the plan; returns when every rank is done.

    Returns how this rank decoded (None if its shard was empty). Rank 0 merges the journals afterwards
    (``ResultsStore.compact``).
    """
    with together(here, "folding the journals of an earlier attempt"):
        if here.is_main:
            # One file to start from: the journals of an earlier attempt (with any number of ranks, cut short by a
            # kill or not) are folded in before any rank appends to a journal again.
            ResultsStore(folder).compact()
    with together(here, "splitting the pending runs"):
        # Every rank reads the journals here, before any rank appends to them, so all split the same pending set.
        store = ResultsStore(folder, journal_name=rank_journal_name(here.rank))
        todo = pending_runs(store.results, config.samples_per_query)
        mine = set(shard_runs(todo, here.size, samples=config.samples_per_query,
                              max_new_tokens=config.max_new_tokens)[here.rank])
    with together(here, "generation"):
        layout = generate(store, config, oracle=oracle, progress=progress, runs_filter=lambda r: r.run_id in mine)
    return layout
