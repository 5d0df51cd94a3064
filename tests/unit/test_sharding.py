"""Splitting the runs over ranks, and merging the ranks' journals back into one results.json.

``shard_runs`` must be a partition (every run on exactly one rank), balanced by token count (no shard ends more than
one run's cost above the lightest: the greedy bound), and a function of the set of runs alone, so every rank computes
the same split. The merge must not depend on which rank wrote first: results.json keeps the plan's order.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ao_resampling.ranks import World, backend_for, run_cost, shard_runs, torchrun_command
from ao_resampling.results import Response, Run, sha256_of_ids
from ao_resampling.store import ResultsStore
from tests.support.results_factory import DECODING, make_results

SAMPLES, MAX_NEW = 10, 120


def make_runs(prompt_lengths: list[int]) -> list[Run]:
    ids = [2, 105]
    return [Run(run_id=f"run__t{i:03d}__q", target_id=f"t{i:03d}", ao_question_id="q", assistant_start_idx=1,
                context_positions=[0, 1], context_input_ids=ids, context_input_ids_sha256=sha256_of_ids(ids),
                oracle_input_ids=list(range(n))) for i, n in enumerate(prompt_lengths)]


lengths = st.lists(st.integers(0, 400), min_size=0, max_size=60)
sizes = st.integers(1, 9)


def costs(runs: list[Run]) -> dict[str, int]:
    return {r.run_id: run_cost(r, samples=SAMPLES, max_new_tokens=MAX_NEW) for r in runs}


@settings(max_examples=200, deadline=None)
@given(prompt_lengths=lengths, world_size=sizes)
def test_shards_are_a_partition_in_plan_order(prompt_lengths, world_size):
    runs = make_runs(prompt_lengths)

    shards = shard_runs(runs, world_size, samples=SAMPLES, max_new_tokens=MAX_NEW)

    assert len(shards) == world_size
    assert sorted(rid for shard in shards for rid in shard) == sorted(r.run_id for r in runs), "each run exactly once"
    order = {r.run_id: i for i, r in enumerate(runs)}
    assert all([order[rid] for rid in shard] == sorted(order[rid] for rid in shard) for shard in shards)


@settings(max_examples=200, deadline=None)
@given(prompt_lengths=lengths, world_size=sizes)
def test_shards_are_balanced_by_token_count(prompt_lengths, world_size):
    runs = make_runs(prompt_lengths)
    cost = costs(runs)

    loads = [sum(cost[rid] for rid in shard) for shard in shard_runs(runs, world_size, samples=SAMPLES,
                                                                       max_new_tokens=MAX_NEW)]

    assert max(loads) - min(loads) <= max(cost.values(), default=0)


@settings(max_examples=100, deadline=None)
@given(prompt_lengths=lengths, world_size=sizes, seed=st.integers(0, 2**16))
def test_shards_depend_only_on_the_set_of_runs(prompt_lengths, world_size, seed):
    runs = make_runs(prompt_lengths)
    shuffled = random.Random(seed).sample(runs, len(runs))

    first = shard_runs(runs, world_size, samples=SAMPLES, max_new_tokens=MAX_NEW)
    again = shard_runs(runs, world_size, samples=SAMPLES, max_new_tokens=MAX_NEW)
    other_order = shard_runs(shuffled, world_size, samples=SAMPLES, max_new_tokens=MAX_NEW)

    assert first == again
    assert [set(s) for s in first] == [set(s) for s in other_order]


def test_costliest_runs_are_spread_first():
    runs = make_runs([100, 100, 10, 10])  # two expensive runs must not share a rank

    shards = shard_runs(runs, 2, samples=1, max_new_tokens=0)

    assert shards == [["run__t000__q", "run__t002__q"], ["run__t001__q", "run__t003__q"]]


def test_more_ranks_than_runs_leaves_some_idle():
    assert shard_runs(make_runs([5, 7]), 4, samples=1, max_new_tokens=1) == [["run__t001__q"], ["run__t000__q"], [], []]


@pytest.mark.parametrize("bad", [0, -1])
def test_a_world_needs_a_rank(bad):
    with pytest.raises(ValueError, match="world_size"):
        shard_runs(make_runs([1]), bad, samples=1, max_new_tokens=1)


# ---------------------------------------------------------------------------------------------------------------------
# Merging the ranks' journals


def responses_event(run_id: str) -> dict:
    return {"type": "responses", "run_id": run_id, "responses": [
        Response(sample_id=f"{run_id}__s{i:02d}", text=f"answer {i} of {run_id}", decoding=DECODING, n_tokens=3,
                 finish_reason="length").model_dump(mode="json") for i in range(2)]}


def merged_bytes(folder, plan, shards: list[list[str]], write_order: list[int]) -> bytes:
    """Write each shard's events into its rank journal, ranks taking turns in ``write_order``, then compact."""
    ResultsStore(folder).write(plan)
    for rank in write_order:
        store = ResultsStore(folder, journal_name=f"journal.rank{rank}.jsonl")
        for run_id in reversed(shards[rank]) if rank % 2 else shards[rank]:  # within a rank, any order too
            store.journal.append(responses_event(run_id))
    store = ResultsStore(folder)
    store.compact()
    assert not store.journals(), "compaction folds and removes every rank journal"
    return store.results_path.read_bytes()


