"""The experiment as one straight line: prepare -> generate -> judge -> analyse.

The command reads the run folder's ``results.json`` (+ journal) once (``ResultsStore.results``) and hands the store
down; each stage (stages/) does only the work that is missing, journals every finished unit into the store (disk
and the one in-memory copy alike), and folds the journal in at the end. Re-running the same command on the same folder
therefore continues where a crash stopped; a folder made with different result-changing settings is refused, naming
them. This module only orders the stages (and, under torchrun, the ranks) and times them; sweep.py runs it per
condition.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ao_resampling.config import ExperimentConfig
from ao_resampling import ranks
from ao_resampling.engine.loading import models
from ao_resampling.errors import PipelineError
from ao_resampling.inputs import data
from ao_resampling.engine.decoding.sampler import Layout
from ao_resampling.results import Results, load_baseline_file
from ao_resampling.stages.generate import generate, pending_runs
from ao_resampling.stages.common.sampling import load_oracle
from ao_resampling.stages.plan import STAND_IN_NOTE, now, prepare
from ao_resampling.stages.common.spreads import check_embedding_model, missing_spreads
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
    try:
        check_embedding_model(config.embedding_model)
    except models.ModelLoadError as e:
        problems.append(str(e))
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"device {config.device!r} asked for, but CUDA is not available here (use --device cpu)")
    if judge:
        from ao_resampling.stages.common.judge_calls import JudgeConfigError, check_judge_access

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
    layout: dict | None = None  # how the generate stage decoded (rows, peak memory, processes)
    n_runs: int = 0
    n_samples: int = 0
    judged: bool = False
    n_failed_calls: int = 0  # judge calls whose latest record is a failure (``run`` exits 3 on any)
    report_dir: Path | None = None
    notes: list[str] = field(default_factory=list)


def run_experiment(config: ExperimentConfig, out_dir: Path, *, judge: bool | None = None, progress: bool = True,
                   judge_client=None, log: Callable[[str], None] = print,
                   oracle: models.LoadedOracle | None = None, planned: ResultsStore | None = None) -> RunReport:
    """prepare -> (baseline) -> generate -> judge -> analyse, each doing only what is missing.

    ``oracle``: an already loaded model (a sweep loads it once for all its conditions); None loads it when needed.
    ``planned``: ``out_dir``'s store, its plan already written or checked by ``prepare`` (a sweep prepares every
    condition first), so the folder is not read again.

    Under torchrun every rank samples a share of the runs (ranks.py); rank 0 alone plans, merges the journals,
    judges and analyses, and the other ranks return after generation.
    """
    judge = config.judge if judge is None else judge
    here = ranks.start(config)  # a world of one unless torchrun started several ranks
    config = ranks.rank_config(config, here)
    if not here.is_main:
        log, progress = (lambda _: None), False
    with ranks.together(here, "pre-flight checks"):
        preflight(config, judge=judge and here.is_main)
    report = RunReport(out_dir=Path(out_dir))
    why = config.stand_in_reason()
    if why:
        report.notes.append(STAND_IN_NOTE.format(why=why))
        log(report.notes[-1])

    with _timed(report, "prepare"):
        store = planned or _write_plan(config, Path(out_dir), here, oracle)
    owned = oracle is None  # loaded here: nothing uses it after the generate stage (a sweep's is passed in)
    with _timed(report, "load"):
        oracle = _load_if_needed(config, store, here, oracle)
    if config.baseline and here.is_main:
        from ao_resampling.stages.baseline import baseline_stage

        # The target model is sampled with the adapter off, on the base weights; the AO decode that follows merges
        # the LoRA in and writes the original weights back afterwards. Other ranks wait at the next step.
        with _timed(report, "baseline"):
            baseline_stage(store, config, oracle=oracle, judge=judge, judge_client=judge_client, progress=progress)
    with _timed(report, "generate"):
        other_rank = _generate_stage(store, config, Path(out_dir), here, oracle=oracle, progress=progress,
                                     report=report, last_use=owned)
    if other_rank:  # its share is journaled, rank 0 does the rest
        sampled = report.layout["runs_sampled"] if report.layout else 0
        report.n_runs, report.n_samples = sampled, sampled * config.samples_per_query
        return report
    _judge_and_analyse(store, config, report, judge=judge, judge_client=judge_client, progress=progress)
    return report


@contextlib.contextmanager
def _timed(report: RunReport, stage: str) -> Iterator[None]:
    """Records the stage's wall time in the report (``run`` prints them), once the stage has finished."""
    t = time.perf_counter()
    yield
    report.stage_seconds[stage] = time.perf_counter() - t


def _write_plan(config: ExperimentConfig, out_dir: Path, here: ranks.World,
                oracle: models.LoadedOracle | None) -> ResultsStore | None:
    """One plan (question sample, run ids), by rank 0 alone; the other ranks get None (they read the tokenizer while
    they wait, so that loading the model does not read it after the plan, on the critical path).

    Before the model: a folder made with other settings is refused in seconds, not after loading 27B.
    """
    with ranks.together(here, "writing the plan"):
        tokenizer = oracle.tokenizer if oracle is not None else None  # a sweep's: not loaded again per condition
        if not here.is_main:
            if tokenizer is None:
                models.load_tokenizer(config.tokenizer or config.model)
            return None
        return prepare(config, out_dir, tokenizer=tokenizer)[0]


