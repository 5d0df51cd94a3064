"""Small hand-made target-model baselines: a ``Baseline`` with chosen judge outcomes and spreads
(``baseline_of``), and a file in the earlier single-script baseline format (``earlier_format``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ao_resampling.results import Baseline, BaselineRun, Response, SpreadMetrics
from tests.support.results_factory import DECODING, Cell, judge_record


def baseline_of(cells: Mapping[str, Cell], *, cosines: Mapping[str, float] | None = None,
                model: str = "fake") -> Baseline:
    """One baseline run per target with three replies: its judge outcome (a score, a failure reason, or None for
    not judged) and, where ``cosines`` has the target, a spread from embedding ``model``."""
    runs = []
    for target_id, cell in cells.items():
        spread = None
        if cosines is not None and target_id in cosines:
            spread = SpreadMetrics(embedding_model=model, embedding_mean_cosine=cosines[target_id])
        runs.append(BaselineRun(
            run_id=f"baseline__{target_id}", target_id=target_id,
            responses=[Response(sample_id=f"baseline__{target_id}__s{k}", text=f"reply {k}", decoding=DECODING)
                       for k in range(3)],
            judge=judge_record(cell, call_id=f"judge__baseline__{target_id}"), spread=spread,
        ))
    return Baseline(meta={"model": "m"}, runs=runs)


def earlier_format(target_ids: Iterable[str], scores: Mapping[str, int | None] | None = None) -> dict[str, Any]:
    """The single-script baseline file: meta, targets, runs with responses and a judge record holding 'parsed'
    (score 7 unless ``scores`` says otherwise; None = a reply that did not parse)."""
    scores = scores or {}
    target_ids = list(target_ids)
    runs = []
    for t in target_ids:
        score = scores.get(t, 7)
        runs.append({
            "run_id": f"baseline__{t}", "target_id": t,
            "responses": [{"sample_id": f"baseline__{t}__s{k}", "text": f"reply {k}",
                           "decoding": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 240}} for k in range(3)],
            "judge": {"judge_call_id": f"judge__baseline__{t}", "model": "gpt-5-mini", "prompt": "rate",
                      "raw_output": "{}", "parsed": None if score is None else
                      {"similarity_1_to_10": score, "rationale": "r"}},
        })
    return {"meta": {"model": "google/gemma-3-27b-it"},
            "targets": [{"id": t, "messages": [{"role": "user", "content": "hi"}]} for t in target_ids], "runs": runs}
