"""The sweep's pure parts: --vary parsing, the grid, TOML conditions, the manifest check, and the paired statistics
of the sweep report on hand-computed fixtures. No model, no files except tmp TOML."""

from __future__ import annotations

import numpy as np
import pytest

from ao_resampling.config import build_config
from ao_resampling.analysis.stats import rng_for
from ao_resampling.engine.loading.models import LoadedOracle
from ao_resampling.sweep import (
    SweepError, condition_name, grid, load_conditions_toml, manifest, manifest_differences, oracle_for,
    parse_vary, plan_conditions, varied_fields,
)
from ao_resampling.analysis.sweep_report import metric_block, movers, paired_difference


def test_parse_vary_reads_numbers_and_rules():
    assert parse_vary("temperature=0.3,0.7,1") == ("temperature", [0.3, 0.7, 1])
    assert parse_vary("position_rule=assistant_start,window:3") == ("position_rule", ["assistant_start", "window:3"])
    assert parse_vary("layer_percent=25, 50") == ("layer_percent", [25, 50])
    # Any setting by name: nothing is special-cased per field.
    assert parse_vary("steering_coefficient=0.5,2") == ("steering_coefficient", [0.5, 2])
    assert parse_vary("top_k=0,40") == ("top_k", [0, 40])


@pytest.mark.parametrize("item, message", [
    pytest.param("temprature=0.3", "'temprature' is not a setting", id="typo"),
    pytest.param("model=a,b", "decides which weights are loaded", id="load_field"),
    pytest.param("temperature", "expected field=v1,v2", id="no_values"),
    pytest.param("temperature=,", "no values", id="only_commas"),
    pytest.param("temperature= , ", "no values", id="only_blanks"),
    pytest.param("temperature=0.3,0.3", "given twice", id="duplicate_value"),
])
def test_parse_vary_rejects_with_the_reason(item, message):
    with pytest.raises(SweepError, match=message):
        parse_vary(item)


def test_grid_is_every_combination_first_field_slowest():
    assert grid([("temperature", [0.3, 1.0]), ("layer_percent", [25, 50, 75])]) == [
        {"temperature": 0.3, "layer_percent": 25}, {"temperature": 0.3, "layer_percent": 50},
        {"temperature": 0.3, "layer_percent": 75}, {"temperature": 1.0, "layer_percent": 25},
        {"temperature": 1.0, "layer_percent": 50}, {"temperature": 1.0, "layer_percent": 75}]
    assert grid([]) == [{}]
    with pytest.raises(SweepError, match="twice"):
        grid([("temperature", [0.3]), ("temperature", [0.7])])


def test_toml_conditions(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[condition]]\ntemperature = 0.3\n\n'
                    '[[condition]]\ntemperature = 1.0\nposition_rule = "window:2"\n')
    assert load_conditions_toml(path) == [{"temperature": 0.3}, {"temperature": 1.0, "position_rule": "window:2"}]
    path.write_text('[[condition]]\ntemperatur = 0.3\n')
    with pytest.raises(SweepError, match=r"c.toml: condition 1: 'temperatur' is not a setting"):
        load_conditions_toml(path)
    path.write_text('temperature = 0.3\n')
    with pytest.raises(SweepError, match=r"c.toml: expected one or more \[\[condition\]\] tables"):
        load_conditions_toml(path)
    path.write_text('num_targets = 5\n[[condition]]\ntemperature = 0.3\n')  # a key that would go unread
    with pytest.raises(SweepError, match=r"c.toml: 'num_targets' is beside the \[\[condition\]\] tables"):
        load_conditions_toml(path)
    path.write_text('[[condition]]\ntemperature = 0.3\n[base]\nnum_targets = 5\n')
    with pytest.raises(SweepError, match=r"c.toml: 'base' is beside the \[\[condition\]\] tables"):
        load_conditions_toml(path)


def test_plan_conditions_validates_every_condition_before_any_runs():
    base = build_config(preset="demo")
    planned = plan_conditions(base, [{"temperature": 0.3}, {"temperature": 1.0, "layer_percent": 75}])
    assert [c.name for c in planned] == ["temperature=0.3", "temperature=1.0__layer_percent=75"]
    assert planned[1].config.layer_percent == 75 and planned[1].config.model == base.model
    assert varied_fields(planned) == ["temperature", "layer_percent"]
    with pytest.raises(SweepError, match=r"condition temperature=-1: field 'temperature'"):
        plan_conditions(base, [{"temperature": 0.3}, {"temperature": -1}])
    with pytest.raises(SweepError, match=r"condition position_rule=window-0: field 'position_rule'"):
        plan_conditions(base, [{"position_rule": "window:0"}])
    assert condition_name({"position_rule": "window:3"}) == "position_rule=window-3"
    assert [c.config.top_k for c in plan_conditions(base, [{"top_k": 0}, {"top_k": 40}])] == [0, 40]


