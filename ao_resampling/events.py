"""The journal's events: one pydantic model per event ``type``, versioned like ``results.json``.

Each journal line carries ``v`` (``JOURNAL_VERSION``) and is built only by the constructors below
(``responses_event``, ``judge_event``, ...); ``parse_event`` validates a line on replay (``store.py`` names the file
and line of a bad one). Lines written before events had a version (no ``v``) are migrated (``migrate_event_v0``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from ao_resampling.errors import describe_problems
from ao_resampling.results import ClusterRecord, JudgeRecord, Response, ResultsError, SpreadMetrics

JOURNAL_VERSION = 1


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = JOURNAL_VERSION


class ResponsesEvent(_Event):
    type: Literal["responses"] = "responses"
    run_id: str
    responses: list[Response]


class _VerdictEvent(_Event):
    run_id: str
    record: JudgeRecord


class JudgeEvent(_VerdictEvent):
    type: Literal["judge"] = "judge"


class JudgeRepeatEvent(_VerdictEvent):
    type: Literal["judge_repeat"] = "judge_repeat"


class _PartitionEvent(_Event):
    run_id: str
    record: ClusterRecord


class ClustersEvent(_PartitionEvent):
    """A run's cluster call: its answers' partition into meanings, or the failure."""

    type: Literal["clusters"] = "clusters"


class ClustersRepeatEvent(_PartitionEvent):
    """One of a run's repeated cluster calls, the answers shown in another order (the cluster judge's own noise)."""

    type: Literal["clusters_repeat"] = "clusters_repeat"


class SpreadEvent(_Event):
    type: Literal["spread"] = "spread"
    run_id: str
    spread: SpreadMetrics


class _BaselineEvent(_Event):
    run_id: str
    target_id: str
    meta: dict[str, Any] = {}  # the baseline's settings; set on the replies, where a new baseline starts


class BaselineResponsesEvent(_BaselineEvent):
    type: Literal["baseline_responses"] = "baseline_responses"
    responses: list[Response]


class BaselineJudgeEvent(_BaselineEvent):
    type: Literal["baseline_judge"] = "baseline_judge"
    record: JudgeRecord


class BaselineClustersEvent(_BaselineEvent):
    type: Literal["baseline_clusters"] = "baseline_clusters"
    record: ClusterRecord


class BaselineSpreadEvent(_BaselineEvent):
    type: Literal["baseline_spread"] = "baseline_spread"
    spread: SpreadMetrics


JournalEvent = Union[ResponsesEvent, JudgeEvent, JudgeRepeatEvent, ClustersEvent, ClustersRepeatEvent, SpreadEvent,
                     BaselineResponsesEvent, BaselineJudgeEvent, BaselineClustersEvent, BaselineSpreadEvent]
# type -> model. Looked up by hand rather than through a discriminated union, whose errors would put the type in
# front of every field ('spread.run_id' for a spread event's run_id).
EVENT_MODELS: dict[str, type[JournalEvent]] = {m.model_fields["type"].default: m for m in JournalEvent.__args__}


def responses_event(run_id: str, responses: Sequence[Response | Mapping[str, Any]]) -> ResponsesEvent:
    return ResponsesEvent(run_id=run_id, responses=list(responses))


def judge_event(run_id: str, record: JudgeRecord, *, repeat: bool = False) -> JudgeEvent | JudgeRepeatEvent:
    """The verdict of a run's judge call, or (``repeat``) of one of its repeated calls with shuffled answers."""
    return (JudgeRepeatEvent if repeat else JudgeEvent)(run_id=run_id, record=record)


# The event type each kind of AO judge call is journaled under (stages/common/judge_prompt.py's JudgeJob.event).
JUDGE_CALL_EVENTS = ("judge", "judge_repeat", "clusters", "clusters_repeat")


def judge_call_event(event: str, run_id: str, record: JudgeRecord | ClusterRecord
                     ) -> JudgeEvent | JudgeRepeatEvent | ClustersEvent | ClustersRepeatEvent:
    """The record of an AO judge call of any kind, journaled under its job's ``event`` type."""
    if event not in JUDGE_CALL_EVENTS:
        raise ValueError(f"{event!r} is not a judge call's event; expected one of {JUDGE_CALL_EVENTS}")
    return EVENT_MODELS[event](run_id=run_id, record=record)


def spread_event(run_id: str, spread: SpreadMetrics) -> SpreadEvent:
    return SpreadEvent(run_id=run_id, spread=spread)


def baseline_responses_event(run_id: str, target_id: str, responses: Sequence[Response | Mapping[str, Any]],
                             meta: Mapping[str, Any]) -> BaselineResponsesEvent:
    return BaselineResponsesEvent(run_id=run_id, target_id=target_id, responses=list(responses), meta=dict(meta))


def baseline_judge_event(run_id: str, target_id: str, record: JudgeRecord) -> BaselineJudgeEvent:
    return BaselineJudgeEvent(run_id=run_id, target_id=target_id, record=record)


def baseline_clusters_event(run_id: str, target_id: str, record: ClusterRecord) -> BaselineClustersEvent:
    return BaselineClustersEvent(run_id=run_id, target_id=target_id, record=record)


def baseline_spread_event(run_id: str, target_id: str, spread: SpreadMetrics) -> BaselineSpreadEvent:
    return BaselineSpreadEvent(run_id=run_id, target_id=target_id, spread=spread)


def event_line(event: JournalEvent | Mapping[str, Any]) -> str:
    """One journal line. A mapping is written as it is (a line in an older format, as tests write them)."""
    data = event.model_dump(mode="json") if isinstance(event, BaseModel) else event
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n"


def migrate_event_v0(raw: dict[str, Any]) -> dict[str, Any]:
    """A line written before events had a version: the same keys, no ``v``. Replay then read only the keys it knew
    and ignored any other, so those are dropped here rather than refused."""
    model = EVENT_MODELS.get(raw.get("type"))
    return dict({k: v for k, v in raw.items() if model is None or k in model.model_fields}, v=JOURNAL_VERSION)


def parse_event(raw: Any) -> JournalEvent:
    """A journal line's JSON as a typed event, or a ResultsError saying what is wrong with it."""
    if not isinstance(raw, dict):
        raise ResultsError(f"expected a JSON object (an event), got {type(raw).__name__}")
    if "v" not in raw:
        raw = migrate_event_v0(raw)
    elif type(raw["v"]) is not int or raw["v"] > JOURNAL_VERSION:
        raise ResultsError(f"field 'v': event version {raw['v']!r} is not one this tool reads (up to "
                           f"{JOURNAL_VERSION}); upgrade")
    model = EVENT_MODELS.get(raw.get("type"))
    if model is None:
        raise ResultsError(f"field 'type': {raw.get('type')!r} is not an event type; expected one of "
                           f"{sorted(EVENT_MODELS)}")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ResultsError(f"event {raw.get('type')!r}: {describe_problems(e, limit=3)}") from e
