"""The experiment as one straight line: prepare -> generate -> judge -> analyse.

Each stage (stages/) reads the run folder's ``results.json`` (+ journal), does only the work that is missing,
journals every finished unit, and folds the journal in at the end. Re-running the same command on the same folder
therefore continues where a crash stopped; a folder made with different result-changing settings is refused, naming
them. This module only orders the stages (and, under torchrun, the ranks) and times them; sweep.py runs it per
condition.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ao_resampling.config import ExperimentConfig
from ao_resampling.engine import distributed, models
from ao_resampling.errors import PipelineError
from ao_resampling.inputs import data
from ao_resampling.results import Results, load_baseline_file
from ao_resampling.stages.generate import generate, generate_shard, load_oracle, pending_runs
from ao_resampling.stages.plan import STAND_IN_NOTE, now, prepare
from ao_resampling.stages.spread import spread_stage
from ao_resampling.store import ResultsStore

# stages.judge and stages.baseline (openai, ~2 s) and analysis.report (matplotlib) are imported where they are used:
# no circle needs it (tests/unit/test_architecture.py), only the start-up of commands that never judge or plot.


def default_out_dir(config: ExperimentConfig, preset: str) -> Path:
    """Deterministic, so re-running the same command finds (and continues) the same folder."""
    if preset == "demo":
        return Path("artifacts") / "demo"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", config.model.split("/")[-1])
    return Path("artifacts") / f"{slug}__{config.num_targets}x{config.num_questions}x{config.samples_per_query}"


def needs_model(results: Results, config: ExperimentConfig) -> bool:
    """Whether any AO answer, or any target-model baseline reply, is still missing."""
    if pending_runs(results, config.samples_per_query):
        return True
    if not config.baseline:
        return False
    sampled = {r.target_id for r in (results.baseline.runs if results.baseline else [])
               if len(r.responses) >= config.samples_per_query}
    return any(t.id not in sampled for t in results.targets)


# ---------------------------------------------------------------------------------------------------------------------
# pre-flight and the whole run


def preflight(config: ExperimentConfig, *, judge: bool) -> None:
    """Everything that can fail fast, before minutes of model loading: data, template, model, LoRA, CUDA, judge."""
    problems = []
    try:
        data.select_targets(data.load_targets(config.targets), config.num_targets,
                            source=str(config.targets or "built-in targets"))
        pool = data.load_question_pool(config.questions, variable=config.questions_variable)
        data.sample_questions(pool, config.num_questions, config.question_seed)
    except data.DataError as e:
        problems.append(str(e))
    for what, check in (("model", lambda: models.check_resolvable(config.model)),
                        ("tokenizer", lambda: models.check_resolvable(config.tokenizer or config.model)),
                        ("oracle LoRA", lambda: models.check_lora_resolvable(config.oracle_lora))):
        try:
            check()
        except models.ModelLoadError as e:
            problems.append(f"{what}: {e}")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"device {config.device!r} asked for, but CUDA is not available here (use --device cpu)")
    if judge:
        from ao_resampling.stages.judge import JudgeConfigError, check_judge_access

        try:
            check_judge_access(config)
        except JudgeConfigError as e:
            problems.append(str(e))
    if problems:
        raise PipelineError("pre-flight checks failed:\n  - " + "\n  - ".join(problems))


@dataclass
class RunReport:
    out_dir: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)
    n_runs: int = 0
    n_samples: int = 0
    judged: bool = False
    report_dir: Path | None = None
    notes: list[str] = field(default_factory=list)


def run_experiment(config: ExperimentConfig, out_dir: Path, *, judge: bool | None = None, progress: bool = True,
                   judge_client=None, log: Callable[[str], None] = print,
                   oracle: models.LoadedOracle | None = None) -> RunReport:
    """prepare -> (baseline) -> generate -> judge -> analyse, each doing only what is missing.

    ``oracle``: an already loaded model (a sweep loads it once for all its conditions); None loads it when needed.

    Under torchrun every rank samples a share of the runs (distributed.py); rank 0 alone plans, merges the journals,
    judges and analyses, and the other ranks return after generation.
    """
    judge = config.judge if judge is None else judge
    here = distributed.start(config)  # a world of one unless torchrun started several ranks
    config = distributed.rank_config(config, here)
    if not here.is_main:
        log, progress = (lambda _: None), False
    with distributed.together(here, "pre-flight checks"):
        preflight(config, judge=judge and here.is_main)
    report = RunReport(out_dir=Path(out_dir))
    why = config.stand_in_reason()
    if why:
        report.notes.append(STAND_IN_NOTE.format(why=why))
        log(report.notes[-1])

    t = time.perf_counter()
    with distributed.together(here, "writing the plan"):  # one plan (question sample, run ids), by rank 0 alone
        # Before the model: a folder made with other settings is refused in seconds, not after loading 27B.
        tokenizer = oracle.tokenizer if oracle is not None else None  # a sweep's: not loaded again per condition
        store, _ = prepare(config, out_dir, tokenizer=tokenizer) if here.is_main else (None, None)
    report.stage_seconds["prepare"] = time.perf_counter() - t

    t = time.perf_counter()
    if oracle is None and (here.is_distributed or needs_model(store.load(), config)):  # a resume may need none
        with distributed.together(here, "loading the model"):
            oracle = load_oracle(config)
    report.stage_seconds["load"] = time.perf_counter() - t

    if config.baseline and here.is_main:
        from ao_resampling.stages.baseline import baseline_stage

        # Before the AO generation: decoding merges the LoRA into the weights and back, which is exact only up to
        # rounding, and the target model must be sampled with its own weights. Other ranks wait at the next step.
        t = time.perf_counter()
        baseline_stage(store, config, oracle=oracle, judge=judge, judge_client=judge_client, progress=progress)
        report.stage_seconds["baseline"] = time.perf_counter() - t

    t = time.perf_counter()
    if here.is_distributed:
        sampled = generate_shard(Path(out_dir), config, here, oracle=oracle, progress=progress)
        distributed.stop()
        if not here.is_main:
            report.stage_seconds["generate"] = time.perf_counter() - t
            report.n_runs, report.n_samples = sampled, sampled * config.samples_per_query
            return report
    else:
        generate(store, config, oracle=oracle, progress=progress)
    store.compact()  # under torchrun: every rank's journal, merged in plan order
    report.stage_seconds["generate"] = time.perf_counter() - t

    if judge:
        from ao_resampling.stages.judge import judge_stage

        t = time.perf_counter()
        judge_stage(store, config, client=judge_client, progress=progress)
        report.stage_seconds["judge"] = time.perf_counter() - t
        report.judged = True

    t = time.perf_counter()
    report.report_dir = analyse(store, config, progress=progress)
    report.stage_seconds["analyse"] = time.perf_counter() - t

    results = store.load()
    report.n_runs = len(results.runs)
    report.n_samples = sum(len(r.responses) for r in results.runs)
    return report


def analyse(store: ResultsStore, config: ExperimentConfig, *, out_dir: Path | None = None,
            baseline_file: Path | None = None, progress: bool = True) -> Path:
    """Spreads of the AO runs and the baseline, then the report folder: how `run`, `baseline` and `report` end.

    ``baseline_file``: a target-model baseline saved on its own, matched to the AO runs by target id, in memory only.
    """
    from ao_resampling.analysis.report import write_report  # matplotlib: only when a report is written
    from ao_resampling.stages.baseline import baseline_spread_stage, with_spreads  # openai, via the judge

    spread_stage(store, embedding_model=config.embedding_model, progress=progress)
    baseline_spread_stage(store, embedding_model=config.embedding_model, progress=progress)
    baseline = None
    if baseline_file is not None:
        baseline = with_spreads(load_baseline_file(baseline_file), embedding_model=config.embedding_model)
    results = store.load()
    results.meta.updated_at = now()
    store.write(results)
    out_dir = out_dir or store.folder / "report"
    write_report(results, out_dir, seed=config.bootstrap_seed, n_boot=config.bootstrap_resamples, baseline=baseline)
    return out_dir
