"""The judge stage: every owed call of the AO runs (verdicts, cluster calls, their repeats), each record journaled as
it lands, so a kill loses only the calls in flight.

The prompts are common/prompts.py, the parsers and the plan of owed calls common/judge_prompt.py, the client call and
the concurrent loop common/judge_calls.py (the target-model baseline judges with the same pieces).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ao_resampling.config import ExperimentConfig
from ao_resampling.events import judge_call_event
from ao_resampling.results import JudgeRecord, Results
from ao_resampling.stages.common.judge_calls import (
    CallCounts, check_one_judge, job_caller, latest_records, make_client, run_calls,
)
from ao_resampling.stages.common.judge_prompt import JudgeJob, plan_judge_calls
from ao_resampling.store import ResultsStore

@dataclass
class JudgeStageReport:
    """Counts of each kind of call (keyed by its journal event type) and the runs skipped for having no answers."""

    calls: dict[str, CallCounts] = field(default_factory=dict)
    n_skipped_no_responses: int = 0

    def counts(self, event: str) -> CallCounts:
        return self.calls.setdefault(event, CallCounts())

    # The verdict calls' counts under their earlier names (what `judge` printed and tests read).
    n_sent = property(lambda self: self.counts("judge").sent)
    n_ok = property(lambda self: self.counts("judge").ok)
    n_failed = property(lambda self: self.counts("judge").failed)
    n_skipped_already_judged = property(lambda self: self.counts("judge").skipped)
    n_repeats_sent = property(lambda self: self.counts("judge_repeat").sent)
    n_repeats_ok = property(lambda self: self.counts("judge_repeat").ok)
    n_repeats_failed = property(lambda self: self.counts("judge_repeat").failed)
    n_repeats_skipped = property(lambda self: self.counts("judge_repeat").skipped)

    @property
    def n_calls_failed(self) -> int:
        return sum(sum(c.failed.values()) for c in self.calls.values())

    def summary(self) -> str:
        """What a user reads after ``judge``: calls sent, parsed, failed by reason, and what was skipped."""
        line = self.counts("judge").line("judge", "scored")
        line += (f"; skipped {self.n_skipped_already_judged} already judged, {self.n_skipped_no_responses} without "
                 "answers")
        for event, what, done in (("judge_repeat", "repeats", "scored"), ("clusters", "clusters", "partitioned"),
                                  ("clusters_repeat", "cluster repeats", "partitioned")):
            counts = self.calls.get(event)
            if counts is not None and (counts.sent or counts.skipped):
                line += "\n" + counts.line(what, done) + f"; {counts.skipped} already judged"
        return line


def failed_calls(results: Results) -> int:
    """Judge calls whose latest record is a failure: what a re-run retries."""
    return sum(1 for r in latest_records(results) if r.failure is not None)


# The judge settings a ``judge`` or ``run`` may change on an existing folder (none of them changes a verdict's
# meaning); meta.config records the ones last used, so it never claims a timeout the calls did not have.
JUDGE_PLUMBING = ("judge_api", "judge_base_url", "judge_timeout_s", "judge_max_retries", "judge_concurrency",
                  "judge_repeats", "judge_repeat_fraction", "clusters")


def with_judge_settings(meta_config: dict[str, Any] | None, config: ExperimentConfig) -> dict[str, Any]:
    """``meta_config`` with the judge plumbing replaced by ``config``'s (the base URL is redacted when written)."""
    used = config.model_dump(mode="json")
    return {**(meta_config or {}), **{k: used[k] for k in JUDGE_PLUMBING}}


def judge_stage(
    store: ResultsStore, config: ExperimentConfig, *, client: Any = None, progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> JudgeStageReport:
    """Judge every run that has answers and no verdict yet (plus its cluster call and owed repeats, as configured),
    journaling each record as it lands."""
    results = store.results
    check_one_judge(results, config, store.results_path)
    questions = {q.id: q.text for q in results.ao_questions}
    jobs, skipped = plan_judge_calls(
        results.runs, questions=questions, repeats=config.judge_repeats, repeat_fraction=config.judge_repeat_fraction,
        clusters=config.clusters,
    )
    report = JudgeStageReport(n_skipped_no_responses=skipped["no_responses"])
    for event, key in (("judge", "already_judged"), ("judge_repeat", "repeats_already_judged"),
                       ("clusters", "clusters_already_judged"), ("clusters_repeat", "cluster_repeats_already_judged")):
        if key in skipped:
            report.counts(event).skipped = skipped[key]
    if jobs:
        client = client if client is not None else make_client(config)
        _run_jobs(jobs, store, config, client, report, progress, log or _to_stderr)
        results.meta.config = with_judge_settings(results.meta.config, config)
    store.compact()
    return report


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run_jobs(
    jobs: list[JudgeJob], store: ResultsStore, config: ExperimentConfig, client: Any, report: JudgeStageReport,
    progress: bool, log: Callable[[str], None],
) -> None:
    def keep(job: JudgeJob, record: JudgeRecord) -> None:
        store.record([judge_call_event(job.event, job.run_id, record)])
        report.counts(job.event).add(record)

    run_calls(jobs, job_caller(client, config), keep, concurrency=config.judge_concurrency, desc="judge",
              progress=progress, log=log,
              resume=f"ao-resampling judge {store.folder}")
