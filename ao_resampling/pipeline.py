"""The experiment as one straight line: prepare -> generate -> judge -> analyse.

Each stage reads the run folder's ``results.json`` (+ journal), does only the work that is missing, journals every
finished unit, and folds the journal in at the end. Re-running the same command on the same folder therefore
continues where a crash stopped; a folder made with different result-changing settings is refused, naming them.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError

from ao_resampling.errors import AOResamplingError
from ao_resampling.inputs import data
from ao_resampling.engine import models
from ao_resampling.config import ExperimentConfig, describe_problems, diff_settings
from ao_resampling.inputs.encoding import encode_target, require_chat_template
from ao_resampling.engine.generation_settings import Sampling, resolve_sampling
from ao_resampling.engine.hooks import capture_activations_at
from ao_resampling.inputs.oracle import build_oracle_query
from ao_resampling.inputs.plan_check import context_overflows, plan_differences
from ao_resampling.inputs.positions import landmarks_of, parse_rule, resolve
from ao_resampling.results import (
    AOQuestion, Decoding, Meta, Response, Results, Run, TargetRecord, run_id_for, sha256_of_ids,
)
from ao_resampling.store import ResultsStore, responses_event
from ao_resampling.engine.reference import sample_sequential
from ao_resampling.engine.sampling import BatchedSampler, DecodeParams, Query, Sample, effective_sampling

STAND_IN_NOTE = (
    "STAND-IN: {why}. These numbers exercise the pipeline; they say nothing about the real Activation Oracle."
)
CAPTURE_BATCH = 32  # targets are short; a few passes over half the model, not one per handful


class PipelineError(AOResamplingError, RuntimeError):
    """A pre-flight check or a resume that cannot go ahead; the message says what to change."""


def default_out_dir(config: ExperimentConfig, preset: str) -> Path:
    """Deterministic, so re-running the same command finds (and continues) the same folder."""
    if preset == "demo":
        return Path("artifacts") / "demo"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", config.model.split("/")[-1])
    return Path("artifacts") / f"{slug}__{config.num_targets}x{config.num_questions}x{config.samples_per_query}"


def code_version() -> tuple[str, str | None]:
    try:
        version = importlib.metadata.version("ao-resampling")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree (PYTHONPATH) without installing
        version = "0+source"
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5)
        commit = done.stdout.strip() if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    return version, commit


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------------------
# prepare


@dataclass(frozen=True)
class PlanRow:
    target_id: str
    n_tokens: int
    assistant_start_idx: int
    token_at_idx: str


def build_plan(config: ExperimentConfig, tokenizer) -> tuple[Results, list[PlanRow]]:
    """Targets, sampled questions, every target encoded and every run laid out with its token ids; no model."""
    targets = data.select_targets(data.load_targets(config.targets), config.num_targets,
                                  source=str(config.targets or "built-in targets"))
    pool = data.load_question_pool(config.questions, variable=config.questions_variable)
    questions = data.sample_questions(pool, config.num_questions, config.question_seed)
    require_chat_template(tokenizer, where=f"tokenizer {config.tokenizer or config.model!r}")
    n_layers = models.model_num_layers(config.model)
    layer = models.layer_at_percent(n_layers, config.layer_percent)
    rule = parse_rule(config.position_rule)
    oracle_queries = {q.id: build_oracle_query(tokenizer, layer=layer, question=q.text, question_id=q.id,
                                               num_positions=rule.k) for q in questions}

    runs, table = [], []
    for target in targets:
        messages = [m.model_dump() for m in target.messages]
        enc = encode_target(tokenizer, messages, target_id=target.id)
        read = resolve(rule, landmarks_of(tokenizer, messages, enc, rule, target_id=target.id), target_id=target.id)
        table.append(PlanRow(target.id, len(enc.input_ids), enc.assistant_start_idx,
                             tokenizer.convert_ids_to_tokens(enc.input_ids[enc.assistant_start_idx])))
        for q in questions:
            oq = oracle_queries[q.id]
            runs.append(Run(
                run_id=run_id_for(target.id, q.id), target_id=target.id, ao_question_id=q.id,
                assistant_start_idx=enc.assistant_start_idx, context_positions=read, position_rule=str(rule),
                context_input_ids=enc.input_ids, context_input_ids_sha256=sha256_of_ids(enc.input_ids),
                oracle_input_ids=oq.input_ids, placeholder_positions=oq.placeholder_positions,
            ))
    check_context_window(config, runs)
    version, commit = code_version()
    why = config.stand_in_reason()
    meta = Meta(
        tool_version=version, git_commit=commit, created_at=now(), updated_at=now(), model=config.model,
        oracle_lora=config.oracle_lora, tokenizer=config.tokenizer or config.model, num_layers=n_layers, layer=layer,
        injection_layer=config.injection_layer, steering_coefficient=config.steering_coefficient,
        decoding=decoding(config, planned_sampling(config, tokenizer)), question_seed=config.question_seed, decode_seed=config.decode_seed,
        judge_model=config.judge_model, stand_in=why is not None,
        note=STAND_IN_NOTE.format(why=why) if why else None, config=config.model_dump(mode="json"),
    )
    results = Results(
        meta=meta, ao_questions=[AOQuestion(id=q.id, text=q.text) for q in questions],
        targets=[TargetRecord(id=t.id, messages=[m.model_dump() for m in t.messages]) for t in targets], runs=runs,
    )
    return results, table


def check_context_window(config: ExperimentConfig, runs: list[Run]) -> None:
    """Refuse, before any weights are loaded, a target or oracle prompt longer than the model's context window."""
    limit = models.model_context_length(config.model)
    overflows = context_overflows(runs, limit=limit, max_new_tokens=config.max_new_tokens,
                                  baseline_new_tokens=config.baseline_max_new_tokens if config.baseline else None)
    if overflows:
        raise PipelineError(
            f"model {config.model!r} takes at most {limit} positions (max_position_embeddings); these do not fit:\n  "
            + "\n  ".join(overflows) + "\nShorten or drop those targets, or lower max_new_tokens."
        )


