"""Sweeps: the experiment repeated over a grid (or a list) of settings, with the model loaded once.

A condition is a set of ``ExperimentConfig`` overrides (``temperature=0.3``, ``layer_percent=25``,
``position_rule=window:3`` ...) applied over one base config; each condition is an ordinary run folder under the
sweep folder (so ``judge``, ``report`` and ``baseline`` work on it unchanged), and ``sweep.json`` (the manifest) lists
the conditions, their folders and the base settings. Re-running the same command continues: every run folder does
only its missing work, and a sweep folder made with other settings or other conditions is refused, naming them.

The settings that decide which weights are loaded (``LOAD_FIELDS``) cannot vary within a sweep: the one loaded model
serves every condition, with the read and injection layers of each (``oracle_for``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import re
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ao_resampling import pipeline
from ao_resampling.engine.loading import models
from ao_resampling.config import ExperimentConfig, diff_settings, relative_to_file
from ao_resampling.errors import AOResamplingError, describe_problems
from ao_resampling.redaction import redact
from ao_resampling.results import read_json_file
from ao_resampling.stages.plan import prepare
from ao_resampling.files import atomic_write_text
from ao_resampling.store import ResultsStore, folder_lock

MANIFEST_NAME = "sweep.json"
MANIFEST_VERSION = 1
MAX_NAME = 120  # bytes of a folder name made from settings; leaves room under the 255-byte limit of file systems
LOAD_FIELDS = ("model", "tokenizer", "oracle_lora", "dtype", "device", "device_map")
# `ao-resampling sweep` with no arguments: 2 x 2 on the demo preset (Gemma 3 270M on CPU), so both figures show.
DEMO_VARY = ["temperature=0.3,1.0", "position_rule=assistant_start,window:3"]


class SweepError(AOResamplingError, ValueError):
    """A sweep that cannot be planned or continued; the message names the condition, field or file."""


@dataclass(frozen=True)
class Condition:
    name: str  # also its run folder's name under the sweep folder
    overrides: dict[str, Any]
    config: ExperimentConfig


# ---------------------------------------------------------------------------------------------------------------------
# Which conditions (pure)


def parse_value(text: str) -> Any:
    """Like ``--set``: JSON when it parses (0.7, 25, true), else the bare string (window:3)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text.strip()


def check_field(name: str, *, where: str) -> None:
    if name not in ExperimentConfig.model_fields:
        raise SweepError(f"{where}: {name!r} is not a setting (ExperimentConfig field); expected one of "
                         + ", ".join(sorted(ExperimentConfig.model_fields)))
    if name in LOAD_FIELDS:
        raise SweepError(f"{where}: {name!r} decides which weights are loaded; a sweep loads one model, so it "
                         "cannot vary (run one sweep per model)")


def parse_vary(item: str) -> tuple[str, list[Any]]:
    """``"temperature=0.3,0.7"`` -> ``("temperature", [0.3, 0.7])``."""
    name, sep, values = item.partition("=")
    name = name.strip()
    if not sep or not name or not values.strip():
        raise SweepError(f"--vary {item!r}: expected field=v1,v2,...")
    check_field(name, where=f"--vary {item!r}")
    parsed = [parse_value(v) for v in values.split(",") if v.strip()]
    if not parsed:  # "temperature=," : no condition at all, which the grid would turn into an empty sweep
        raise SweepError(f"--vary {item!r}: no values; expected field=v1,v2,...")
    if len(set(map(json.dumps, parsed))) != len(parsed):
        raise SweepError(f"--vary {item!r}: a value is given twice")
    return name, parsed


