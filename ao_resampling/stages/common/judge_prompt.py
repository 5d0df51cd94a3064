"""The judge's pure core: the reply schemas, the strict parsers and which calls a stage still owes.

Everything here is keyword-only and touches nothing outside. Two kinds of call share one loop (judge_calls.py):
a **verdict** (prompts.py's ``build_prompt``; ``parse_verdict``: the 1-10 JSON verdict) and a **cluster** call
(``build_cluster_prompt``: the same blocks, shuffled with a recorded seed; ``parse_clusters``: a partition of 1..n,
mapped back to the stored order). A reply that is not what was asked for is a ``JudgeOutputError`` naming the
FailureReason. ``plan_judge_calls`` lists the owed calls, with the seeded subset and answer shuffles of the repeats.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ao_resampling.results import ClusterVerdict, FailureReason, MeaningCluster, Run, Verdict
from ao_resampling.stages.common.prompts import RATIONALE_KEY, SCORE_KEY, build_cluster_prompt, build_prompt

SCHEMA_NAME = "answer_similarity_verdict"
VERDICT_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        SCORE_KEY: {"type": "integer", "enum": list(range(1, 11))},
        RATIONALE_KEY: {"type": "string"},
    },
    "required": [SCORE_KEY, RATIONALE_KEY],
    "additionalProperties": False,
}
CLUSTER_SCHEMA_NAME = "answer_meaning_clusters"
CLUSTER_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"clusters": {"type": "array", "items": {
        "type": "object",
        "properties": {"meaning": {"type": "string"}, "answers": {"type": "array", "items": {"type": "integer"}}},
        "required": ["meaning", "answers"],
        "additionalProperties": False,
    }}},
    "required": ["clusters"],
    "additionalProperties": False,
}
CallKind = Literal["verdict", "clusters"]
# kind -> (the structured-output schema's name, the schema) the call asks for
RESPONSE_SCHEMAS: dict[str, tuple[str, dict[str, Any]]] = {
    "verdict": (SCHEMA_NAME, VERDICT_JSON_SCHEMA), "clusters": (CLUSTER_SCHEMA_NAME, CLUSTER_JSON_SCHEMA),
}


class JudgeOutputError(ValueError):
    """A judge reply that is not a verdict; ``reason`` is the FailureReason stored with the record."""

    def __init__(self, reason: FailureReason, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason: FailureReason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------------------------------
# Parsing (pure)


def _reject_constant(name: str) -> Any:
    raise JudgeOutputError("invalid_json", f"{name} is not valid JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys silently; a reply that says two scores has said neither.
    counts = Counter(k for k, _ in pairs)
    duplicates = sorted(k for k, c in counts.items() if c > 1)
    if duplicates:
        raise JudgeOutputError("schema_mismatch", f"duplicate key(s) {duplicates}")
    return dict(pairs)


def _decode_object(raw: str) -> dict[str, Any]:
    """Exactly one bare JSON object (no fence, no prose, no repeated key), or a JudgeOutputError saying what it is."""
    text = raw.strip() if isinstance(raw, str) else ""
    if not text:
        raise JudgeOutputError("empty_output", "the reply is empty" if not raw else "the reply is only whitespace")
    if text.startswith("```"):
        raise JudgeOutputError("invalid_json", "the JSON is wrapped in a markdown code fence; expected bare JSON")
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    try:
        obj, end = decoder.raw_decode(text)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        hint = " (prose before the JSON?)" if e.pos == 0 and "{" in text else ""
        raise JudgeOutputError("invalid_json", f"not valid JSON at {where}: {e.msg}{hint}") from None
    if end != len(text):
        raise JudgeOutputError(
            "invalid_json", f"extra text after the JSON value at character {end}: {text[end:end + 40]!r}"
        )
    if not isinstance(obj, dict):
        raise JudgeOutputError("schema_mismatch", f"expected a JSON object, got {_json_type(obj)}")
    return obj


def _exact_keys(obj: dict[str, Any], keys: Sequence[str], where: str = "") -> None:
    missing = [k for k in keys if k not in obj]
    extra = sorted(k for k in obj if k not in keys)
    if missing or extra:
        parts = ([f"missing key(s) {missing}"] if missing else []) + ([f"unexpected key(s) {extra}"] if extra else [])
        raise JudgeOutputError("schema_mismatch", where + "; ".join(parts))


def parse_verdict(raw: str) -> Verdict:
    """Exactly one JSON object ``{"similarity_1_to_10": int 1..10, "rationale": str}``, or a JudgeOutputError."""
    obj = _decode_object(raw)
    _exact_keys(obj, (SCORE_KEY, RATIONALE_KEY))
    score, rationale = obj[SCORE_KEY], obj[RATIONALE_KEY]
    # bool is an int in Python and 7.0 == 7; neither is what the schema asked for.
    if type(score) is not int:
        raise JudgeOutputError("schema_mismatch", f"{SCORE_KEY} must be an integer, got {_json_type(score)} {score!r}")
    if not 1 <= score <= 10:
        raise JudgeOutputError("out_of_range", f"{SCORE_KEY} is {score}, outside 1..10")
    if not isinstance(rationale, str):
        raise JudgeOutputError(
            "schema_mismatch", f"{RATIONALE_KEY} must be a string, got {_json_type(rationale)} {rationale!r}"
        )
    return Verdict(similarity_1_to_10=score, rationale=rationale)


def parse_clusters(raw: str, *, answer_order: Sequence[int]) -> ClusterVerdict:
    """``{"clusters": [{"meaning": str, "answers": [int, ...]}, ...]}`` naming each shown answer 1..n exactly once,
    mapped back to the stored order (shown answer k is stored answer ``answer_order[k-1]``); else a JudgeOutputError:
    ``schema_mismatch`` (shape), ``out_of_range`` (a number outside 1..n), ``not_a_partition`` (a number twice or
    missing, an empty cluster)."""
    obj = _decode_object(raw)
    _exact_keys(obj, ("clusters",))
    clusters = obj["clusters"]
    if not isinstance(clusters, list) or not clusters:
        what = "an empty array" if isinstance(clusters, list) else _json_type(clusters)
        raise JudgeOutputError("schema_mismatch", f"'clusters' must be a non-empty array, got {what}")
    n = len(answer_order)
    found = [_cluster(c, k, n) for k, c in enumerate(clusters)]
    counts = Counter(i for _, numbers in found for i in numbers)
    twice = sorted(i for i, c in counts.items() if c > 1)
    missing = sorted(set(range(1, n + 1)) - set(counts))
    if twice or missing:
        parts = ([f"answer(s) {twice} in more than one place"] if twice else []) + (
            [f"answer(s) {missing} in no cluster"] if missing else [])
        raise JudgeOutputError("not_a_partition", "; ".join(parts) + f" (each of 1..{n} exactly once)")
    stored = [(meaning, sorted(answer_order[i - 1] for i in numbers)) for meaning, numbers in found]
    ordered = sorted(stored, key=lambda c: c[1])  # by their smallest stored answer: one spelling per partition
    return ClusterVerdict(clusters=[MeaningCluster(meaning=m, answers=a) for m, a in ordered])


def _cluster(cluster: Any, k: int, n: int) -> tuple[str, list[int]]:
    """One cluster's (meaning, shown answer numbers), its shape and range checked."""
    where = f"clusters[{k}]: "
    if not isinstance(cluster, dict):
        raise JudgeOutputError("schema_mismatch", f"{where}expected an object, got {_json_type(cluster)}")
    _exact_keys(cluster, ("meaning", "answers"), where)
    meaning, numbers = cluster["meaning"], cluster["answers"]
    if not isinstance(meaning, str):
        raise JudgeOutputError("schema_mismatch", f"{where}'meaning' must be a string, got {_json_type(meaning)}")
    # bool is an int in Python and 2.0 == 2; neither is an answer number.
    if not isinstance(numbers, list) or any(type(i) is not int for i in numbers):
        raise JudgeOutputError("schema_mismatch", f"{where}'answers' must be an array of integers, got {numbers!r}")
    if not numbers:
        raise JudgeOutputError("not_a_partition", f"{where}a cluster with no answers")
    outside = [i for i in numbers if not 1 <= i <= n]
    if outside:
        raise JudgeOutputError("out_of_range", f"{where}answer number(s) {outside} outside 1..{n}")
    return meaning, numbers


