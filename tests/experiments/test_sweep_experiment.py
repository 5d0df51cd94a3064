"""A temperature sweep of the real experiment, as a test: ``pytest -m gpu -k sweep``.

Same inputs as test_full_experiment.py (the --ao-* options / AO_* environment variables), swept over
``AO_SWEEP_TEMPERATURES`` (default 0.3,0.7,1.0), the model loaded once. Besides the sweep report it writes
``speed.json``: the sweep's wall time against one run's (the model load plus the first condition), whose ratio should
be about the number of conditions, not more (the issue's bar). Artifacts stay under ``artifacts/gpu-sweep/``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from ao_resampling import pipeline
from ao_resampling.results import load_results_file
from ao_resampling.sweep import plan_conditions, run_sweep
from tests.experiments.conftest import experiment_config, option
from tests.experiments.test_full_experiment import eager_fallbacks, judge_endpoint  # noqa: F401  (a fixture, reused)

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]


def test_temperature_sweep(request, judge_endpoint, recwarn):  # noqa: F811
    api, base_url, _ = judge_endpoint
    cfg = request.config
    model = option(cfg, "--ao-model")
    base = experiment_config(request, api, base_url)
    temperatures = [float(t) for t in os.environ.get("AO_SWEEP_TEMPERATURES", "0.3,0.7,1.0").split(",")]
    planned = plan_conditions(base, [{"temperature": t} for t in temperatures])
    out = REPO / "artifacts" / "gpu-sweep" / model.replace("/", "_").replace(":", "_")
    try:
        pipeline.preflight(base, judge=True)
    except pipeline.PipelineError as e:
        pytest.fail(str(e), pytrace=False)

    t = time.perf_counter()
    outcome = run_sweep(base, planned, out, judge=True, progress=True)
    wall = time.perf_counter() - t
    first = outcome.reports[planned[0].name].stage_seconds
    one_run = outcome.load_s + sum(first.values())  # the sweep loaded the model, not the first run
    speed = {"conditions": len(planned), "sweep_s": round(wall, 1), "one_run_s": round(one_run, 1),
             "ratio": round(wall / one_run, 2) if one_run else None, "model_loads": outcome.model_loads,
             "per_condition": {n: {k: round(v, 1) for k, v in r.stage_seconds.items()}
                               for n, r in outcome.reports.items()}}
    (out / "speed.json").write_text(json.dumps(speed, indent=1))
    print(f"\nsweep speed: {speed}")
    assert not eager_fallbacks(recwarn), "decode steps fell back to eager: the sweep's speed is not the real one"

    assert outcome.model_loads <= 1
    for c in planned:
        results = load_results_file(out / c.name / "results.json")
        assert results.meta.decoding.temperature == c.config.temperature
        assert all(len(r.responses) == base.samples_per_query for r in results.runs), c.name
    summary = json.loads((outcome.report_dir / "sweep_summary.json").read_text())
    assert summary["varied"] == ["temperature"] and (outcome.report_dir / "sweep_lines.png").stat().st_size > 0
    agreement = summary["metrics"]["pairwise_agreement"]  # the cluster judge's, per condition and paired
    assert set(agreement["per_condition"]) == {c.name for c in planned}
    assert len(agreement["paired"]) == len(planned) * (len(planned) - 1) // 2
    assert all(p["n_pairs"] and p["ci95"] is not None for p in agreement["paired"])
    print(f"pairwise agreement per condition: "
          f"{ {n: round(s['mean'], 3) for n, s in agreement['per_condition'].items()} }")
