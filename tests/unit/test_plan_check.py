"""plan_check.plan_differences: what changed between the plan in a run folder and the plan the inputs give now."""

from __future__ import annotations

from ao_resampling.inputs.plan_check import SHOWN_IDS, context_overflows, plan_differences
from ao_resampling.results import TargetMessage
from tests.support.results_factory import make_results


def test_the_same_plan_has_no_differences():
    assert plan_differences(make_results([[5, 6], [7, 8]]), make_results([[None, None], [None, None]])) == []


def test_an_edited_target_is_named_and_its_runs_are_not_listed_again():
    old, new = make_results([[5, 6], [7, 8]]), make_results([[5, 6], [7, 8]])
    new.targets[1].messages[0] = TargetMessage(role="user", content="something else")
    assert plan_differences(old, new) == ["targets whose messages changed: t2"]


def test_edited_removed_and_added_questions():
    old = make_results([[5, 6, 7]])
    new = make_results([[5, 6, 7]], question_texts=["Question number 1 about the assistant?", "Reworded?", "x?"])
    new.ao_questions[2].id = "q9"
    for run in new.runs:
        run.ao_question_id = "q9" if run.ao_question_id == "q3" else run.ao_question_id
    assert plan_differences(old, new) == [
        "questions whose text changed: q2", "questions in the folder but no longer in the inputs: q3",
        "questions in the inputs but not in the folder: q9",
    ]


def test_other_token_ids_under_the_same_conversations_name_the_runs():
    old, new = make_results([[5, 6]]), make_results([[5, 6]])
    new.runs[1].context_input_ids = [2, 105, 9, 107]
    new.runs[0].assistant_start_idx = 2
    assert plan_differences(old, new) == ["runs whose token ids (tokenizer or chat template) changed: "
                                          "run__t1__q1, run__t1__q2"]


def test_long_id_lists_are_shortened():
    old = make_results([[5]] * (SHOWN_IDS + 3))
    new = make_results([[5]] * (SHOWN_IDS + 3))
    for target in new.targets:
        target.messages[0] = TargetMessage(role="user", content="edited")
    [line] = plan_differences(old, new)
    shown = ", ".join(f"t{i}" for i in range(1, SHOWN_IDS + 1))
    assert line == f"targets whose messages changed: {shown} and 3 more"


def _runs_with_lengths(context: dict[str, int], oracle: dict[str, int]) -> list:
    results = make_results([[None] * len(oracle)] * len(context))
    for run in results.runs:
        t, q = int(run.target_id[1:]) - 1, int(run.ao_question_id[1:]) - 1
        run.context_input_ids = list(range(list(context.values())[t]))
        run.oracle_input_ids = list(range(list(oracle.values())[q]))
    return results.runs


def test_everything_that_fits_passes_including_the_exact_limit():
    runs = _runs_with_lengths({"t1": 100, "t2": 90}, {"q1": 40, "q2": 50})
    assert context_overflows(runs, limit=100, max_new_tokens=50, baseline_new_tokens=None) == []
    assert context_overflows(runs, limit=100, max_new_tokens=50, baseline_new_tokens=0) == []


def test_each_target_and_oracle_prompt_too_long_is_named_once_with_its_lengths():
    runs = _runs_with_lengths({"t1": 101, "t2": 90, "t3": 400}, {"q1": 40, "q2": 51})
    assert context_overflows(runs, limit=100, max_new_tokens=50, baseline_new_tokens=None) == [
        "target t1: 101 tokens > 100",
        "oracle prompt of question q2 (e.g. run__t1__q2): 51 tokens + max_new_tokens 50 > 100",
        "target t3: 400 tokens > 100",
    ]


def test_the_baseline_reply_counts_against_the_target():
    runs = _runs_with_lengths({"t1": 60, "t2": 30}, {"q1": 10})
    assert context_overflows(runs, limit=100, max_new_tokens=5, baseline_new_tokens=50) == [
        "target t1: 60 tokens + baseline_max_new_tokens 50 > 100",
    ]