def parse_reply(raw: str, *, kind: CallKind, answer_order: Sequence[int] | None = None) -> Verdict | ClusterVerdict:
    """The parser of a call of ``kind``; a cluster call needs the order its answers were shown in."""
    if kind == "verdict":
        return parse_verdict(raw)
    if answer_order is None:
        raise ValueError("a cluster call is parsed against the order its answers were shown in; got none")
    return parse_clusters(raw, answer_order=answer_order)


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def judge_call_id(run_id: str, repeat: int | None = None, *, kind: CallKind = "verdict") -> str:
    """Stable ids: ``judge__{run_id}`` for the main call, ``judge__{run_id}__rep{k}`` (k >= 1) for repeats;
    ``clusters__...`` for cluster calls."""
    prefix = "judge" if kind == "verdict" else "clusters"
    return f"{prefix}__{run_id}" if repeat is None else f"{prefix}__{run_id}__rep{repeat}"


# ---------------------------------------------------------------------------------------------------------------------
# Which calls a stage owes (pure)


@dataclass(frozen=True)
class JudgeJob:
    """One owed call: ``event`` is the journal event type its record is stored under."""

    run_id: str
    event: str  # "judge" | "judge_repeat" | "clusters" | "clusters_repeat"
    judge_call_id: str
    question: str
    answers: tuple[str, ...]  # in the order shown
    answer_order: tuple[int, ...] | None = None  # 1-based original index of each shown answer
    shuffle_seed: int | None = None  # what answer_order was drawn with (cluster calls)

    @property
    def kind(self) -> CallKind:
        return "clusters" if self.event.startswith("clusters") else "verdict"

    @property
    def prompt(self) -> str:
        build = build_cluster_prompt if self.kind == "clusters" else build_prompt
        return build(question=self.question, answers=self.answers)


