"""What importing the analysis loads, in a fresh interpreter (a subprocess): no stage, engine, torch, judge client."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_analysis_loads_no_stage_engine_nor_judge_client():
    """analysis/* reads results only: importing it must not load a stage, the engine, torch or the judge's openai
    client (plots -> baseline -> judge -> openai cost ~2 s of the report's import). A fresh interpreter, so what
    other tests imported does not count."""
    code = ("import sys, ao_resampling.analysis.report, ao_resampling.analysis.sweep_report\n"
            "heavy = ('openai', 'torch', 'sentence_transformers')\n"
            "print(sorted(m for m in sys.modules if m in heavy or m.startswith(('ao_resampling.stages.', "
            "'ao_resampling.engine.', 'ao_resampling.pipeline', 'ao_resampling.sweep'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
