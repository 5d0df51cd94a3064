"""The ``results.json`` schema, and the migrations of every older file format this tool reads.

One file holds a whole experiment: ``meta``, the sampled ``ao_questions``, the ``targets``, and one ``run`` per
(target, question) with its token ids, its 10 AO answers and the judge's verdict. ``schema_version`` comes first;
files of the older single-script format (same keys, no ``schema_version``) are migrated in one ``mode="before"``
validator, so analysis code only ever sees the current models. A baseline saved on its own (``load_baseline_file``)
is migrated record by record with the same functions: one migration per record type.

Writing a run folder (atomic writes, the journal of finished work, the lock) is store.py's job.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ao_resampling.config import Decoding  # noqa: F401  (the schema's decoding; made once at plan time)
from ao_resampling.errors import AOResamplingError, describe_problems
from ao_resampling.redaction import redact_url

# 2: runs record their read-position rule; answers are stored as decoded (``text_stripped`` marks older ones);
#    decodings record the effective top_k and eos ids; judge records keep earlier failures. 1 -> 2 in _migrate_v1.
# 3: runs (and baseline runs) may hold a cluster judge record (``clusters``, ``cluster_repeats``): which answers mean
#    the same. Older files have none, so 2 -> 3 only renumbers (_migrate_v2).
SCHEMA_VERSION = 3
RESULTS_NAME = "results.json"

FailureReason = Literal[
    "api_error", "timeout", "empty_output", "incomplete", "refusal", "invalid_json", "schema_mismatch",
    "out_of_range", "not_a_partition",
]
FinishReason = Literal["eos", "length"]


class ResultsError(AOResamplingError, ValueError):
    """A results file that cannot be read as this tool's format; the message names the file and the place."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Response(_Model):
    """One answer. ``text`` is the answer as decoded (what the reference stored and its judge saw)."""

    sample_id: str
    text: str
    decoding: Decoding
    n_tokens: int | None = Field(None, description="tokens generated, the stop token included")
    finish_reason: FinishReason | None = Field(None, description="'eos': ended on a stop token; 'length': cut "
                                                                 "at max_new_tokens")
    text_stripped: bool = Field(False, description="text was .strip()ped when stored (files written before the "
                                                   "answers were kept as decoded)")

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        return mark_stripped_text(data) if isinstance(data, dict) else data

    @property
    def stripped(self) -> str:
        return self.text.strip()


def mark_stripped_text(response: dict[str, Any]) -> dict[str, Any]:
    """A response without ``text_stripped`` comes from a file (or journal) written before the field existed, when
    every answer was stored stripped; everything written since records the field."""
    return response if "text_stripped" in response else dict(response, text_stripped=True)


class Verdict(_Model):
    # strict: true and "7" are not scores (lax mode would read them as 1 and 7), as the judge's parser refuses them
    similarity_1_to_10: int = Field(ge=1, le=10, strict=True)
    rationale: str


class MeaningCluster(_Model):
    """Answers the cluster judge found to mean the same; ``answers`` are 1-based indices in the stored order."""

    meaning: str
    answers: list[int] = Field(min_length=1)


class ClusterVerdict(_Model):
    """A partition of a run's answers into meanings, in the run's own answer order (mapped back from the shuffle)."""

    clusters: list[MeaningCluster] = Field(min_length=1)

    @model_validator(mode="after")
    def _a_partition(self) -> "ClusterVerdict":
        numbers = sorted(i for c in self.clusters for i in c.answers)
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"the clusters' answers {numbers} are not each of 1..{len(numbers)} exactly once")
        return self

    @property
    def sizes(self) -> list[int]:
        return [len(c.answers) for c in self.clusters]

    @property
    def labels(self) -> list[int]:
        """The cluster index of each answer, in the stored order."""
        label = {i: k for k, c in enumerate(self.clusters) for i in c.answers}
        return [label[i] for i in range(1, len(label) + 1)]


