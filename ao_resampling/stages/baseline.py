"""The target-model baseline: does the oracle's spread just mirror the target model's own variability on the prompt?

For each target the base model itself (adapter off, nothing injected) continues the target's conversation, the very
encoding with the generation prompt that the AO reads its activation from, n times at the AO's temperature and top_p
(``sample_baseline``: batched by the ``Sampler``, journaled per batch, targets already sampled are skipped). One
judge call per target rates how similar the n replies are, on the AO judge's 1-10 scale and strict JSON
(common/prompts.py's ``build_baseline_prompt``, sent by common/judge_calls.py; a failed call is recorded, never a
score), one more groups them by meaning as the AO runs' cluster call does (``build_baseline_cluster_prompt``, the
replies shuffled with a recorded seed), and the replies' spread is cached like the AO runs'
(common/spreads.py's ``missing_spreads``). Everything lands in the ``baseline`` section of results.json; its
statistics (the AO against the target model, per target) are analysis/comparison.py (and, for the clusters,
analysis/clusters.py).
A baseline saved on its own in the earlier single-script format is read by ``results.load_baseline_file``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ao_resampling.config import Decoding, ExperimentConfig
from ao_resampling.errors import AOResamplingError
from ao_resampling.engine.decoding.sampler import Query, Sample
from ao_resampling.engine.loading import models
from ao_resampling.inputs.plan_check import context_overflows
from ao_resampling.stages.common.judge_calls import CallCounts, check_one_judge, job_caller, make_client, run_calls
from ao_resampling.stages.common.judge_prompt import CallKind, cluster_seed, judge_call_id, seeded_order
from ao_resampling.stages.common.prompts import build_baseline_cluster_prompt, build_baseline_prompt
from ao_resampling.stages.common.sampling import load_oracle, loaded_decoding, make_sampler, run_sampler, to_responses
from ao_resampling.stages.common.spreads import Encoder, check_embedding_model, missing_spreads
from ao_resampling.results import Baseline, JudgeRecord, Results
from ao_resampling.events import (
    baseline_clusters_event, baseline_judge_event, baseline_responses_event, baseline_spread_event,
)
from ao_resampling.store import ResultsStore

if TYPE_CHECKING:
    from ao_resampling.engine.loading.models import LoadedOracle


class BaselineError(AOResamplingError, RuntimeError):
    """A baseline stage that cannot go ahead as asked; the message says what to change."""


def baseline_run_id(target_id: str) -> str:
    return f"baseline__{target_id}"


# ---------------------------------------------------------------------------------------------------------------------
# What the stage owes (pure)


def baseline_decoding(planned: Decoding | None, config: ExperimentConfig) -> Decoding:
    """The run's one decoding (the plan's, merged with the model's generation_config), with the baseline's own
    length: the target model answers a conversation, which takes longer than an oracle's answer."""
    if planned is None:  # a file of an older version without a recorded decoding: the run's own settings
        planned = Decoding(temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens,
                           do_sample=config.temperature > 0, seed=config.decode_seed, top_k=config.top_k)
    return planned.model_copy(update={"max_new_tokens": config.baseline_max_new_tokens})


def baseline_meta(config: ExperimentConfig, decoding: Decoding) -> dict[str, Any]:
    """What made the baseline; a resumed stage must match it (``check_resumable``)."""
    return {"model": config.model, "tokenizer": config.tokenizer or config.model,
            "adapter": "off (base model, nothing injected)", "samples_per_query": config.samples_per_query,
            "decoding": decoding.model_dump(mode="json")}


def check_resumable(results: Results, config: ExperimentConfig) -> None:
    """Refuse to add replies made with other settings to a baseline that already has some."""
    if results.baseline is None or not any(r.responses for r in results.baseline.runs):
        return
    old = results.baseline.meta
    new = baseline_meta(config, baseline_decoding(results.meta.decoding, config))
    differences = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in ("model", "samples_per_query", "decoding")
                   if k in old and old[k] != new[k]]
    if differences:
        raise BaselineError("the baseline in this folder was sampled with other settings; refusing to mix them:\n  "
                            + "\n  ".join(differences) + "\nUse the original settings (e.g. --baseline-max-new-tokens)"
                            " or another folder.")


