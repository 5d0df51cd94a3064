"""Small hand-made ``Results`` for analysis tests: a grid of judge outcomes, answers and spreads you can read.

``make_results([[10, 8], ["timeout", None]])`` is two targets x two questions: t1 scored 10 and 8, t2's first
judge call timed out and its second run is not judged yet. ``clusters=`` gives runs a cluster record: the answers'
labels (``[0, 0, 1]``: the first two mean the same) or a failure reason. ``to_v0_dict`` turns a file into the older
single-script format (no schema_version, judge records with only ``parsed``). ``FakeEncoder`` stands in for a
sentence-transformers model where the test is about plumbing, not meaning.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ao_resampling.stages.common.spreads import normalize_answer
from ao_resampling.results import (
    AOQuestion,
    ClusterRecord,
    ClusterVerdict,
    MeaningCluster,
    Decoding,
    JudgeFailure,
    JudgeRecord,
    Meta,
    Response,
    Results,
    Run,
    SpreadMetrics,
    TargetMessage,
    TargetRecord,
    Verdict,
    run_id_for,
    sha256_of_ids,
)

Cell = int | str | None  # a parsed score, a failure reason, or None for "not judged yet"
DECODING = Decoding(temperature=0.7, top_p=0.9, max_new_tokens=120, seed=0)
DEFAULT_ANSWERS = ("The user is happy.", "The user seems glad.", "The capital of France is Paris.")


def judge_record(cell: Cell, *, call_id: str = "call", rationale: str | None = None) -> JudgeRecord | None:
    if cell is None:
        return None
    common = dict(judge_call_id=call_id, model="gpt-5-mini", prompt="Rate how similar these answers are.")
    if isinstance(cell, int):
        text = rationale or f"Answers agree to degree {cell}."
        return JudgeRecord(
            **common,
            raw_output=f'{{"similarity_1_to_10": {cell}, "rationale": "{text}"}}',
            parsed=Verdict(similarity_1_to_10=cell, rationale=text),
        )
    return JudgeRecord(**common, raw_output="", failure=JudgeFailure(reason=cell, detail=f"fake {cell}"))


Labels = Sequence[int] | str | None  # each answer's cluster, a failure reason, or None for "not asked yet"


def cluster_record(labels: Labels, *, call_id: str = "clusters") -> ClusterRecord | None:
    if labels is None:
        return None
    common = dict(judge_call_id=call_id, model="gpt-5-mini", prompt="Group these answers by meaning.")
    if isinstance(labels, str):
        return ClusterRecord(**common, raw_output="", failure=JudgeFailure(reason=labels, detail=f"fake {labels}"))
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels, start=1):
        groups.setdefault(label, []).append(i)
    clusters = [MeaningCluster(meaning=f"meaning {k}", answers=a) for k, a in groups.items()]
    return ClusterRecord(**common, raw_output="{}", parsed=ClusterVerdict(clusters=clusters))


def make_run(
    target_id: str,
    question_id: str,
    *,
    judge: Cell = None,
    answers: Sequence[str] = DEFAULT_ANSWERS,
    spread: SpreadMetrics | None = None,
    repeats: Sequence[Cell] = (),
    clusters: Labels = None,
    cluster_repeats: Sequence[Labels] = (),
) -> Run:
    run_id = run_id_for(target_id, question_id)
    ids = [2, 105, 2364, 107]
    return Run(
        run_id=run_id,
        target_id=target_id,
        ao_question_id=question_id,
        assistant_start_idx=3,
        context_positions=[0, 1, 2, 3],
        context_input_ids=ids,
        context_input_ids_sha256=sha256_of_ids(ids),
        responses=[Response(sample_id=f"{run_id}__s{k}", text=t, decoding=DECODING) for k, t in enumerate(answers)],
        judge=judge_record(judge, call_id=f"{run_id}__j0"),
        judge_repeats=[judge_record(c, call_id=f"{run_id}__j{k + 1}") for k, c in enumerate(repeats) if c is not None],
        clusters=cluster_record(clusters, call_id=f"clusters__{run_id}"),
        cluster_repeats=[cluster_record(c, call_id=f"clusters__{run_id}__rep{k + 1}")
                         for k, c in enumerate(cluster_repeats) if c is not None],
        spread=spread,
    )


def spread_from_score(t: int, q: int, cell: Cell) -> SpreadMetrics:
    """A fake spread that rises with the judge score (0.6 for runs without one), so agreement is positive."""
    cosine = 0.5 + cell / 20 if isinstance(cell, int) else 0.6
    return SpreadMetrics(embedding_model="fake", embedding_mean_cosine=cosine, distinct_fraction=1.0, mean_jaccard=0.25)


def make_results(
    grid: Sequence[Sequence[Cell]],
    *,
    question_texts: Sequence[str] | None = None,
    answers: Callable[[int, int, Cell], Sequence[str]] | None = None,
    spread: Callable[[int, int, Cell], SpreadMetrics | None] | None = None,
    repeats: Callable[[int, int, Cell], Sequence[Cell]] | None = None,
    clusters: Callable[[int, int, Cell], Labels] | None = None,
    cluster_repeats: Callable[[int, int, Cell], Sequence[Labels]] | None = None,
    meta: dict[str, Any] | None = None,
) -> Results:
    """grid[t][q] is the judge outcome of target t+1 on question q+1; ids are t1.. and q1.."""
    n_questions = len(grid[0]) if grid else len(question_texts or [])
    texts = list(question_texts or [f"Question number {j + 1} about the assistant?" for j in range(n_questions)])
    runs = [
        make_run(
            f"t{t + 1}",
            f"q{q + 1}",
            judge=cell,
            answers=answers(t, q, cell) if answers else DEFAULT_ANSWERS,
            spread=spread(t, q, cell) if spread else None,
            repeats=repeats(t, q, cell) if repeats else (),
            clusters=clusters(t, q, cell) if clusters else None,
            cluster_repeats=cluster_repeats(t, q, cell) if cluster_repeats else (),
        )
        for t, row in enumerate(grid)
        for q, cell in enumerate(row)
    ]
    return Results(
        meta=Meta(**(meta or {"model": "google/gemma-3-27b-it", "oracle_lora": "some/lora", "layer": 31,
                              "decoding": DECODING, "judge_model": "gpt-5-mini", "question_seed": 0, "decode_seed": 0})),
        ao_questions=[AOQuestion(id=f"q{j + 1}", text=text) for j, text in enumerate(texts)],
        targets=[
            TargetRecord(id=f"t{t + 1}", messages=[TargetMessage(role="user", content=f"Conversation number {t + 1}.")])
            for t in range(len(grid))
        ],
        runs=runs,
    )


def to_v0_dict(results: Results) -> dict[str, Any]:
    """The older single-script format: same keys, no schema_version, judge records with only 'parsed'."""
    data = results.model_dump(mode="json")
    del data["schema_version"]
    data.pop("baseline", None)
    data["meta"] = {k: v for k, v in data["meta"].items() if v is not None}
    for run in data["runs"]:
        for key in ("judge_repeats", "clusters", "cluster_repeats", "spread", "oracle_input_ids",
                    "placeholder_positions", "context_input_ids_hashing"):
            run.pop(key, None)
        if run["judge"] is not None:
            run["judge"] = {k: v for k, v in run["judge"].items() if k in ("judge_call_id", "model", "prompt", "raw_output", "parsed")}
    return data


class FakeEncoder:
    """Hashed bag of normalised words: same words, same vector. Counts its calls and the texts it saw."""

    def __init__(self, dim: int = 64):
        self.dim = dim
        self.calls: list[list[str]] = []

    def encode(self, sentences: list[str], normalize_embeddings: bool = False, **_: Any) -> np.ndarray:
        self.calls.append(list(sentences))
        out = np.zeros((len(sentences), self.dim), dtype=np.float32)
        for i, text in enumerate(sentences):
            out[i, 0] = 0.1  # an empty answer still has a direction
            for word in normalize_answer(text).split():
                out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        if normalize_embeddings:
            out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out
