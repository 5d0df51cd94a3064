"""``ao-resampling``: typer commands over pipeline.py.

``ao-resampling run`` with no arguments runs the built-in demo on CPU (real Gemma 3 270M, a random LoRA standing in
for an oracle); ``--preset experiment`` is the real thing (Gemma 3 27B-it + the AO LoRA + gpt-5-mini).
Settings come from the preset, then ``--config FILE.toml``, then flags (and ``--set key=value`` for any other field).
Each setting's flag is declared once (``SETTINGS``, by config field); a command names the settings it takes.

Every command runs inside ``guarded``: the tool's own errors (``AOResamplingError``) end in one red line and an exit
code from errors.py, Ctrl-C in exit 130 with what was kept; only a bug shows a traceback. Commands that write a run
folder hold its lock (store.py) while they work.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from ao_resampling.config import ExperimentConfig, build_config, config_of_folder
from ao_resampling.errors import EXIT_CALLS_FAILED, EXIT_INTERRUPTED, AOResamplingError
from ao_resampling.position_rules import RULE_FORMS
from ao_resampling.store import folder_lock
from ao_resampling.redaction import is_redacted_url, redact
from ao_resampling.results import RESULTS_NAME
from ao_resampling.teardown import end_without_final_collection, fewer_full_collections

if TYPE_CHECKING:  # pipeline imports torch: only the commands that run it load it
    from ao_resampling.pipeline import RunReport

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  help="How much does an Activation Oracle's answer change when you just sample it again?")


def _setting(kind: Any, flag: str, help: str | None = None, **checks: Any) -> Any:
    """The type of an optional flag: None when not given, so the preset's, the TOML file's or a --set value stands.

    ``flag``: spelled out as the user types it (so it can be searched for); ``checks``: typer's, e.g. ``min=1``.
    """
    return Annotated[Optional[kind], typer.Option(flag, help=help, **checks)]


def _panel(title: str, **settings: Any) -> dict[str, Any]:
    """``settings`` (field -> flag), listed under ``title`` in --help: forty flags in one list are hard to read."""
    for annotation in settings.values():
        typing.get_args(annotation)[1].rich_help_panel = title  # the typer.Option in Annotated[kind, option]
    return settings


# Every setting a command takes as a flag, declared once: the ExperimentConfig field it fills -> its flag. A command
# names the fields it takes (``_takes``) and gets their values as one dict keyed by field, which build_config (or a
# run folder's config, ``_open``) takes as overrides: the same flag means the same field on every command.
SETTINGS: dict[str, Any] = {
    **_panel(
        "Model",
        model=_setting(str, "--model",
                       "HF id, local dir, gemma3-270m-gguf, synthetic:NAME (tiny[-multimodal], gemma-3-27b[-text])"),
        tokenizer=_setting(str, "--tokenizer", "defaults to the model's"),
        oracle_lora=_setting(str, "--oracle-lora", "PEFT LoRA id/dir, or 'random'"),
        dtype=_setting(str, "--dtype", "bfloat16, float16, float32"),
        device=_setting(str, "--device", "cuda, cuda:1, cpu"),
        device_map=_setting(str, "--device-map", "'auto' spreads one model over visible GPUs"),
        batch_rows=_setting(str, "--batch-rows", "rows the decode step holds: a number, or 'auto' (as many as fit "
                                                 "the card)"),
    ),
    **_panel(
        "Data",
        targets=_setting(Path, "--targets", "targets JSON (default: built-in examples)"),
        questions=_setting(Path, "--questions", "question pool: .json list, .txt lines, or .py list"),
        questions_variable=_setting(str, "--questions-variable", "list name inside a .py pool"),
        num_targets=_setting(int, "--num-targets", "take the first N targets"),
        num_questions=_setting(int, "--num-questions", "questions sampled from the pool"),
    ),
    **_panel(
        "Read position and decoding",
        layer_percent=_setting(int, "--layer-percent", "read layer int(num_layers * P / 100)"),
        position_rule=_setting(str, "--position-rule", f"which target tokens are read: {RULE_FORMS}"),
        samples_per_query=_setting(int, "--samples", "AO answers per (target, question)"),
        max_new_tokens=_setting(int, "--max-new-tokens", "max new tokens per AO answer"),
        temperature=_setting(float, "--temperature"),
        top_p=_setting(float, "--top-p"),
        top_k=_setting(int, "--top-k", "top-k (default: the model's generation_config; 0 = off)"),
    ),
    **_panel(
        "Judge",
        judge_model=_setting(str, "--judge-model", "judge model (default gpt-5-mini)"),
        judge_api=_setting(str, "--judge-api", "'responses' (OpenAI) or 'chat' (local servers)"),
        judge_base_url=_setting(str, "--judge-base-url", "OpenAI-compatible base URL (else OPENAI_BASE_URL)"),
        judge_concurrency=_setting(int, "--judge-concurrency", "judge calls in flight"),
        judge_timeout_s=_setting(float, "--judge-timeout-s", "seconds one judge call may take"),
        judge_max_retries=_setting(int, "--judge-max-retries", "SDK retries per judge call (429/5xx/timeouts)"),
        clusters=_setting(bool, "--clusters/--no-clusters", "the cluster judge call per run (meanings, semantic "
                                                            "entropy, pairwise agreement); on unless switched off"),
        judge_repeats=_setting(int, "--judge-repeats", "extra judge calls per run, answers shuffled"),
        judge_repeat_fraction=_setting(float, "--repeat-fraction", "fraction of runs that get repeats"),
    ),
    **_panel(
        "Analysis and baseline",
        embedding_model=_setting(str, "--embedding-model", "sentence-transformers id/dir, or 'none'"),
        baseline=_setting(bool, "--baseline/--no-baseline", "also sample the target model"),
        baseline_max_new_tokens=_setting(int, "--baseline-max-new-tokens",
                                         "max new tokens per target-model reply (baseline)"),
    ),
}
EXPERIMENT = tuple(SETTINGS)  # run, sweep and prepare: everything the experiment is made of (prepare plans it all)
JUDGE = ("judge_model", "judge_api", "judge_base_url", "judge_concurrency", "judge_timeout_s", "judge_max_retries",
         "clusters")
Settings = Optional[dict[str, Any]]  # never None in a command: _takes fills it

# The flags of the command itself, not of the experiment's settings.
Preset = Annotated[str, typer.Option(help="'demo' (CPU, Gemma 3 270M, random LoRA) or 'experiment' (the real run)")]
ConfigFile = _setting(Path, "--config", "TOML file of ExperimentConfig fields")
Out = _setting(Path, "--out", "run folder (default: artifacts/<name>; re-use it to resume)")
NoJudge = Annotated[bool, typer.Option("--no-judge", help="generation + judge-free analysis only")]
Set = _setting(list[str], "--set", "any config field: --set decode_seed=3")
Quiet = Annotated[bool, typer.Option("--quiet", help="no progress bars")]
Gpus = _setting(int, "--gpus", "spread generation over N GPUs, one rank each (relaunches itself under torchrun; "
                              "with --device cpu, N CPU processes)", min=1)


def _takes(*fields: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Gives a command the flags of ``fields`` (SETTINGS) where its ``settings`` parameter stands; it gets their
    values as one dict keyed by field (None: not given).

    typer reads a command's flags from its signature, so the wrapper shows one parameter per field in its place.
    """

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command, eval_str=True)
        params = list(signature.parameters.values())
        at = [p.name for p in params].index("settings")
        flags = [inspect.Parameter(name, params[at].kind, default=None, annotation=SETTINGS[name]) for name in fields]

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            command(*args, settings={name: kwargs.pop(name) for name in fields}, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=[*params[:at], *flags, *params[at + 1:]])
        wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
        return wrapper

    return decorate


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