def _unit_hash(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def selected_for_repeats(run_id: str, fraction: float) -> bool:
    """A fixed subset of runs by run_id alone, so resumed and re-analysed runs agree on which have repeats."""
    return fraction >= 1.0 or _unit_hash(f"judge-repeat-subset/{run_id}") < fraction


def seeded_order(seed: int, n: int) -> list[int]:
    """The 1-based order a call shows ``n`` answers in, drawn with ``seed`` (recorded with the call)."""
    order = list(range(1, n + 1))
    random.Random(seed).shuffle(order)
    return order


def shuffled_order(run_id: str, repeat: int, n: int) -> list[int]:
    """The 1-based order repeat ``repeat`` shows ``n`` answers in, seeded by run and repeat index."""
    return seeded_order(int(_unit_hash(f"judge-repeat-order/{run_id}/{repeat}") * 2**53), n)


def cluster_seed(run_id: str, repeat: int = 0) -> int:
    """The shuffle seed of a run's cluster call (``repeat`` 0) or its repeat ``repeat``: a new order for each."""
    return int(_unit_hash(f"cluster-order/{run_id}/{repeat}") * 2**53)


def plan_judge_calls(
    runs: Iterable[Run], *, questions: dict[str, str], repeats: int = 0, repeat_fraction: float = 1.0,
    clusters: bool = False,
) -> tuple[list[JudgeJob], dict[str, int]]:
    """The calls still owed and counts of what was skipped. A recorded failure is owed again; a parsed reply is not.

    ``clusters``: one cluster call per run too (and ``repeats`` of it, on the same runs as the verdict's repeats).
    """
    jobs: list[JudgeJob] = []
    skipped = Counter(no_responses=0, already_judged=0, repeats_already_judged=0)
    if clusters:
        skipped.update(clusters_already_judged=0, cluster_repeats_already_judged=0)
    for run in runs:
        if not run.responses:
            skipped["no_responses"] += 1
            continue
        question = questions[run.ao_question_id]
        answers = tuple(r.text for r in run.responses)
        if run.judge is None or run.judge.failure is not None:
            jobs.append(JudgeJob(run.run_id, "judge", judge_call_id(run.run_id), question, answers))
        else:
            skipped["already_judged"] += 1
        if clusters:
            jobs += _owed_clusters(run, question, answers, [run.clusters], [None], "clusters_already_judged", skipped)
        if repeats == 0 or not selected_for_repeats(run.run_id, repeat_fraction):
            continue
        done = {r.judge_call_id for r in run.judge_repeats if r.parsed is not None}
        for k in range(1, repeats + 1):
            call_id = judge_call_id(run.run_id, k)
            if call_id in done:
                skipped["repeats_already_judged"] += 1
                continue
            order = shuffled_order(run.run_id, k, len(answers))
            shown = tuple(answers[i - 1] for i in order)
            jobs.append(JudgeJob(run.run_id, "judge_repeat", call_id, question, shown, tuple(order)))
        if clusters:
            by_id = {r.judge_call_id: r for r in run.cluster_repeats}
            ks = list(range(1, repeats + 1))
            records = [by_id.get(judge_call_id(run.run_id, k, kind="clusters")) for k in ks]
            jobs += _owed_clusters(run, question, answers, records, ks, "cluster_repeats_already_judged", skipped)
    return jobs, dict(skipped)


def _owed_clusters(run: Run, question: str, answers: tuple[str, ...], records: Sequence[Any],
                   repeat_ks: Sequence[int | None], done_key: str, skipped: Counter) -> list[JudgeJob]:
    """The cluster calls (main: k None, else repeat k) whose record is missing or a failure, shuffled by their seed."""
    jobs = []
    for record, k in zip(records, repeat_ks):
        if record is not None and record.failure is None:
            skipped[done_key] += 1
            continue
        seed = cluster_seed(run.run_id, k or 0)
        order = tuple(seeded_order(seed, len(answers)))
        jobs.append(JudgeJob(run.run_id, "clusters" if k is None else "clusters_repeat",
                             judge_call_id(run.run_id, k, kind="clusters"), question,
                             tuple(answers[i - 1] for i in order), order, seed))
    return jobs
