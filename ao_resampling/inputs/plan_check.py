"""Does a run folder still hold the plan its inputs describe? A resumed run continues the answers already in
``results.json``; if the targets or questions were edited under the same file name since, those answers belong to
other conversations or questions, so the resume is refused, naming what changed. Pure: two ``Results`` in, lines out.

Content is compared, not paths: the same file given once relative and once absolute is the same plan, and an edited
file under the same path is not.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ao_resampling.results import Results, Run

SHOWN_IDS = 8  # a whole 100-target file edited would otherwise print a wall of ids


def plan_differences(old: Results, new: Results) -> list[str]:
    """One line per kind of change between the stored plan and the plan the current inputs give (empty: same)."""
    lines = _keyed_changes("target", {t.id: _dump(t.messages) for t in old.targets},
                           {t.id: _dump(t.messages) for t in new.targets}, "messages")
    lines += _keyed_changes("question", {q.id: q.text for q in old.ao_questions},
                            {q.id: q.text for q in new.ao_questions}, "text")
    if lines:  # every run of a changed target or question differs too; naming them all again says nothing more
        return lines
    # Same conversations and questions, other tokens: the tokenizer or its chat template changed under its name.
    lines = _keyed_changes("run", {r.run_id: _tokens(r) for r in old.runs}, {r.run_id: _tokens(r) for r in new.runs},
                           "token ids (tokenizer or chat template)")
    if not lines and [r.run_id for r in old.runs] != [r.run_id for r in new.runs]:
        lines.append("the runs are in another order")
    return lines


def _keyed_changes(kind: str, old: dict[str, Any], new: dict[str, Any], what: str) -> list[str]:
    changed = [k for k in old if k in new and old[k] != new[k]]
    removed = [k for k in old if k not in new]
    added = [k for k in new if k not in old]
    lines = [f"{kind}s whose {what} changed: {_ids(changed)}"] if changed else []
    lines += [f"{kind}s in the folder but no longer in the inputs: {_ids(removed)}"] if removed else []
    lines += [f"{kind}s in the inputs but not in the folder: {_ids(added)}"] if added else []
    return lines


def _dump(messages) -> list[dict[str, Any]]:
    return [m.model_dump() for m in messages]


def _tokens(run: Run) -> tuple:
    return (run.context_input_ids, run.assistant_start_idx, run.oracle_input_ids, run.placeholder_positions)


def _ids(ids: list[str]) -> str:
    shown = ", ".join(ids[:SHOWN_IDS])
    return shown + (f" and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else "")


def context_overflows(
    runs: Iterable[Run], *, limit: int, max_new_tokens: int, baseline_new_tokens: int | None
) -> list[str]:
    """One line per target or oracle prompt that would not fit the model's context window (empty: all fit).

    Targets are read in one forward pass (plus ``baseline_new_tokens`` when the target model itself is sampled);
    an oracle prompt grows by up to ``max_new_tokens`` while its answer is decoded.
    """
    lines: list[str] = []
    seen_targets, seen_questions = set(), set()  # each target / oracle prompt is checked once, not once per run
    for run in runs:
        if run.target_id not in seen_targets:
            seen_targets.add(run.target_id)
            extra = baseline_new_tokens or 0
            if len(run.context_input_ids) + extra > limit:
                plus = f" + baseline_max_new_tokens {extra}" if extra else ""
                lines.append(f"target {run.target_id}: {len(run.context_input_ids)} tokens{plus} > {limit}")
        if run.oracle_input_ids is not None and run.ao_question_id not in seen_questions:
            seen_questions.add(run.ao_question_id)
            if len(run.oracle_input_ids) + max_new_tokens > limit:
                lines.append(f"oracle prompt of question {run.ao_question_id} (e.g. {run.run_id}): "
                             f"{len(run.oracle_input_ids)} tokens + max_new_tokens {max_new_tokens} > {limit}")
    return lines