class JudgeFailure(_Model):
    reason: FailureReason
    detail: str


class _CallRecord(_Model):
    """What every judge call records, whatever its kind. Exactly one of ``parsed`` / ``failure`` is set: unscored is
    never zero."""

    judge_call_id: str
    model: str
    prompt: str
    raw_output: str | None = None
    parsed: Any = None  # each kind's own reply model (a subclass narrows it)
    failure: JudgeFailure | None = None
    api: str | None = None
    answer_order: list[int] | None = Field(None, description="1-based order the answers were shown in")
    latency_s: float | None = None
    created_at: str | None = None

    @model_validator(mode="after")
    def _one_outcome(self) -> "_CallRecord":
        if (self.parsed is None) == (self.failure is None):
            raise ValueError("a judge record holds exactly one of 'parsed' and 'failure'")
        return self


class JudgeRecord(_CallRecord):
    """One judge call rating the answers' similarity 1-10. Exactly one of ``parsed`` / ``failure`` is set: unscored
    is never zero."""

    parsed: Verdict | None = None
    previous_failures: list[JudgeRecord] = Field(
        default_factory=list, description="earlier failed calls for the same judge_call_id, oldest first")

    @property
    def score(self) -> int | None:
        return self.parsed.similarity_1_to_10 if self.parsed else None


class ClusterRecord(_CallRecord):
    """One cluster judge call: the answers, shown shuffled, grouped by meaning (``parsed`` in the stored order)."""

    parsed: ClusterVerdict | None = None
    shuffle_seed: int | None = Field(None, description="the seed answer_order was drawn with")
    previous_failures: list[ClusterRecord] = Field(
        default_factory=list, description="earlier failed calls for the same judge_call_id, oldest first")


class SpreadMetrics(_Model):
    """Judge-free spread of one run's answers (cached so re-analysis needs no model)."""

    embedding_model: str | None = None
    # allow_inf_nan=False: a NaN here (a hand-edited file) is refused naming its field, not drawn as an axis limit
    embedding_mean_cosine: float | None = Field(None, allow_inf_nan=False)
    distinct_fraction: float | None = Field(None, allow_inf_nan=False)
    mean_jaccard: float | None = Field(None, allow_inf_nan=False)


IdsHashing = Literal["compact_json", "comma_joined"]


class Run(_Model):
    run_id: str
    target_id: str
    ao_question_id: str
    assistant_start_idx: int
    context_positions: list[int] = Field(description="token indices read from the context, in injection order "
                                         "(the resolved position_rule; one per placeholder)")
    position_rule: str = "assistant_start"
    context_input_ids: list[int]
    context_input_ids_sha256: str
    context_input_ids_hashing: IdsHashing = Field(
        "compact_json", description="what 'context_input_ids_sha256' hashes: 'compact_json' ([2,105,...], this "
                                    "tool) or 'comma_joined' (2,105,..., the original resampling script)")
    oracle_input_ids: list[int] | None = None
    placeholder_positions: list[int] | None = None
    responses: list[Response] = []
    judge: JudgeRecord | None = None
    judge_repeats: list[JudgeRecord] = []
    clusters: ClusterRecord | None = Field(None, description="the cluster judge call: which answers mean the same")
    cluster_repeats: list[ClusterRecord] = []
    spread: SpreadMetrics | None = None

    @model_validator(mode="before")
    @classmethod
    def _which_hashing(cls, data: Any) -> Any:
        # A run that does not say how its ids were hashed was hashed by this tool, or by the original script; which
        # one is recorded, so a file written by another tool is never taken for one whose ids were changed.
        if isinstance(data, dict) and "context_input_ids_hashing" not in data:
            ids, stored = data.get("context_input_ids"), data.get("context_input_ids_sha256")
            if isinstance(ids, list) and stored != sha256_of_ids(ids) and stored == comma_joined_sha256(ids):
                return dict(data, context_input_ids_hashing="comma_joined")
        return data


class AOQuestion(_Model):
    id: str
    text: str