def test_merge_is_independent_of_rank_count_and_finishing_order(tmp_path):
    plan = make_results([[None] * 3] * 4, answers=lambda *_: [])
    run_ids = [r.run_id for r in plan.runs]
    two = shard_runs(plan.runs, 2, samples=2, max_new_tokens=4)
    three = [run_ids[0::3], run_ids[1::3], run_ids[2::3]]

    outcomes = {
        merged_bytes(tmp_path / "two_in_order", plan, two, [0, 1]),
        merged_bytes(tmp_path / "two_rank1_first", plan, two, [1, 0]),
        merged_bytes(tmp_path / "three_reversed", plan, three, [2, 1, 0]),
        merged_bytes(tmp_path / "one_rank", plan, [run_ids], [0]),
    }

    assert len(outcomes) == 1, "byte-identical results.json whoever finished first"
    merged = ResultsStore(tmp_path / "one_rank").load()
    assert [r.run_id for r in merged.runs] == run_ids, "plan order"
    assert all(len(r.responses) == 2 for r in merged.runs)


# ---------------------------------------------------------------------------------------------------------------------
# Launch plumbing


@pytest.mark.parametrize("argv", [
    pytest.param(["run", "--gpus", "2", "--device", "cuda"], id="separate_value"),
    pytest.param(["run", "--gpus=2", "--device", "cuda"], id="equals_value"),
    pytest.param(["run", "--device", "cuda", "--gpus", "2"], id="last"),
])
def test_torchrun_command_reruns_the_same_arguments_without_gpus(argv):
    command = torchrun_command(2, argv, python="/venv/bin/python")

    assert command == ["/venv/bin/python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                       "-m", "ao_resampling", "run", "--device", "cuda"]


def test_backend_follows_the_device():
    assert [backend_for(d) for d in ("cuda", "cuda:1", "cpu")] == ["nccl", "nccl", "gloo"]


def test_rank_config_gives_each_rank_its_own_gpu():
    from ao_resampling.config import ExperimentConfig
    from ao_resampling.ranks import rank_config
    from ao_resampling.pipeline import PipelineError

    config = ExperimentConfig(device="cuda:0")

    assert rank_config(config, World(rank=3, size=4, local_rank=1)).device == "cuda:1"
    assert rank_config(config, World()).device == "cuda:0", "a single process keeps what it was given"
    assert rank_config(config.model_copy(update={"device": "cpu"}), World(1, 2, 1)).device == "cpu"
    with pytest.raises(PipelineError, match="device_map"):
        rank_config(config.model_copy(update={"device_map": "auto"}), World(0, 2, 0))