def guarded(command: Callable[..., None]) -> Callable[..., None]:
    """The one place the tool's errors are caught: a message and an exit code (errors.py) instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except AOResamplingError as e:
            typer.secho(f"error: {redact(str(e))}", fg="red", err=True)  # a message may quote a URL as it was typed
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.secho("\ninterrupted (Ctrl-C): everything finished before it is kept in the run folder; "
                        "re-run the same command to continue where it stopped.", fg="yellow", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def _exit_if_calls_failed(folder: Path, n_failed: int, command: str, where: str | None = None) -> None:
    """``where``: the file(s) the failures are recorded in (default: the folder's results.json)."""
    if n_failed:
        typer.secho(f"{n_failed} judge call(s) failed; each is recorded with its reason in "
                    f"{where or folder / RESULTS_NAME}. Re-run {command} to retry them (exit code "
                    f"{EXIT_CALLS_FAILED}).", fg="yellow", err=True)
        raise typer.Exit(EXIT_CALLS_FAILED)


def _parse_sets(items: list[str] | None) -> dict[str, Any]:
    out = {}
    for item in items or []:
        if "=" not in item:
            _fail(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _config(preset: str, config_file: Path | None, sets: list[str] | None,
            settings: dict[str, Any]) -> ExperimentConfig:
    """preset < TOML < --set < flags; a ConfigError is the user's (``guarded`` prints it, exit 2)."""
    given = {k: v for k, v in settings.items() if v is not None}  # an unset flag must not hide a --set of its field
    return build_config(preset=preset, config_file=config_file, overrides={**_parse_sets(sets), **given})


def _judges(config: ExperimentConfig, preset: str, no_judge: bool) -> bool:
    """Whether ``run`` or ``sweep`` judges: not with --no-judge or ``judge = false``, and the demo only when the user
    has given it a way to (elsewhere the pre-flight check names what is missing)."""
    from ao_resampling.stages.common.judge_calls import JudgeConfigError, check_judge_access

    if no_judge or not config.judge:
        return False
    try:
        check_judge_access(config)
    except JudgeConfigError:
        if preset != "demo":
            return True
        typer.echo("demo: no OPENAI_API_KEY or judge base URL set, so the LLM judge is skipped "
                   "(judge-free metrics only).")
        return False
    return True


@app.command()
@guarded
@_takes(*EXPERIMENT)
def run(
    preset: Preset = "demo", config_file: ConfigFile = None, out: Out = None, settings: Settings = None,
    no_judge: NoJudge = False, set_: Set = None, quiet: Quiet = False, gpus: Gpus = None,
) -> None:
    """The whole experiment: prepare -> generate -> judge -> analyse (resumable: re-run on the same --out)."""
    from ao_resampling import pipeline

    config = _config(preset, config_file, set_, settings)
    if gpus and gpus > 1 and "WORLD_SIZE" not in os.environ:  # not yet under torchrun: become it
        from ao_resampling import ranks

        try:
            ranks.check_launch(config, gpus)
        except pipeline.PipelineError as e:
            _fail(str(e))
        ranks.relaunch(gpus, sys.argv[1:])
    judge = _judges(config, preset, no_judge)
    out_dir = out or pipeline.default_out_dir(config, preset)
    from ao_resampling.ranks import world

    # Under torchrun rank 0 holds the folder for the whole group (store.py); the launcher above exec'd torchrun.
    with folder_lock(out_dir) if world().is_main else contextlib.nullcontext():
        report = pipeline.run_experiment(config, out_dir, judge=judge, progress=not quiet, log=typer.echo)
    _tell_how_the_run_went(report, out_dir, judge=judge)


def _tell_how_the_run_went(report: RunReport, out_dir: Path, *, judge: bool) -> None:
    """``run``'s last lines: counts, timings, where things are, stand-in notes; exit 3 when judge calls failed."""
    if report.report_dir is None:  # a rank other than 0 under torchrun: its share is journaled, rank 0 does the rest
        typer.echo(f"rank {os.environ.get('RANK')}: sampled {report.n_runs} runs; rank 0 merges, judges and reports")
        return
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in report.stage_seconds.items())
    typer.echo(f"\n{report.n_runs} runs, {report.n_samples} AO answers ({timings})")
    typer.echo(f"results: {out_dir / 'results.json'}")
    typer.echo(f"report:  {report.report_dir / 'report.md'}  (plots and summary.json beside it)")
    for note in report.notes:
        typer.secho(note, fg="yellow")
    if judge:
        _exit_if_calls_failed(out_dir, report.n_failed_calls, "the same command")


@app.command()
@guarded
@_takes(*EXPERIMENT)  # not --gpus: a sweep runs in one process (sweep.run_sweep)
def sweep(
    vary: Annotated[Optional[list[str]], typer.Option(
        "--vary", help="field=v1,v2,... (repeatable; the grid of all combinations), e.g. temperature=0.3,0.7",
    )] = None,
    conditions: Annotated[Optional[Path], typer.Option(
        help="TOML file: one 'condition' table per condition (an array of tables), instead of --vary")] = None,
    preset: Preset = "demo", config_file: ConfigFile = None, out: Out = None, settings: Settings = None,
    no_judge: NoJudge = False, set_: Set = None, quiet: Quiet = False,
) -> None:
    """The experiment over a grid of settings (temperature, top_p, layer_percent, position_rule, ...), the model
    loaded once; each condition is an ordinary run folder. With no --vary/--conditions: a tiny demo sweep on CPU."""
    from ao_resampling import sweep as sweeps

    base = _config(preset, config_file, set_, settings)
    if conditions is not None and vary:
        raise sweeps.SweepError("give --vary or --conditions, not both")
    overrides = (sweeps.load_conditions_toml(conditions) if conditions is not None
                 else sweeps.grid([sweeps.parse_vary(v) for v in vary or sweeps.DEMO_VARY]))
    planned = sweeps.plan_conditions(base, overrides)
    out_dir = out or sweeps.default_out_dir(base, planned, preset)
    with folder_lock(out_dir):  # the sweep folder, and (in run_sweep) each condition's run folder
        outcome = sweeps.run_sweep(base, planned, out_dir, judge=_judges(base, preset, no_judge),
                                   progress=not quiet, log=typer.echo)
    typer.echo(f"\n{len(planned)} conditions in {out_dir} (model loaded {outcome.model_loads} time(s))")
    typer.echo(f"sweep report: {outcome.report_dir / 'sweep_report.md'}")
    _exit_if_calls_failed(out_dir, outcome.n_failed_calls, "the same sweep command",
                          where=f"its condition's {RESULTS_NAME} under {out_dir}")


@app.command()
@guarded
@_takes(*EXPERIMENT)
def prepare(
    preset: Preset = "demo", config_file: ConfigFile = None, out: Out = None, settings: Settings = None,
    set_: Set = None,
) -> None:
    """Encode every target and write the plan; prints which token each activation is read from. No model weights.
    Takes run's settings: the plan records them, so `run` with the same flags continues it."""
    from ao_resampling import pipeline
    from ao_resampling.stages.plan import prepare

    config = _config(preset, config_file, set_, settings)
    out_dir = out or pipeline.default_out_dir(config, preset)
    writes = not (Path(out_dir) / RESULTS_NAME).exists()  # an existing plan is only checked against, never written
    with folder_lock(out_dir) if writes else contextlib.nullcontext():
        store, table = prepare(config, out_dir)
    results = store.results
    typer.echo(f"{'target':<12} {'#tokens':>7} {'assistant_start_idx':>19} {'read at':>9}  token(s) read "
               f"({config.position_rule})")
    for row in table:
        read_at = ",".join(map(str, row.read_positions))
        typer.echo(f"{row.target_id:<12} {row.n_tokens:>7} {row.assistant_start_idx:>19} {read_at:>9}  "
                   + " ".join(map(repr, row.tokens_read)))
    typer.echo(f"\nlayer {results.meta.layer} of {results.meta.num_layers}; questions: "
               + ", ".join(q.id for q in results.ao_questions))
    typer.echo(f"{len(results.runs)} runs planned in {store.results_path}")


@app.command()
@guarded
@_takes(*JUDGE, "judge_repeats", "judge_repeat_fraction")
def judge(
    results: Annotated[Path, typer.Argument(help="run folder or its results.json")], settings: Settings = None,
    quiet: Quiet = False,
) -> None:
    """Judge every run that has answers and no verdict; re-try recorded failures. Journaled, resumable.
    Exit 3 when calls failed (recorded; re-run to retry them)."""
    from ao_resampling.stages.common.judge_calls import check_judge_access
    from ao_resampling.stages.judge import failed_calls, judge_stage

    store, config = _open(results, settings)
    check_judge_access(config)
    with folder_lock(store.folder):
        outcome = judge_stage(store, config, progress=not quiet)
        n_failed = failed_calls(store.results)
    typer.echo(outcome.summary())
    _exit_if_calls_failed(store.folder, n_failed, f"`ao-resampling judge {store.folder}`")


@app.command()
@guarded
@_takes("embedding_model")
def report(
    results: Annotated[Path, typer.Argument(help="run folder or its results.json (older format accepted)")],
    out: Annotated[Optional[Path], typer.Option(help="where plots, summary.json and report.md go")] = None,
    settings: Settings = None,
    baseline_file: Annotated[Optional[Path], typer.Option("--baseline",
                                                          help="a separately saved baseline file")] = None,
    quiet: Quiet = False,
) -> None:
    """Plots A/B/C + heatmap, summary.json and report.md; works on partly judged files."""
    from ao_resampling import pipeline

    store, config = _open(results, settings)
    out_dir = out or store.folder / "report"
    # Writes under out_dir alone (its lock too, made before the spreads: a bad --out fails in a second); the run
    # folder is only read, so a read-only or archived one can be reported, and another command may hold it.
    with folder_lock(out_dir):
        pipeline.report_of(store.results, config, out_dir=out_dir, baseline_file=baseline_file, progress=not quiet)
    typer.echo(f"report: {out_dir / 'report.md'}")


@app.command(name="baseline")
@guarded
@_takes("baseline_max_new_tokens", "device", "device_map", "batch_rows", *JUDGE, "embedding_model")
def baseline_command(
    results: Annotated[Path, typer.Argument(help="run folder or its results.json")], settings: Settings = None,
    no_judge: NoJudge = False, quiet: Quiet = False,
) -> None:
    """Sample the target model itself n times per target (adapter off), judge its replies, and redo the report.
    Journaled, resumable: targets already sampled or judged are skipped. Exit 3 when judge calls failed."""
    from ao_resampling import pipeline
    from ao_resampling.analysis.comparison import baseline_summary
    from ao_resampling.stages.baseline import baseline_stage
    from ao_resampling.stages.common.judge_calls import JudgeConfigError, check_judge_access
    from ao_resampling.stages.judge import failed_calls

    store, config = _open(results, settings)
    if not no_judge:
        try:
            check_judge_access(config)
        except JudgeConfigError as e:
            _fail(f"{e}; or pass --no-judge for the replies alone")
    with folder_lock(store.folder):
        outcome = baseline_stage(store, config, judge=not no_judge, progress=not quiet)
        report_dir = pipeline.analyse(store, config, progress=not quiet)
        loaded = store.results
    typer.echo(f"baseline: {outcome.n_sampled} targets sampled ({outcome.n_already_sampled} already were), "
               f"{outcome.n_judge_ok} of {outcome.n_judge_sent} judge calls scored"
               + (f", failures {outcome.n_judge_failed}" if outcome.n_judge_failed else "")
               + (f"; {outcome.clusters.line('clusters', 'partitioned')}" if outcome.clusters.sent else ""))
    b = baseline_summary(loaded)
    if b and b["n_targets"]:
        r = "n/a" if b["pearson_r"] is None else f"{b['pearson_r']:.3f}"
        rho = "n/a" if b["spearman_r"] is None else f"{b['spearman_r']:.3f}"
        typer.echo(f"AO vs target model over {b['n_targets']} targets: Pearson r = {r}, Spearman rho = {rho}")
    typer.echo(f"report: {report_dir / 'report.md'}")
    if not no_judge:
        _exit_if_calls_failed(store.folder, failed_calls(loaded), f"`ao-resampling baseline {store.folder}`")


def _open(results: Path, overrides: dict[str, Any]):
    """A run folder's store and its config (from meta), with the command's settings over it (judge endpoint etc.)."""
    from ao_resampling.store import ResultsStore

    folder = results.parent if results.suffix == ".json" else results
    store = ResultsStore(folder)
    if results.suffix == ".json" and results.name != "results.json":
        store.results_path = results
    if not store.results_path.exists():
        from ao_resampling.sweep import sweep_folder_note

        _fail(sweep_folder_note(folder) or f"{store.results_path} does not exist")
    meta = store.results.meta  # the folder read once: the stages get this store, results and all
    # A file without meta.config (an older one) still names its model: never the hub default in its place.
    named = {k: v for k, v in (("model", meta.model), ("oracle_lora", meta.oracle_lora)) if v is not None}
    base = {**named, **(meta.config or {})}
    if is_redacted_url(base.get("judge_base_url")) and overrides.get("judge_base_url") is None:
        # Its credentials were not written down; the user gives the URL again (or OPENAI_BASE_URL).
        base.pop("judge_base_url")
        typer.echo("note: meta.config's judge_base_url had credentials, which were not stored; using "
                   "--judge-base-url or OPENAI_BASE_URL instead", err=True)
    config, notes = config_of_folder(base, overrides, source=str(store.results_path))
    for note in notes:
        typer.echo(note, err=True)
    return store, config


def main() -> None:  # python -m ao_resampling, and the ao-resampling script
    fewer_full_collections()  # teardown.py
    try:
        app()
    finally:
        end_without_final_collection()  # the command is done, its files written and closed (teardown.py)