class TargetMessage(_Model):
    role: str
    content: str


class TargetRecord(_Model):
    id: str
    messages: list[TargetMessage]


class BaselineRun(_Model):
    """The target model itself, sampled n times on its own conversation (adapter off)."""

    run_id: str
    target_id: str
    responses: list[Response] = []
    judge: JudgeRecord | None = None
    clusters: ClusterRecord | None = None
    spread: SpreadMetrics | None = None


class Baseline(BaseModel):
    model_config = ConfigDict(extra="allow")

    meta: dict[str, Any] = {}
    runs: list[BaselineRun] = []


class Meta(BaseModel):
    """What made the file. Older files carry other keys; they are kept as they were (extra='allow')."""

    model_config = ConfigDict(extra="allow")

    tool_version: str | None = None
    git_commit: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    model: str | None = None
    oracle_lora: str | None = None
    tokenizer: str | None = None
    num_layers: int | None = None
    layer: int | None = None
    injection_layer: int | None = None
    steering_coefficient: float | None = None
    decoding: Decoding | None = None
    question_seed: int | None = None
    decode_seed: int | None = None
    judge_model: str | None = None
    stand_in: bool | None = Field(None, description="random weights or a random LoRA: not an oracle's numbers")
    note: str | None = None
    config: dict[str, Any] | None = None
    decode_layout: dict[str, Any] | None = Field(None, description="how the answers were decoded: the step's rows "
                                                 "(chosen or asked for), peak GPU memory, the processes")


class Results(_Model):
    schema_version: int = SCHEMA_VERSION
    meta: Meta
    ao_questions: list[AOQuestion]
    targets: list[TargetRecord]
    runs: list[Run]
    baseline: Baseline | None = None

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if "schema_version" not in data:
            data = _migrate_v0(data)
        version = data["schema_version"]
        if type(version) is not int:  # a string or null would otherwise crash the comparison below with a TypeError
            raise ValueError(f"schema_version must be an integer, got {version!r}")
        if version > SCHEMA_VERSION:
            raise ValueError(f"schema_version {version} is newer than this tool's ({SCHEMA_VERSION}); upgrade")
        if version < 1:  # the single-script format has no schema_version at all; 0 or -1 is no format of ours
            raise ValueError(f"schema_version {version} is not a version of this format (1 to {SCHEMA_VERSION}, or "
                             "none for the original single-script format)")
        if version < 2:
            data = _migrate_v1(data)
        return _migrate_v2(data) if data["schema_version"] < 3 else data

    @model_validator(mode="after")
    def _ids_consistent(self) -> "Results":
        run_ids = [r.run_id for r in self.runs]
        if len(set(run_ids)) != len(run_ids):
            first = next(i for i, run_id in enumerate(run_ids) if run_id in run_ids[:i])
            raise ValueError(f"duplicate run_id in 'runs': runs[{first}] ({run_ids[first]}) is also "
                             f"runs[{run_ids.index(run_ids[first])}]")
        _one_content_per_id("targets", [(t.id, t.messages) for t in self.targets])
        _one_content_per_id("ao_questions", [(q.id, q.text) for q in self.ao_questions])
        target_ids = {t.id for t in self.targets}
        question_ids = {q.id for q in self.ao_questions}
        for i, run in enumerate(self.runs):
            if run.target_id not in target_ids:
                raise ValueError(f"runs[{i}] ({run.run_id}): target_id {run.target_id!r} is not in 'targets'")
            if run.ao_question_id not in question_ids:
                raise ValueError(f"runs[{i}] ({run.run_id}): ao_question_id {run.ao_question_id!r} not in 'ao_questions'")
        return self

    def run_by_id(self) -> dict[str, Run]:
        return {r.run_id: r for r in self.runs}


