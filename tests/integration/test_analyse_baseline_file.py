"""``pipeline.analyse`` on a run folder with a separately saved baseline file (what ``report --baseline FILE`` does).

The comparison's numbers worked out by hand, without a run folder: tests/unit/test_baseline_stats.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.support.baseline_factory import earlier_format
from tests.support.results_factory import make_results


def test_analyse_takes_a_separate_baseline_file_as_the_report_command_does(tmp_path):
    """`report --baseline FILE` is ``pipeline.analyse`` (one function): the file's baseline is compared by target id
    and cached nowhere; the AO runs get their spreads; numbers as in the hand-worked file test above."""
    from ao_resampling import pipeline
    from ao_resampling.config import ExperimentConfig
    from ao_resampling.store import ResultsStore

    store = ResultsStore(tmp_path / "run")
    store.write(make_results([[8, 6], [5, 5], [9, 9], [3, 4]]))  # t1..t4, no spreads yet
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(earlier_format(["t1", "t2", "t3", "t9"], {"t1": 9, "t2": 4, "t3": 8, "t9": 2})))
    out = pipeline.analyse(store, ExperimentConfig(embedding_model="none", bootstrap_resamples=100),
                           baseline_file=path, progress=False)
    b = json.loads((out / "summary.json").read_text())["baseline"]
    assert b["only_in_results"] == ["t4"] and b["only_in_baseline"] == ["t9"]
    assert b["n_targets"] == 3 and b["pearson_r"] == pytest.approx(np.corrcoef([9, 4, 8], [7, 5, 9])[0, 1])
    loaded = store.load()
    assert loaded.baseline is None  # the separate file is for the report only
    assert all(r.spread is not None and r.spread.embedding_model == "none" for r in loaded.runs)