def planned_sampling(config: ExperimentConfig, tokenizer) -> Sampling:
    """The decoding HF generate will do, from the model's generation_config file (no weights): recorded in meta."""
    return resolve_sampling(models.generation_config_of(config.model), temperature=config.temperature,
                            top_p=config.top_p, top_k=config.top_k, fallback_eos=models.stop_token_ids(tokenizer),
                            source=f"model {config.model!r}")


def decoding(config: ExperimentConfig, sampling: Sampling | None = None) -> Decoding:
    """The run's decoding; with ``sampling`` (known once the model is loaded), the effective top_k and eos ids."""
    return Decoding(temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens,
                    do_sample=config.temperature > 0, seed=config.decode_seed,
                    top_k=config.top_k if sampling is None else sampling.top_k,
                    eos_token_ids=None if sampling is None else list(sampling.eos_token_ids))


def prepare(config: ExperimentConfig, out_dir: Path, tokenizer=None) -> tuple[ResultsStore, list[PlanRow]]:
    """Write the plan, or check that an existing folder was made with the same result-changing settings."""
    tokenizer = tokenizer or models.load_tokenizer(config.tokenizer or config.model)
    plan, table = build_plan(config, tokenizer)
    store = ResultsStore(out_dir)
    if store.exists():
        existing = store.load()
        try:
            old = ExperimentConfig.model_validate(existing.meta.config).settings_that_change_results() \
                if existing.meta.config else {}
        except ValidationError as e:  # made by another version of this tool: not something to resume blindly
            raise PipelineError(f"{store.results_path}: its meta.config is not a config this version understands "
                                f"({describe_problems(e)}); use another --out folder") from e
        differences = diff_settings(old, config.settings_that_change_results())
        if differences:
            raise PipelineError(
                f"{store.results_path} was made with other settings; refusing to mix them. Differences:\n  "
                + "\n  ".join(differences) + "\nUse another --out folder, or the original settings to continue."
            )
        changes = plan_differences(existing, plan)
        if changes:
            raise PipelineError(
                f"{store.results_path} was planned from other targets/questions than the ones given now; refusing to "
                "mix their answers. Changes:\n  " + "\n  ".join(changes)
                + "\nUse another --out folder, or the original inputs to continue."
            )
    else:
        store.write(plan)
    return store, table


# ---------------------------------------------------------------------------------------------------------------------
# generate


def pending_runs(results: Results, n: int) -> list[Run]:
    return [r for r in results.runs if len(r.responses) < n]


def to_responses(run_id: str, samples: list[Sample], decode: Decoding) -> list[dict]:
    return [Response(sample_id=f"{run_id}__s{i:02d}", text=s.text, decoding=decode, n_tokens=s.n_tokens,
                     finish_reason=s.finish_reason, text_stripped=False).model_dump(mode="json")
            for i, s in enumerate(samples)]