def contexts_to_sample(results: Results, n: int) -> dict[str, list[int]]:
    """target_id -> its chat encoding with the generation prompt, for each target without n baseline replies yet."""
    done = {r.target_id for r in results.baseline.runs if len(r.responses) >= n} if results.baseline else set()
    todo: dict[str, list[int]] = {}
    for run in results.runs:  # any run of a target carries the target's encoding
        if run.target_id not in done and run.target_id not in todo:
            todo[run.target_id] = list(run.context_input_ids)
    return todo


@dataclass(frozen=True)
class BaselineJudgeJob:
    run_id: str
    target_id: str
    judge_call_id: str
    prompt: str
    kind: CallKind = "verdict"
    answer_order: tuple[int, ...] | None = None  # a cluster call's shuffle: 1-based stored index of each shown reply
    shuffle_seed: int | None = None


def plan_baseline_judge_calls(results: Results, *, clusters: bool = False) -> tuple[list[BaselineJudgeJob], int]:
    """The judge calls still owed (a recorded failure is owed again, a parsed reply is not) and how many are done;
    ``clusters``: each target's cluster call too, its replies shuffled as the AO runs' are."""
    if results.baseline is None:
        return [], 0
    messages = {t.id: t.messages for t in results.targets}
    jobs, n_done = [], 0
    for run in results.baseline.runs:
        if not run.responses:
            continue
        if run.target_id not in messages:
            raise BaselineError(f"baseline run {run.run_id!r}: target {run.target_id!r} is not in 'targets'")
        texts = [r.text for r in run.responses]
        verdict_owed = run.judge is None or run.judge.failure is not None
        clusters_owed = clusters and (run.clusters is None or run.clusters.failure is not None)
        n_done += (not verdict_owed) + (clusters and not clusters_owed)
        if verdict_owed:
            prompt = build_baseline_prompt(messages=messages[run.target_id], responses=texts)
            jobs.append(BaselineJudgeJob(run.run_id, run.target_id, judge_call_id(run.run_id), prompt))
        if clusters_owed:
            seed = cluster_seed(run.run_id)
            order = tuple(seeded_order(seed, len(texts)))
            prompt = build_baseline_cluster_prompt(messages=messages[run.target_id],
                                                   responses=[texts[i - 1] for i in order])
            jobs.append(BaselineJudgeJob(run.run_id, run.target_id, judge_call_id(run.run_id, kind="clusters"), prompt,
                                         "clusters", order, seed))
    return jobs, n_done


# ---------------------------------------------------------------------------------------------------------------------
# The stage


@dataclass
class BaselineStageReport:
    n_sampled: int = 0
    n_already_sampled: int = 0
    n_judge_sent: int = 0
    n_judge_ok: int = 0
    n_judge_failed: dict[str, int] = field(default_factory=dict)  # by FailureReason
    n_already_judged: int = 0  # calls of either kind with a parsed reply already
    clusters: CallCounts = field(default_factory=CallCounts)
    n_spread: int = 0


def baseline_stage(store: ResultsStore, config: ExperimentConfig, *, oracle: LoadedOracle | None = None,
                   judge: bool = True, judge_client: Any = None, progress: bool = True,
                   encoder: Encoder | None = None) -> BaselineStageReport:
    """Sample the missing targets, judge the unjudged (``judge=False``: replies only), cache their spread."""
    report = BaselineStageReport()
    if encoder is None:  # the spreads come last: a bad embedding model fails before sampling and the paid calls
        check_embedding_model(config.embedding_model)
    report.n_sampled, report.n_already_sampled = sample_baseline(store, config, oracle=oracle, progress=progress)
    if judge:
        judge_baseline(store, config, client=judge_client, report=report, progress=progress)
    report.n_spread = baseline_spread_stage(store, embedding_model=config.embedding_model, encoder=encoder,
                                            progress=progress)
    return report


