"""Boundaries that a one-character change would move with no other test noticing (issue 24's mutation audit): the
read layer's truncation, a read position one past the context, the "and N more" line at exactly the shown count, and
the bootstrap streams of a sweep's per-condition and paired CIs. Each against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ao_resampling.analysis.report import _ids as report_ids
from ao_resampling.analysis.sweep_report import metric_block
from ao_resampling.engine.loading.models import layer_at_percent
from ao_resampling.inputs.plan_check import SHOWN_IDS, plan_differences
from ao_resampling.inputs.positions import Landmarks, resolve
from ao_resampling.position_rules import PositionError, PositionRule
from ao_resampling.results import TargetMessage
from tests.support.results_factory import make_results


@pytest.mark.parametrize("n_layers, percent, layer", [
    pytest.param(62, 25, 15, id="62_at_25_is_15_not_round_16"),  # 15.5: the seed's int() truncates
    pytest.param(62, 50, 31, id="62_at_50"),
    pytest.param(62, 99, 61, id="62_at_99_the_last"),  # 61.38
    pytest.param(18, 50, 9, id="270m_at_50"),
    pytest.param(34, 75, 25, id="34_at_75_is_25_not_26"),  # 25.5
    pytest.param(4, 0, 0, id="percent_0"),
])
def test_the_read_layer_truncates(n_layers, percent, layer):
    assert layer_at_percent(n_layers, percent) == layer


@pytest.mark.parametrize("marks", [
    pytest.param(Landmarks(n_tokens=0, assistant_start_idx=0), id="empty_context"),
    pytest.param(Landmarks(n_tokens=5, assistant_start_idx=5), id="one_past_the_last_token"),
])
def test_a_position_outside_the_context_is_refused(marks):
    with pytest.raises(PositionError, match="outside its"):
        resolve(PositionRule("assistant_start"), marks)
    with pytest.raises(PositionError, match="outside its"):
        resolve(PositionRule("window", 1), marks)


def test_the_last_token_of_the_context_is_inside():
    assert resolve(PositionRule("assistant_start"), Landmarks(n_tokens=5, assistant_start_idx=4)) == [4]
    assert resolve(PositionRule("window", 5), Landmarks(n_tokens=5, assistant_start_idx=4)) == [0, 1, 2, 3, 4]


def edited_targets(n: int) -> str:
    old, new = make_results([[5]] * n), make_results([[5]] * n)
    for target in new.targets:
        target.messages[0] = TargetMessage(role="user", content="edited")
    [line] = plan_differences(old, new)
    return line


def test_exactly_the_shown_count_of_ids_has_no_and_more_line():
    assert edited_targets(SHOWN_IDS) == "targets whose messages changed: " + ", ".join(
        f"t{i}" for i in range(1, SHOWN_IDS + 1))
    assert edited_targets(SHOWN_IDS + 1).endswith(f"t{SHOWN_IDS} and 1 more")
    twenty = [f"t{i}" for i in range(20)]
    assert report_ids(twenty) == ", ".join(twenty)
    assert report_ids([*twenty, "t20"]) == ", ".join(twenty) + " … and 1 more"


def test_per_condition_and_paired_cis_draw_from_distinct_streams():
    """b = 2a, so b - a = a: were the paired CI drawn from a's stream it would equal a's CI, and from b's stream half
    of b's CI. Values spread enough that two streams give different percentiles."""
    rng = np.random.default_rng(7)
    keys = [(f"t{i:02d}", "q1") for i in range(30)]  # sorted, as the paired difference orders the shared keys
    a = {k: float(v) for k, v in zip(keys, rng.normal(5, 2, size=len(keys)))}
    b = {k: 2 * v for k, v in a.items()}
    block = metric_block({"A": a, "B": b}, seed=0, n_boot=300, metric="judge_score")
    paired = np.array(block["paired"][0]["ci95"])
    assert block["paired"][0]["mean_diff"] == pytest.approx(np.mean(list(a.values())))
    assert not np.allclose(paired, block["per_condition"]["A"]["ci95"])
    assert not np.allclose(paired, np.array(block["per_condition"]["B"]["ci95"]) / 2)