def generate(store: ResultsStore, config: ExperimentConfig, *, oracle: models.LoadedOracle | None = None,
             progress: bool = True, runs_filter: Callable[[Run], bool] | None = None) -> int:
    """Sample the missing answers; each finished batch is journaled. Returns how many runs were sampled."""
    results = store.load()
    todo = [r for r in pending_runs(results, config.samples_per_query) if runs_filter is None or runs_filter(r)]
    if not todo:
        return 0
    oracle = oracle or load_oracle(config)
    if oracle.read_layer != results.meta.layer:
        raise PipelineError(f"the model reads layer {oracle.read_layer} ({config.layer_percent}%), the plan says "
                            f"{results.meta.layer}")
    acts = capture_targets(oracle, {r.target_id: r for r in todo}.values())
    queries = [Query(key=r.run_id, input_ids=tuple(r.oracle_input_ids), n=config.samples_per_query,
                     vectors_KD=acts[r.target_id], positions_K=tuple(r.placeholder_positions)) for r in todo]
    params = DecodeParams(temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens,
                          seed=config.decode_seed, top_k=config.top_k)
    decode = decoding(config, effective_sampling(oracle.model, oracle.tokenizer, params))
    planned = results.meta.decoding
    if planned is not None and planned.top_k is not None and planned != decode:  # older plans did not record it
        raise PipelineError(f"the loaded model decodes with {decode.model_dump()}, but the plan in "
                            f"{store.results_path} recorded {planned.model_dump()} (its generation_config changed?)")

    def journal(batch: dict[str, list[Sample]]) -> None:
        store.journal.append_many([responses_event(run_id, to_responses(run_id, samples, decode))
                                   for run_id, samples in batch.items()])

    if config.sampler == "sequential":
        for q in queries:  # one query at a time, journaled as it finishes
            journal(sample_sequential(oracle.model, oracle.tokenizer, [q], injection_layer=oracle.injection_layer,
                                      coefficient=config.steering_coefficient, params=params))
    else:
        BatchedSampler(oracle.model, oracle.tokenizer, injection_layer=oracle.injection_layer,
                       coefficient=config.steering_coefficient, params=params, max_rows=config.batch_rows,
                       max_tokens=config.batch_tokens, merge_lora=config.merge_lora,
                       ).run(queries, on_batch=journal, progress=progress)
    return len(todo)


def needs_model(results: Results, config: ExperimentConfig) -> bool:
    """Whether any AO answer, or any target-model baseline reply, is still missing."""
    if pending_runs(results, config.samples_per_query):
        return True
    if not config.baseline:
        return False
    sampled = {r.target_id for r in (results.baseline.runs if results.baseline else [])
               if len(r.responses) >= config.samples_per_query}
    return any(t.id not in sampled for t in results.targets)


def load_oracle(config: ExperimentConfig) -> models.LoadedOracle:
    return models.load_oracle(model=config.model, tokenizer=config.tokenizer, oracle_lora=config.oracle_lora,
                              dtype=config.dtype, device=config.device, device_map=config.device_map,
                              layer_percent=config.layer_percent, injection_layer=config.injection_layer)


def capture_targets(oracle: models.LoadedOracle, runs) -> dict[str, torch.Tensor]:
    """The base model's residual (adapter off) at each target's read positions -> {target_id: acts_KD}.

    The K positions of a run (its ``context_positions``, resolved from the position rule) are read in one pass;
    vector k goes to placeholder k. Every run of a plan shares K, so a chunk is one rectangular batch.
    """
    runs = list(runs)
    acts: dict[str, torch.Tensor] = {}
    for start in range(0, len(runs), CAPTURE_BATCH):
        chunk = runs[start:start + CAPTURE_BATCH]
        acts_BKD = capture_activations_at(oracle.model, [r.context_input_ids for r in chunk],
                                          [r.context_positions for r in chunk], oracle.read_layer,
                                          oracle.tokenizer.pad_token_id)
        acts.update({r.target_id: a for r, a in zip(chunk, acts_BKD)})
    return acts


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
    from ao_resampling.engine import distributed

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
        sampled = distributed.generate_shard(Path(out_dir), config, here, oracle=oracle, progress=progress)
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
    from ao_resampling.results import load_baseline_file
    from ao_resampling.stages.baseline import baseline_spread_stage, with_spreads
    from ao_resampling.stages.spread import spread_stage
    from ao_resampling.analysis.report import write_report

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