def _one_content_per_id(field: str, items: list[tuple[str, Any]]) -> None:
    """An id names one target (question): two different ones under the same id would make every run of it ambiguous.
    The same one listed twice is harmless."""
    first: dict[str, int] = {}
    for i, (item_id, content) in enumerate(items):
        if item_id in first and items[first[item_id]][1] != content:
            raise ValueError(f"duplicate id in '{field}': {field}[{i}] ({item_id}) differs from "
                             f"{field}[{first[item_id]}] under the same id")
        first.setdefault(item_id, i)


def _migrate_v0(data: dict[str, Any]) -> dict[str, Any]:
    """The single-script format: same keys, no schema_version, a judge record with only 'parsed'."""
    data = dict(data)
    data["schema_version"] = 1
    data.setdefault("meta", {})
    runs = data.get("runs", [])
    data["runs"] = [migrate_run_judge_v0(run) for run in runs] if isinstance(runs, list) else runs
    return data


def migrate_run_judge_v0(run: Any) -> Any:
    """A run (AO or baseline) whose judge record has the single-script shape: only 'parsed'. One without a verdict
    becomes a failure, never a score."""
    if not isinstance(run, dict) or not isinstance(run.get("judge"), dict):
        return run
    judge = run["judge"]
    if judge.get("parsed") is None and judge.get("failure") is None:
        failure = {"reason": "invalid_json", "detail": "older format: no parsed verdict"}
        judge = dict(judge, parsed=None, failure=failure)
    return dict(run, judge=judge)