@pytest.mark.parametrize("overrides, first, second", [
    pytest.param([{"temperature": 1}, {"temperature": 1.0}], "temperature=1", "temperature=1.0", id="int_and_float"),
    pytest.param([{"position_rule": "window:2"}, {"position_rule": "window:02"}], "position_rule=window-2",
                 "position_rule=window-02", id="window_leading_zero"),
    pytest.param([{"layer_percent": 50}, {}], "layer_percent=50", "base", id="the_base_value_itself"),
])
def test_conditions_that_resolve_to_the_same_settings_are_refused_naming_both(overrides, first, second):
    with pytest.raises(SweepError, match=f"conditions {first} and {second} are the same settings"):
        plan_conditions(build_config(), overrides)


def test_toml_conditions_1_and_1_point_0_are_one_condition(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[[condition]]\ntemperature = 1\n\n[[condition]]\ntemperature = 1.0\n")
    with pytest.raises(SweepError, match="the same settings once read"):
        plan_conditions(build_config(), load_conditions_toml(path))


def test_file_paths_in_a_conditions_toml_are_taken_from_its_folder(tmp_path):
    (tmp_path / "sweeps").mkdir()
    path = tmp_path / "sweeps" / "c.toml"
    path.write_text("[[condition]]\ntargets = 'small.json'\n\n[[condition]]\ntemperature = 1.0\n")
    assert load_conditions_toml(path) == [{"targets": str(tmp_path / "sweeps" / "small.json")}, {"temperature": 1.0}]


def test_a_condition_of_many_settings_gets_a_folder_name_the_file_system_takes(tmp_path):
    base = build_config(preset="demo")
    many = {"temperature": 0.5, "top_p": 0.95, "top_k": 40, "layer_percent": 25, "injection_layer": 2,
            "steering_coefficient": 1.5, "position_rule": "window:3", "decode_seed": 7, "question_seed": 3,
            "max_new_tokens": 20, "samples_per_query": 3, "judge_repeats": 2, "bootstrap_seed": 11,
            "bootstrap_resamples": 500, "judge_model": "a-judge-model-with-a-long-dated-name-2025-08-07",
            "judge_repeat_fraction": 0.5}
    other = {**many, "judge_repeat_fraction": 0.25}  # the same up to the last setting
    names = [c.name for c in plan_conditions(base, [many, other])]
    assert names[0] != names[1]
    for name in names:
        assert len(name.encode()) <= 255
        (tmp_path / name).mkdir()  # OSError "File name too long" before the fix
    # A name that fits is kept as it reads.
    assert condition_name({"temperature": 0.3}) == "temperature=0.3"


def test_manifest_differences_name_settings_and_conditions():
    base = build_config(preset="demo")
    planned = plan_conditions(base, [{"temperature": 0.3}, {"temperature": 1.0}])
    same = manifest(base, planned)
    assert manifest_differences(same, manifest(base, planned)) == []
    other_base = build_config(preset="demo", overrides={"max_new_tokens": 7})
    assert manifest_differences(same, manifest(other_base, plan_conditions(other_base, [{"temperature": 0.3},
                                                                                      {"temperature": 1.0}]))) \
        == ["max_new_tokens: 24 -> 7"]
    fewer = manifest(base, planned[:1])
    assert manifest_differences(same, fewer) == ["conditions: ['temperature=0.3', 'temperature=1.0'] -> "
                                                 "['temperature=0.3']"]


def test_oracle_for_shares_the_model_and_sets_the_layers():
    model = object()
    loaded = LoadedOracle(model=model, tokenizer=None, num_layers=18, read_layer=9, injection_layer=1)
    cfg = build_config(preset="demo", overrides={"layer_percent": 25, "injection_layer": 2})
    swapped = oracle_for(loaded, cfg)
    assert swapped.model is model and swapped.read_layer == int(18 * 0.25) and swapped.injection_layer == 2
    with pytest.raises(SweepError, match="injection_layer 30 is outside the model's 18 layers"):
        oracle_for(loaded, build_config(preset="demo", overrides={"injection_layer": 30}))


# ---------------------------------------------------------------------------------------------------------------------
# Paired statistics, hand-computed


A = {("t1", "q1"): 1.0, ("t1", "q2"): 2.0, ("t2", "q1"): 3.0, ("t2", "q2"): 5.0}
B = {("t1", "q1"): 2.0, ("t1", "q2"): 4.0, ("t2", "q1"): 3.0, ("t3", "q1"): 9.0}


def test_paired_difference_uses_only_shared_runs():
    # shared: (t1,q1) 2-1=1, (t1,q2) 4-2=2, (t2,q1) 3-3=0 -> mean 1.0; (t2,q2) only in A, (t3,q1) only in B.
    # The marginal means (2.75 vs 4.5) would say 1.75: the unpaired (t3,q1)=9 would dominate.
    out = paired_difference(A, B, rng=rng_for(0, "x"), n_boot=500)
    assert out["n_pairs"] == 3 and out["mean_diff"] == pytest.approx(1.0)
    assert out["n_only_first"] == 1 and out["n_only_second"] == 1
    lo, hi = out["ci95"]
    assert 0.0 <= lo <= 1.0 <= hi <= 2.0  # a bootstrap mean of {1, 2, 0} cannot leave [0, 2]


def test_paired_difference_bootstrap_matches_a_direct_resampling():
    a = {("t", str(i)): float(i) for i in range(6)}
    b = {("t", str(i)): float(i) + d for i, d in enumerate([0.5, -1.0, 2.0, 0.0, 1.5, 3.0])}
    out = paired_difference(a, b, rng=rng_for(3, "y"), n_boot=1000)
    diffs = np.array([b[k] - a[k] for k in sorted(a)])  # sorted keys: the order paired_difference resamples in
    rng = rng_for(3, "y")
    means = diffs[rng.integers(0, 6, size=(1000, 6))].mean(axis=1)
    assert out["mean_diff"] == pytest.approx(1.0)
    assert out["ci95"] == pytest.approx(list(np.quantile(means, [0.025, 0.975])))


def test_constant_shift_has_a_zero_width_ci():
    out = paired_difference(A, {k: v + 0.25 for k, v in A.items()}, rng=rng_for(0, "z"), n_boot=200)
    assert out["mean_diff"] == pytest.approx(0.25) and out["ci95"] == pytest.approx([0.25, 0.25])


def test_nothing_shared_is_no_difference_not_zero():
    out = paired_difference({("t1", "q1"): 1.0}, {("t2", "q1"): 1.0}, rng=rng_for(0, "w"))
    assert out["n_pairs"] == 0 and out["mean_diff"] is None and out["ci95"] is None


def test_movers_rank_questions_and_targets_by_range_over_shared_runs():
    values = {"c1": A, "c2": B}
    # shared keys: (t1,q1), (t1,q2), (t2,q1). q1: c1 mean (1+3)/2=2, c2 (2+3)/2=2.5 -> range 0.5;
    # q2: c1 2, c2 4 -> 2.0. t1: c1 1.5, c2 3 -> 1.5; t2: 3 vs 3 -> 0.
    qs = movers(values, "question")
    assert [(r["id"], r["range"], r["n"]) for r in qs] == [("q2", 2.0, 1), ("q1", 0.5, 2)]
    ts = movers(values, "target")
    assert [(r["id"], r["range"]) for r in ts] == [("t1", 1.5), ("t2", 0.0)]
    assert ts[0]["means"] == {"c1": 1.5, "c2": 3.0}


def test_metric_block_lists_every_pair_and_each_condition():
    block = metric_block({"c1": A, "c2": B, "c3": A}, seed=0, n_boot=200, metric="judge_score")
    assert [(p["first"], p["second"]) for p in block["paired"]] == [("c1", "c2"), ("c1", "c3"), ("c2", "c3")]
    assert block["per_condition"]["c1"]["mean"] == pytest.approx(11 / 4)
    assert block["per_condition"]["c2"]["mean"] == pytest.approx(18 / 4)
    assert block["paired"][1]["mean_diff"] == 0.0 and block["paired"][1]["n_pairs"] == 4


# ---------------------------------------------------------------------------------------------------------------------
# Figures: what is drawn is the summary's numbers


def _summary(varied, conditions, means):
    per = {c["name"]: {"n": 3, "mean": m, "ci95": [m - 0.1, m + 0.1]} for c, m in zip(conditions, means)}
    return {"varied": varied, "stand_in": True, "metrics": {"embedding_similarity": {"per_condition": per}},
            "conditions": [{**c, "present": True} for c in conditions]}


def test_line_plot_draws_each_condition_mean_at_its_setting():
    from ao_resampling.analysis.sweep_report import line_plot

    conds = [{"name": f"t{t}", "overrides": {"temperature": t}} for t in (1.0, 0.3, 0.7)]
    fig = line_plot(_summary(["temperature"], conds, [0.2, 0.6, 0.4]), {})
    (ax,) = fig.axes
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [0.3, 0.7, 1.0] and list(line.get_ydata()) == [0.6, 0.4, 0.2]
    assert len(ax.collections) == 1  # the CI band


def test_line_plot_rules_on_a_categorical_axis_one_line_per_second_setting():
    from ao_resampling.analysis.sweep_report import line_plot

    conds = [{"name": f"{r}-{t}", "overrides": {"position_rule": r, "temperature": t}}
             for r in ("assistant_start", "window:3") for t in (0.3, 1.0)]
    fig = line_plot(_summary(["position_rule", "temperature"], conds, [0.5, 0.2, 0.6, 0.1]), {})
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["assistant_start", "window:3"]
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()}
    assert lines == {"temperature=0.3": [0.5, 0.6], "temperature=1.0": [0.2, 0.1]}


def test_heatmap_cells_are_the_condition_means():
    from ao_resampling.analysis.sweep_report import heatmap

    conds = [{"name": f"{t}-{lp}", "overrides": {"temperature": t, "layer_percent": lp}}
             for t in (0.3, 1.0) for lp in (25, 50, 75)]
    means = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    fig = heatmap(_summary(["temperature", "layer_percent"], conds, means), {})
    image = fig.axes[0].get_images()[0]
    assert np.allclose(image.get_array(), [[0.1, 0.4], [0.2, 0.5], [0.3, 0.6]])  # layer_percent down, T across