def sample_baseline(store: ResultsStore, config: ExperimentConfig, *, oracle: LoadedOracle | None = None,
                    progress: bool = True) -> tuple[int, int]:
    """n replies of the base model per target still missing them; returns (targets sampled, targets already done)."""
    results = store.results
    check_resumable(results, config)
    todo = contexts_to_sample(results, config.samples_per_query)
    n_done = len({r.target_id for r in results.runs}) - len(todo)
    if not todo:
        return 0, n_done
    check_fits(results, todo, config)
    oracle = oracle or load_oracle(config)
    planned = loaded_decoding(oracle, config, results.meta.decoding, where=str(store.results_path))
    decode = baseline_decoding(planned, config)
    meta = baseline_meta(config, decode)
    target_of = {baseline_run_id(t): t for t in todo}
    queries = [Query(key=baseline_run_id(t), input_ids=tuple(ids), n=config.samples_per_query)
               for t, ids in todo.items()]

    def journal(run_id: str, samples: list[Sample]) -> None:
        store.record([baseline_responses_event(run_id, target_of[run_id], to_responses(run_id, samples, decode),
                                               meta)])

    run_sampler(make_sampler(oracle, config, decode, use_adapter=False), queries, on_answers=journal,
                progress=progress, desc="target-model samples", resume=f"ao-resampling baseline {store.folder}")
    order = {t.id: i for i, t in enumerate(results.targets)}  # batches finish longest prompt first; store plan order
    results.baseline.runs.sort(key=lambda r: (order.get(r.target_id, len(order)), r.target_id))
    if results.meta.config is not None:  # what the replies were made with, so the next plain command continues
        results.meta.config = {**results.meta.config, "baseline_max_new_tokens": config.baseline_max_new_tokens}
    store.compact()
    return len(todo), n_done


def check_fits(results: Results, todo: Mapping[str, list[int]], config: ExperimentConfig) -> None:
    """Refuse, before the model loads, a target whose replies would run past the model's context window."""
    limit = models.model_context_length(config.model)
    overflows = context_overflows([r for r in results.runs if r.target_id in todo], limit=limit, max_new_tokens=0,
                                  baseline_new_tokens=config.baseline_max_new_tokens)
    if overflows:
        raise BaselineError(f"model {config.model!r} takes at most {limit} positions (max_position_embeddings); the "
                            "target-model replies would not fit:\n  " + "\n  ".join(overflows)
                            + "\nLower --baseline-max-new-tokens.")


def judge_baseline(store: ResultsStore, config: ExperimentConfig, *, client: Any = None,
                   report: BaselineStageReport | None = None, progress: bool = True) -> BaselineStageReport:
    """One judge call per sampled target without a verdict (and one cluster call, as configured), concurrently, each
    record journaled as it lands."""
    report = report if report is not None else BaselineStageReport()
    check_one_judge(store.results, config, store.results_path)
    jobs, report.n_already_judged = plan_baseline_judge_calls(store.results, clusters=config.clusters)
    if not jobs:
        return report
    client = client if client is not None else make_client(config)

    def keep(job: BaselineJudgeJob, record: JudgeRecord) -> None:
        if job.kind == "clusters":
            store.record([baseline_clusters_event(job.run_id, job.target_id, record)])
            report.clusters.add(record)
            return
        store.record([baseline_judge_event(job.run_id, job.target_id, record)])
        report.n_judge_sent += 1
        if record.failure is None:
            report.n_judge_ok += 1
        else:
            report.n_judge_failed[record.failure.reason] = report.n_judge_failed.get(record.failure.reason, 0) + 1

    run_calls(jobs, job_caller(client, config), keep, concurrency=config.judge_concurrency, desc="baseline judge",
              progress=progress,
              log=lambda message: print(message, file=sys.stderr, flush=True),
              resume=f"ao-resampling baseline {store.folder}")
    store.compact()
    return report


def baseline_spread_stage(store: ResultsStore, *, embedding_model: str, encoder: Encoder | None = None,
                          progress: bool = True) -> int:
    """Cache the spread of every baseline run with replies and no spread from ``embedding_model``; how many."""
    baseline = store.results.baseline
    runs = baseline.runs if baseline is not None else []
    spreads = missing_spreads(runs, embedding_model=embedding_model, encoder=encoder, progress=progress)
    if not spreads:
        return 0
    target_of = {r.run_id: r.target_id for r in runs}
    store.record([baseline_spread_event(run_id, target_of[run_id], s) for run_id, s in spreads.items()])
    store.compact()
    return len(spreads)


def with_spreads(baseline: Baseline, *, embedding_model: str, encoder: Encoder | None = None) -> Baseline:
    """A baseline held only in memory (a separate file) with its missing spreads filled in."""
    spreads = missing_spreads(baseline.runs, embedding_model=embedding_model, encoder=encoder)
    if not spreads:
        return baseline
    runs = [r.model_copy(update={"spread": spreads[r.run_id]}) if r.run_id in spreads else r for r in baseline.runs]
    return baseline.model_copy(update={"runs": runs})