def _migrate_v1(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 -> 2. Only the runs' position rule is added here; the responses' ``text_stripped`` is set where a
    response is read (``mark_stripped_text``), since journal lines carry responses too."""
    return dict(_add_position_rule(data), schema_version=2)


def _migrate_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 2 -> 3: no file before 3 asked the cluster judge, so its runs load with no clusters (the defaults)."""
    return dict(data, schema_version=3)


def _add_position_rule(data: dict[str, Any]) -> dict[str, Any]:
    """Files made before read-position rules read every run at assistant_start_idx (their context_positions)."""
    runs = data.get("runs")
    if not isinstance(runs, list) or all(not isinstance(r, dict) or "position_rule" in r for r in runs):
        return data
    return dict(data, runs=[dict(r, position_rule="assistant_start") if isinstance(r, dict) and "position_rule"
                            not in r else r for r in runs])


def run_id_for(target_id: str, question_id: str) -> str:
    return f"run__{target_id}__{question_id}"


def sha256_of_ids(ids: Iterable[int]) -> str:
    """Hex sha256 of the ids as compact JSON (``[2,105,...]``); pinned by a test, since files in the wild hold it."""
    return hashlib.sha256(json.dumps(list(ids), separators=(",", ":")).encode()).hexdigest()


def comma_joined_sha256(ids: Iterable[Any]) -> str:
    """The original resampling script's hash: sha256 of ``",".join(str(i) for i in ids)`` (utf-8)."""
    return hashlib.sha256(",".join(str(i) for i in ids).encode()).hexdigest()


IDS_HASHES = {"compact_json": sha256_of_ids, "comma_joined": comma_joined_sha256}


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def run_integrity_problems(run: Run) -> list[str]:
    """What is wrong with a run's token ids and the indices into them (empty when nothing is).

    A hand-edited or damaged file must not reach the model: an index past the end reads another token's activation
    (or crashes mid-run), and ids changed under their old hash mean the answers belong to a different context.
    """
    problems = []
    stored, ids = run.context_input_ids_sha256, run.context_input_ids
    if not _SHA256_HEX.fullmatch(stored):
        problems.append(f"field 'context_input_ids_sha256': expected 64 lower-case hex digits, got {stored!r}")
    elif stored != IDS_HASHES[run.context_input_ids_hashing](ids):
        problems.append("field 'context_input_ids_sha256': does not match 'context_input_ids' hashed as "
                        f"{run.context_input_ids_hashing} (the ids were changed after they were hashed)")
    if not 0 <= run.assistant_start_idx < len(ids):
        problems.append(f"field 'assistant_start_idx': {run.assistant_start_idx} is outside the "
                        f"{len(ids)} context_input_ids")
    problems += _outside("context_positions", run.context_positions, len(ids), "context_input_ids")
    for name, record in [("clusters", run.clusters)] + [(f"cluster_repeats[{k}]", r)
                                                         for k, r in enumerate(run.cluster_repeats)]:
        if record is not None and record.parsed is not None and sum(record.parsed.sizes) != len(run.responses):
            problems.append(f"field '{name}': a partition of {sum(record.parsed.sizes)} answers, but the run has "
                            f"{len(run.responses)}")
    if run.placeholder_positions is not None and run.oracle_input_ids is None:
        problems.append("field 'placeholder_positions': set, but 'oracle_input_ids' is missing")
    elif run.placeholder_positions is not None:
        problems += _outside("placeholder_positions", run.placeholder_positions, len(run.oracle_input_ids),
                             "oracle_input_ids")
    return problems


def _outside(name: str, positions: list[int], length: int, of: str) -> list[str]:
    bad = [p for p in positions if not 0 <= p < length]
    return [f"field '{name}': {bad} outside the {length} {of}"] if bad else []


def check_integrity(results: Results, source: Path | str) -> None:
    """Raise a ResultsError naming the file, the run and the field of the first run whose ids do not hold together."""
    for i, run in enumerate(results.runs):
        problems = run_integrity_problems(run)
        if problems:
            raise ResultsError(f"{source}: runs[{i}] ({run.run_id}): " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------------------------
# Reading and writing the format (store.py writes it to disk atomically)


def dump_results(results: Results) -> str:
    data = results.model_dump(mode="json")
    config = data["meta"].get("config")
    if isinstance(config, dict) and isinstance(config.get("judge_base_url"), str):
        # Used for the calls as given; only what is written loses its credentials.
        config["judge_base_url"] = redact_url(config["judge_base_url"])
    return json.dumps(data, indent=1, ensure_ascii=False) + "\n"


def read_json_file(path: Path) -> Any:
    """Parsed JSON, or a ResultsError naming the file (and the line and column of a syntax error)."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise ResultsError(f"{path}: cannot read: {e}") from e
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from e


def load_results_file(path: Path) -> Results:
    """Read one results file (current or older format) without its journal."""
    data = read_json_file(path)
    try:
        results = Results.model_validate(data)
    except ValidationError as e:
        raise ResultsError(f"{path}: {describe_problems(e, limit=3)}") from e
    check_integrity(results, path)
    return results


def load_baseline_file(path: Path) -> Baseline:
    """``{"meta", "targets", "runs": [{"run_id", "target_id", "responses", "judge"}]}`` (or a results.json holding a
    baseline section) -> ``Baseline``. Errors name the file and the field."""
    path = Path(path)
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise ResultsError(f"{path}: expected a JSON object with 'runs' (a baseline file), got a {type(data).__name__}")
    if "ao_questions" in data:  # a whole results file: take its baseline section
        baseline = load_results_file(path).baseline
        if baseline is None:
            raise ResultsError(f"{path}: field 'baseline': this results file holds no baseline")
        return baseline
    if not isinstance(data.get("runs"), list):
        raise ResultsError(f"{path}: field 'runs': missing or not a list (a baseline file has 'meta', 'targets' and "
                           f"'runs')")
    try:
        baseline = Baseline.model_validate(dict(data, runs=[migrate_run_judge_v0(run) for run in data["runs"]]))
    except ValidationError as e:
        raise ResultsError(f"{path}: {describe_problems(e, limit=3)}") from e
    seen = Counter(r.target_id for r in baseline.runs)
    repeated = sorted(t for t, c in seen.items() if c > 1)
    if repeated:
        raise ResultsError(f"{path}: field 'runs': target_id(s) {repeated} appear in more than one run")
    return baseline


def results_json_schema() -> dict[str, Any]:
    return Results.model_json_schema(mode="serialization")
