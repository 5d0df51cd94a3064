"""The prepare stage: the plan of a run (targets, sampled questions, every run with its token ids) and its folder.

``build_plan`` reads the input files and the tokenizer, never model weights; ``prepare`` writes the plan into a new
run folder, or checks that an existing folder was planned with the same result-changing settings and inputs, so a
re-run continues it and a different experiment is refused before any model is loaded. ``planned_decoding`` is the
run's one decoding value (its settings merged with the model's generation_config file); generate checks the loaded
model against it.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from ao_resampling.config import Decoding, ExperimentConfig, diff_settings
from ao_resampling.engine.loading import models
from ao_resampling.engine.decoding.settings import run_decoding
from ao_resampling.errors import PipelineError, describe_problems
from ao_resampling.inputs import data
from ao_resampling.inputs.encoding import encode_target, require_chat_template
from ao_resampling.inputs.oracle import build_oracle_query
from ao_resampling.inputs.plan_check import context_overflows, plan_differences
from ao_resampling.inputs.positions import landmarks_of, resolve
from ao_resampling.position_rules import parse_rule
from ao_resampling.results import AOQuestion, Meta, Results, Run, TargetRecord, run_id_for, sha256_of_ids
from ao_resampling.store import ResultsStore

STAND_IN_NOTE = (
    "STAND-IN: {why}. These numbers exercise the pipeline; they say nothing about the real Activation Oracle."
)


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


@dataclass(frozen=True)
class PlanRow:
    """One target in ``prepare``'s table: where its assistant turn starts and what the position rule reads."""

    target_id: str
    n_tokens: int
    assistant_start_idx: int
    read_positions: list[int]  # the rule's token indices (``runs[].context_positions``)
    tokens_read: list[str]  # the tokens at those indices


def build_plan(config: ExperimentConfig, tokenizer) -> tuple[Results, list[PlanRow]]:
    """Targets, sampled questions, every target encoded and every run laid out with its token ids; no model."""
    targets = data.select_targets(data.load_targets(config.targets), config.num_targets,
                                  source=str(config.targets or "built-in targets"))
    pool = data.load_question_pool(config.questions, variable=config.questions_variable)
    questions = data.sample_questions(pool, config.num_questions, config.question_seed)
    require_chat_template(tokenizer, where=f"tokenizer {config.tokenizer or config.model!r}")
    n_layers = models.model_num_layers(config.model)
    check_layers(config, n_layers)
    layer = models.layer_at_percent(n_layers, config.layer_percent)
    rule = parse_rule(config.position_rule)
    encoded = []  # every target's read positions first: they bound a window's K before any prompt of K placeholders
    for target in targets:
        messages = [m.model_dump() for m in target.messages]
        enc = encode_target(tokenizer, messages, target_id=target.id)
        read = resolve(rule, landmarks_of(tokenizer, messages, enc, rule, target_id=target.id), target_id=target.id)
        encoded.append((target, enc, read))
    oracle_queries = {q.id: build_oracle_query(tokenizer, layer=layer, question=q.text, question_id=q.id,
                                               num_positions=rule.k) for q in questions}

    runs, table = [], []
    for target, enc, read in encoded:
        table.append(PlanRow(target.id, len(enc.input_ids), enc.assistant_start_idx, read,
                             tokenizer.convert_ids_to_tokens([enc.input_ids[i] for i in read])))
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
        decoding=planned_decoding(config, tokenizer), question_seed=config.question_seed,
        decode_seed=config.decode_seed,
        judge_model=config.judge_model, stand_in=why is not None,
        note=STAND_IN_NOTE.format(why=why) if why else None, config=config.model_dump(mode="json"),
    )
    results = Results(
        meta=meta, ao_questions=[AOQuestion(id=q.id, text=q.text) for q in questions],
        targets=[TargetRecord(id=t.id, messages=[m.model_dump() for m in t.messages]) for t in targets], runs=runs,
    )
    return results, table


def check_layers(config: ExperimentConfig, n_layers: int) -> None:
    """The read and injection layers exist in the model (its config alone says how many it has): refused here, before
    any weights load, not by an index error once they have."""
    read = models.layer_at_percent(n_layers, config.layer_percent)
    for field, layer in (("layer_percent", read), ("injection_layer", config.injection_layer)):
        if not 0 <= layer < n_layers:
            raise PipelineError(f"setting {field} = {getattr(config, field)}: layer {layer} does not exist in model "
                                f"{config.model!r}, whose layers are 0..{n_layers - 1}")


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


def planned_decoding(config: ExperimentConfig, tokenizer) -> Decoding:
    """How the run decodes: its settings merged with the model's generation_config file (no weights), once. The plan
    stores it in meta; the sampler and the baseline read it from there."""
    return run_decoding(config, models.generation_config_of(config.model),
                        fallback_eos=models.stop_token_ids(tokenizer))


def prepare(config: ExperimentConfig, out_dir: Path, tokenizer=None) -> tuple[ResultsStore, list[PlanRow]]:
    """Write the plan, or check that an existing folder was made with the same result-changing settings."""
    tokenizer = tokenizer or models.load_tokenizer(config.tokenizer or config.model)
    plan, table = build_plan(config, tokenizer)
    store = ResultsStore(out_dir)
    if store.exists():
        existing = store.results
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