def _load_if_needed(config: ExperimentConfig, store: ResultsStore | None, here: ranks.World,
                    oracle: models.LoadedOracle | None) -> models.LoadedOracle | None:
    """The given oracle, else a fresh one unless nothing is left to sample (a resume may need none)."""
    if oracle is None and (here.is_distributed or needs_model(store.results, config)):
        with ranks.together(here, "loading the model"):
            return load_oracle(config)  # a module global: tests patch pipeline.load_oracle
    return oracle


def _generate_stage(store: ResultsStore | None, config: ExperimentConfig, out_dir: Path, here: ranks.World, *,
                    oracle: models.LoadedOracle | None, progress: bool, report: RunReport, last_use: bool) -> bool:
    """Samples the missing AO answers. True on a rank other than 0 (its share is journaled; it is done then).
    ``last_use``: the pipeline loaded the oracle and nothing after this stage uses it (the merge is kept)."""
    if here.is_distributed:
        layout = ranks.generate_shard(out_dir, config, here, oracle=oracle, progress=progress)
        ranks.stop()
    else:
        layout = generate(store, config, oracle=oracle, progress=progress, last_use=last_use)
    report.layout = _layout_record(layout, config, here)
    if not here.is_main:
        return True
    if here.is_distributed:  # the ranks journaled in processes of their own: read their journals in
        store.reload()
    if layout is not None:  # how the answers of this session were decoded (rank 0's step; the process layout)
        store.results.meta.decode_layout = report.layout
    store.compact()  # written once: under torchrun, every rank's journal merged in plan order
    return False


def _layout_record(layout: Layout | None, config: ExperimentConfig, here: ranks.World) -> dict | None:
    """The row count chosen, the peak memory, the processes, the Triton kernels used, and where the stage's seconds
    went outside the decode steps: journaling (the GPU idles meanwhile), entering the stage (kernel compiles, the
    weight snapshot, the merge), leaving it (the restore), the CUDA graph captures, the prompt passes. Into meta and
    timings.json."""
    if layout is None:
        return None
    return {"batch_rows": layout.rows, "batch_rows_setting": layout.rows_setting,
            "rows_that_fit": layout.rows_that_fit, "peak_memory_bytes": layout.peak_memory_bytes,
            "device": layout.device, "device_map": config.device_map, "processes": here.size,
            "refills": layout.refills, "prompt_passes": layout.prompt_passes, "decode_steps": layout.decode_steps,
            "runs_sampled": layout.runs, "triton_kernels": layout.triton_kernels,
            "journal_s": round(layout.on_answers_seconds, 2), "setup_s": round(layout.setup_s, 2),
            "teardown_s": round(layout.teardown_s, 2), "capture_s": round(layout.capture_s, 2),
            "prompt_s": round(layout.prompt_s, 2)}


def _judge_and_analyse(store: ResultsStore, config: ExperimentConfig, report: RunReport, *, judge: bool,
                       judge_client, progress: bool) -> None:
    """Rank 0's end of the run: verdicts, spreads and the report folder, then the counts ``run`` prints."""
    if judge:
        from ao_resampling.stages.judge import failed_calls, judge_stage

        with _timed(report, "judge"):
            judge_stage(store, config, client=judge_client, progress=progress)
        report.judged = True
        report.n_failed_calls = failed_calls(store.results)
    with _timed(report, "analyse"):
        report.report_dir = analyse(store, config, progress=progress)
    results = store.results
    report.n_runs = len(results.runs)
    report.n_samples = sum(len(r.responses) for r in results.runs)


def analyse(store: ResultsStore, config: ExperimentConfig, *, out_dir: Path | None = None,
            baseline_file: Path | None = None, progress: bool = True) -> Path:
    """Spreads of the AO runs and the baseline cached in the run folder, then the report folder: how `run` and
    `baseline` end (they own the folder). ``baseline_file``: as in ``report_of``."""
    from ao_resampling.stages.baseline import baseline_spread_stage  # openai, via the judge

    spread_stage(store, embedding_model=config.embedding_model, progress=progress)
    baseline_spread_stage(store, embedding_model=config.embedding_model, progress=progress)
    results = store.results
    results.meta.updated_at = now()
    store.write(results)
    return report_of(results, config, out_dir=out_dir or store.folder / "report", baseline_file=baseline_file,
                     progress=progress)


def report_of(results: Results, config: ExperimentConfig, *, out_dir: Path, baseline_file: Path | None = None,
              progress: bool = True) -> Path:
    """The report folder of ``results`` as they are, written under ``out_dir`` alone (the `report` command: the run
    folder may be another's, read-only or archived, so nothing is written back): spreads it lacks are computed in
    memory. ``baseline_file``: a target-model baseline saved on its own, matched to the AO runs by target id."""
    from ao_resampling.analysis.report import write_report  # matplotlib: only when a report is written
    from ao_resampling.stages.baseline import with_spreads  # openai, via the judge

    spreads = missing_spreads(results.runs, embedding_model=config.embedding_model, progress=progress)
    runs = [r.model_copy(update={"spread": spreads[r.run_id]}) if r.run_id in spreads else r for r in results.runs]
    baseline = results.baseline
    if baseline_file is not None:
        baseline = load_baseline_file(baseline_file)
    if baseline is not None:
        baseline = with_spreads(baseline, embedding_model=config.embedding_model)
    write_report(results.model_copy(update={"runs": runs, "baseline": baseline}), out_dir,
                 seed=config.bootstrap_seed, n_boot=config.bootstrap_resamples)
    return out_dir
