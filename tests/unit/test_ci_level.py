"""The summary's confidence intervals are 95% intervals: pinned against normal theory, not against a snapshot that
`--force-regen` would silently rewrite if the level changed."""

from __future__ import annotations

import numpy as np
import pytest

from ao_resampling.analysis.stats import describe, rng_for


@pytest.mark.parametrize("seed", [0, 1])
def test_ci95_is_a_95_percent_interval_of_the_mean(seed):
    values = np.linspace(0.0, 1.0, 401)  # smooth enough that the bootstrap mean is close to normal
    lo, hi = describe(values, rng=rng_for(seed, "pin"), n_boot=20_000)["ci95"]
    standard_error = values.std(ddof=0) / np.sqrt(values.size)  # what the bootstrap resamples estimate
    # 95%: 1.96 se either side (0.0283 here); a 90% interval would be 0.0237 and a 99% one 0.0371.
    assert (hi - lo) / 2 == pytest.approx(1.959964 * standard_error, abs=0.0015)
    assert (lo + hi) / 2 == pytest.approx(values.mean(), abs=0.0015)