def grid(varies: Sequence[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    """Every combination, the first field varying slowest (the order the conditions run and are listed in)."""
    names = [n for n, _ in varies]
    if len(set(names)) != len(names):
        raise SweepError(f"--vary names a field twice: {names}")
    return [dict(zip(names, combo)) for combo in itertools.product(*(values for _, values in varies))]


def load_conditions_toml(path: Path) -> list[dict[str, Any]]:
    """A TOML file of ``[[condition]]`` tables, each a set of setting overrides."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise SweepError(f"{path}: cannot read: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise SweepError(f"{path}: not valid TOML: {e}") from e
    conditions = data.get("condition")
    if not isinstance(conditions, list) or not conditions or not all(isinstance(c, dict) for c in conditions):
        raise SweepError(f"{path}: expected one or more [[condition]] tables of settings")
    beside = sorted(set(data) - {"condition"})
    if beside:  # base settings go in --config or --set; here they would be silently ignored
        raise SweepError(f"{path}: {beside[0]!r} is beside the [[condition]] tables; a conditions file holds only "
                         "[[condition]] tables (give settings shared by every condition with --config or --set)")
    for i, condition in enumerate(conditions):
        for name in condition:
            check_field(name, where=f"{path}: condition {i + 1}")
    return [relative_to_file(c, path) for c in conditions]


def condition_name(overrides: dict[str, Any]) -> str:
    """A folder name that says the settings: ``temperature=0.3__position_rule=window-3``."""
    if not overrides:
        return "base"
    parts = [f"{k}={redact(str(v))}" for k, v in overrides.items()]  # a judge_base_url's credentials stay out
    redacted = {k: redact(str(v)) for k, v in overrides.items()}
    return fitting_name(re.sub(r"[^A-Za-z0-9._=-]+", "-", "__".join(parts)), key=json.dumps(redacted))


def fitting_name(name: str, *, key: str) -> str:
    """``name`` (ASCII), or its start and a hash of ``key`` when it is longer than ``MAX_NAME``: file systems refuse a
    name over 255 bytes, and a condition of many settings would otherwise fail when its folder is made."""
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"{name[:MAX_NAME - len(digest) - 2]}--{digest}"


def plan_conditions(base: ExperimentConfig, overrides: Sequence[dict[str, Any]]) -> list[Condition]:
    """Each condition's full config, validated up front: no condition fails after the others have run."""
    out, names, resolved = [], set(), {}
    for i, o in enumerate(overrides):
        name = condition_name(o)
        if name in names:
            raise SweepError(f"condition {i + 1} ({name}) is given twice")
        names.add(name)
        try:
            config = ExperimentConfig(**{**base.model_dump(), **o})
        except ValidationError as e:
            raise SweepError(f"condition {name}: {describe_problems(e, root='<config>')}") from e
        # Compared as the config resolved them: temperature 1 and 1.0, window:2 and window:02 are one condition.
        same = json.dumps(config.model_dump(mode="json"), sort_keys=True)
        if same in resolved:
            read = ", ".join(f"{k}={redact(str(getattr(config, k)))}" for k in o) or "the base settings"
            raise SweepError(f"conditions {resolved[same]} and {name} are the same settings once read ({read}); "
                             "give each condition once")
        resolved[same] = name
        out.append(Condition(name, dict(o), config))
    return out


def varied_fields(conditions: Sequence[Condition]) -> list[str]:
    """The fields whose value differs between conditions, in the order they are first named."""
    names = list(dict.fromkeys(k for c in conditions for k in c.overrides))
    return [n for n in names if len({json.dumps(c.config.model_dump(mode="json")[n]) for c in conditions}) > 1]


def manifest(base: ExperimentConfig, conditions: Sequence[Condition]) -> dict[str, Any]:
    return {
        "manifest_version": MANIFEST_VERSION,
        "settings": base.settings_that_change_results(),
        "varied": varied_fields(conditions),
        "conditions": [{"name": c.name, "overrides": redact(c.overrides), "folder": c.name} for c in conditions],
    }


def manifest_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Why a sweep folder cannot be continued with a new plan: other base settings or other conditions."""
    lines = diff_settings(old.get("settings", {}), new["settings"])
    old_c = [(c["name"], c["overrides"]) for c in old.get("conditions", [])]
    new_c = [(c["name"], c["overrides"]) for c in new["conditions"]]
    if old_c != new_c:
        lines.append(f"conditions: {[n for n, _ in old_c]} -> {[n for n, _ in new_c]}")
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# Running it


def default_out_dir(base: ExperimentConfig, conditions: Sequence[Condition], preset: str) -> Path:
    if preset == "demo":
        return Path("artifacts") / "demo-sweep"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", base.model.split("/")[-1])
    varied = "-".join(varied_fields(conditions)) or "conditions"
    return Path("artifacts") / "sweeps" / fitting_name(f"{slug}__{varied}", key=f"{base.model}\n{varied}")


def check_sweep_folder(out_dir: Path, base: ExperimentConfig, conditions: Sequence[Condition]) -> dict[str, Any]:
    """This sweep's manifest; if the folder has one already, it must be the same sweep (refusing mixed settings)."""
    path = Path(out_dir) / MANIFEST_NAME
    new = json.loads(json.dumps(manifest(base, conditions)))  # as it reads back from disk
    if path.exists():
        old = read_json_file(path)
        differences = manifest_differences(old if isinstance(old, dict) else {}, new)
        if differences:
            raise SweepError(f"{path} was made for another sweep; refusing to mix them. Differences:\n  "
                             + "\n  ".join(differences) + "\nUse another --out folder, or the original settings.")
    return new


def oracle_for(oracle: models.LoadedOracle, config: ExperimentConfig) -> models.LoadedOracle:
    """The one loaded model with this condition's read and injection layers (the weights are shared, not copied)."""
    if not 0 <= config.injection_layer < oracle.num_layers:
        raise SweepError(f"injection_layer {config.injection_layer} is outside the model's {oracle.num_layers} layers")
    return dataclasses.replace(oracle, read_layer=models.layer_at_percent(oracle.num_layers, config.layer_percent),
                               injection_layer=config.injection_layer)


@dataclass
class SweepOutcome:
    out_dir: Path
    reports: dict[str, pipeline.RunReport]
    model_loads: int
    load_s: float = 0.0
    report_dir: Path | None = None
    n_failed_calls: int = 0  # judge calls whose latest record is a failure, over every condition


def prepare_all(conditions: Sequence[Condition], out_dir: Path) -> dict[str, ResultsStore]:
    """Every condition's plan written (or checked against its folder) before any runs: a window too long for a
    target, or a run folder made with other settings, stops the sweep before minutes of work, naming the condition."""
    tokenizer = models.load_tokenizer(conditions[0].config.tokenizer or conditions[0].config.model)
    stores = {}
    for c in conditions:
        try:
            stores[c.name], _ = prepare(c.config, Path(out_dir) / c.name, tokenizer=tokenizer)
        except AOResamplingError as e:  # data, encoding, position rule, or a run folder of other settings
            raise SweepError(f"condition {c.name}: {e}") from e
    return stores


def run_sweep(base: ExperimentConfig, conditions: Sequence[Condition], out_dir: Path, *, judge: bool,
              progress: bool = True, judge_client=None, log: Callable[[str], None] = print,
              load: Callable[[ExperimentConfig], models.LoadedOracle] = pipeline.load_oracle) -> SweepOutcome:
    """Every condition's run in order, the model loaded at most once (and only if some answer is missing)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SweepError("a sweep runs in one process; use `ao-resampling run --gpus N` per condition instead")
    pipeline.preflight(base, judge=judge)  # data, weights, CUDA, judge: once, before any condition runs
    new_manifest = check_sweep_folder(out_dir, base, conditions)
    with contextlib.ExitStack() as locks:  # each condition's folder is held like `run` holds its --out
        for c in conditions:
            locks.enter_context(folder_lock(Path(out_dir) / c.name))
        return _run_locked(base, conditions, Path(out_dir), new_manifest, judge=judge, progress=progress,
                           judge_client=judge_client, log=log, load=load)


def _run_locked(base: ExperimentConfig, conditions: Sequence[Condition], out_dir: Path, new_manifest: dict[str, Any],
                *, judge: bool, progress: bool, judge_client, log: Callable[[str], None],
                load: Callable[[ExperimentConfig], models.LoadedOracle]) -> SweepOutcome:
    stores = prepare_all(conditions, Path(out_dir))
    # Written once every plan is: a sweep refused half-way leaves no manifest that would refuse its corrected rerun.
    atomic_write_text(Path(out_dir) / MANIFEST_NAME, json.dumps(new_manifest, indent=1) + "\n")
    outcome = SweepOutcome(Path(out_dir), {}, 0)
    oracle = None
    for i, c in enumerate(conditions, start=1):
        folder = Path(out_dir) / c.name
        log(f"[sweep {i}/{len(conditions)}] {c.name}")
        if oracle is None and pipeline.needs_model(stores[c.name].results, c.config):
            t = time.perf_counter()
            oracle = load(base)
            outcome.model_loads += 1
            outcome.load_s = time.perf_counter() - t
        report = outcome.reports[c.name] = pipeline.run_experiment(
            c.config, folder, judge=judge, progress=progress, judge_client=judge_client, log=log,
            oracle=oracle_for(oracle, c.config) if oracle is not None else None, planned=stores[c.name])
        timings = ", ".join(f"{k} {v:.1f}s" for k, v in report.stage_seconds.items())
        log(f"[sweep {i}/{len(conditions)}] done: {timings}")
    from ao_resampling.analysis.sweep_report import write_sweep_report

    results = {c.name: stores[c.name].results for c in conditions}  # each kept current by its run
    outcome.report_dir = write_sweep_report(Path(out_dir), new_manifest, results, seed=base.bootstrap_seed,
                                            n_boot=base.bootstrap_resamples)
    if judge:
        from ao_resampling.stages.judge import failed_calls

        outcome.n_failed_calls = sum(failed_calls(r) for r in results.values())
    return outcome


def sweep_folder_note(folder: Path) -> str | None:
    """What to say when a command for one run folder is given a sweep folder (None when ``folder`` is not one)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        names = [str(c["folder"]) for c in read_json_file(path)["conditions"]]
    except (AOResamplingError, KeyError, TypeError):
        names = []
    shown = ", ".join(str(Path(folder) / n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    return (f"{folder} is a sweep folder ({MANIFEST_NAME}), not a run folder: give one condition's folder"
            + (f" ({shown})" if shown else "") + f"; the sweep's own report is {Path(folder) / 'report'} (re-run the "
            "sweep command to write it again)")
