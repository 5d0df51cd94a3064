"""A run folder on disk: the journal of typed events, ``ResultsStore``, and the folder's lock.

Crash safety: a stage never rewrites ``results.json`` per query. It appends one JSON line per finished unit of work
(answers, a verdict, a spread) to a journal beside it and fsyncs; ``ResultsStore.load`` replays the journal over the
last written file, and ``compact`` folds it in with an atomic write. A kill loses at most the work in flight; a torn
last line (killed mid-write) is reported and skipped, never fatal. Events are idempotent (last one wins), so replaying
a journal that was already folded in changes nothing. A command reads its folder once (``ResultsStore.results``);
its stages ``record`` events, which journals them and folds them into that one copy alike.

The journal is a file format of its own, typed and versioned like ``results.json``: its events (models, constructors,
parsing, the migration of unversioned lines) are in ``events.py``; replay here names a bad line by file and line.

One writer per run folder: ``folder_lock`` holds an exclusive ``flock`` on ``<folder>/.lock`` while a command works,
so a second ``run``/``judge``/``baseline``/``report`` stops at once naming the holder (pid, command with its URLs'
credentials redacted, start time, which the holder writes into the file, readable by its owner alone) instead of
redoing the same GPU or judge work. The kernel releases the lock when the holder exits however it exits (kill -9
included). Under torchrun only rank 0 takes it (cli.py); the other ranks write only their own rank journals and meet
rank 0 at every step, so while rank 0 holds the folder, the whole group does.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ao_resampling.errors import EXIT_BUSY, AOResamplingError
from ao_resampling.files import DiskError, atomic_write_text, writing
from ao_resampling.redaction import redact
from ao_resampling.events import (
    BaselineClustersEvent, BaselineJudgeEvent, BaselineResponsesEvent, BaselineSpreadEvent, ClustersEvent,
    ClustersRepeatEvent, JournalEvent, JudgeEvent, JudgeRepeatEvent, ResponsesEvent, event_line, parse_event,
)
from ao_resampling.results import (
    RESULTS_NAME, Baseline, BaselineRun, ClusterRecord, JudgeRecord, Results, ResultsError, Run, dump_results,
    load_results_file,
)

JOURNAL_GLOB = "journal*.jsonl"
# The only journals the tool reads and deletes: its own (``journal.jsonl``, ``journal.rank{r}.jsonl`` per torchrun
# rank). A user's ``journal.backup.jsonl`` beside them is neither replayed nor removed.
TOOL_JOURNAL_RE = re.compile(r"journal(\.rank(0|[1-9][0-9]*))?\.jsonl")
LOCK_NAME = ".lock"
Record = TypeVar("Record", JudgeRecord, ClusterRecord)  # a judge call's record, of either kind


# ---------------------------------------------------------------------------------------------------------------------
# The journal file


class Journal:
    """Append-only JSON lines, one per finished unit of work; fsync'd so a kill loses only the unit in flight."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, event: JournalEvent | Mapping[str, Any]) -> None:
        self.append_many([event])

    def append_many(self, events: Sequence[JournalEvent | Mapping[str, Any]]) -> None:
        if not events:
            return
        payload = "".join(event_line(e) for e in events)
        with writing(self.path):  # a write cut short by a full disk is a torn tail, cut off by the next append
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._drop_torn_tail()
            with open(self.path, "a") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())

    def _drop_torn_tail(self) -> None:
        # A kill mid-write leaves a last line without its newline. Appending after it would glue the next event onto
        # the fragment and turn a tolerated torn *last* line into a fatal bad *middle* line, so cut it off first.
        # Only the file's end is read: an append must not cost a read of the whole journal (1,000 appends a stage).
        try:
            with open(self.path, "rb+") as f:
                size = f.seek(0, os.SEEK_END)
                if size == 0:
                    return
                f.seek(size - 1)
                if f.read(1) == b"\n":
                    return
                start = self._last_line_start(f, size)
                f.seek(start)
                try:  # killed between a complete event and its newline: keep the event
                    json.loads(f.read())
                    f.write(b"\n")
                except ValueError:
                    f.truncate(start)
                f.flush()
                os.fsync(f.fileno())
        except FileNotFoundError:
            return

    @staticmethod
    def _last_line_start(f, size: int, chunk: int = 1 << 16) -> int:
        """The offset just after the last newline (0 if none), read backwards a chunk at a time."""
        end = size
        while end > 0:
            begin = max(0, end - chunk)
            f.seek(begin)
            newline = f.read(end - begin).rfind(b"\n")
            if newline >= 0:
                return begin + newline + 1
            end = begin
        return 0

    def read(self) -> Iterator[dict[str, Any]]:
        """Events as JSON, in order; see ``lines``."""
        return (raw for _, raw in self.lines())

    def lines(self) -> Iterator[tuple[int, Any]]:
        """(line number, JSON) of each non-empty line. A torn *last* line is reported with a warning and skipped; a bad
        middle line raises."""
        if not self.path.exists():
            return
        lines = self.path.read_text().split("\n")
        # A complete file ends with "\n", so the final element is "" unless the last write was torn.
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                if n == len(lines):
                    warnings.warn(
                        f"{self.path}: last line {n} is incomplete (killed mid-write?); its unit of work will be redone",
                        stacklevel=3,
                    )
                    return
                raise ResultsError(f"{self.path}: line {n} is not valid JSON: {e.msg}") from e

    def events(self) -> Iterator[JournalEvent]:
        """The typed events in order; a line that is not a valid event raises a ResultsError naming file and line."""
        for k, (n, raw) in enumerate(self.lines(), start=1):
            try:
                yield parse_event(raw)
            except ResultsError as e:
                raise ResultsError(f"{self.path}: event {k} (line {n}): {e}") from e


# ---------------------------------------------------------------------------------------------------------------------
# Replay


def apply_event(results: Results, event: JournalEvent, runs: dict[str, Run]) -> None:
    """Fold one journal event into ``results`` (in place). Unknown run ids are an error: the journal is not ours."""
    if isinstance(event, (BaselineResponsesEvent, BaselineJudgeEvent, BaselineClustersEvent, BaselineSpreadEvent)):
        _apply_baseline_event(results, event)
        return
    run = runs.get(event.run_id)
    if run is None:
        raise ResultsError(f"journal event {event.type!r} names run_id {event.run_id!r}, which is not in the plan")
    if isinstance(event, ResponsesEvent):
        check_planned_answers(results, event)
        run.responses = list(event.responses)
    elif isinstance(event, JudgeEvent):
        run.judge = supersede(run.judge, event.record)
    elif isinstance(event, JudgeRepeatEvent):
        run.judge_repeats = _with_repeat(run.judge_repeats, event.record)
    elif isinstance(event, ClustersEvent):
        run.clusters = supersede(run.clusters, event.record)
    elif isinstance(event, ClustersRepeatEvent):
        run.cluster_repeats = _with_repeat(run.cluster_repeats, event.record)
    else:
        run.spread = event.spread


def check_planned_answers(results: Results, event: ResponsesEvent) -> None:
    """Answers made with other decoding, or another number of them, belong to another plan (a journal copied from
    another folder, or left by another version): folded in, they would be read as this plan's. Compared with what
    the plan records (``meta.decoding``, ``meta.config.samples_per_query``); a value one side leaves open is not
    compared."""
    n = (results.meta.config or {}).get("samples_per_query")
    if type(n) is int and len(event.responses) != n:
        raise ResultsError(f"field 'responses' of run_id {event.run_id!r}: {len(event.responses)} answers, but the "
                           f"plan (meta.config.samples_per_query) has {n}; they were made for another plan")
    planned = results.meta.decoding.model_dump() if results.meta.decoding is not None else {}
    for i, response in enumerate(event.responses):
        made = response.decoding.model_dump()
        for key in sorted(set(planned) & set(made)):
            if None not in (planned[key], made[key]) and planned[key] != made[key]:
                raise ResultsError(f"field 'responses.{i}.decoding.{key}' of run_id {event.run_id!r}: "
                                   f"{made[key]!r}, but the plan (meta.decoding) has {planned[key]!r}; these answers "
                                   "were made with other decoding")


def _with_repeat(repeats: list[Record], record: Record) -> list[Record]:
    """``repeats`` with ``record`` superseding the earlier record of the same call (moved to the end)."""
    old = next((r for r in repeats if r.judge_call_id == record.judge_call_id), None)
    return [r for r in repeats if r.judge_call_id != record.judge_call_id] + [supersede(old, record)]


def _apply_baseline_event(
    results: Results, event: BaselineResponsesEvent | BaselineJudgeEvent | BaselineClustersEvent | BaselineSpreadEvent,
) -> None:
    if results.baseline is None:
        results.baseline = Baseline(meta=event.meta)
    run = next((r for r in results.baseline.runs if r.run_id == event.run_id), None)
    if run is None:
        run = BaselineRun(run_id=event.run_id, target_id=event.target_id)
        results.baseline.runs.append(run)
    if event.meta:
        results.baseline.meta = event.meta
    if isinstance(event, BaselineResponsesEvent):
        run.responses = list(event.responses)
    elif isinstance(event, BaselineSpreadEvent):
        run.spread = event.spread
    elif isinstance(event, BaselineClustersEvent):
        run.clusters = supersede(run.clusters, event.record)
    else:
        run.judge = supersede(run.judge, event.record)


def supersede(old: Record | None, new: Record) -> Record:
    """``new`` in place of ``old``, keeping every earlier failure (a retried call's history is not thrown away).

    Replaying an event that was already folded in must change nothing, so the very same call again keeps ``old``.
    """
    if old is None:
        return new
    if _without_history(old) == _without_history(new) or _without_history(new) in old.previous_failures:
        return old  # this very call again, or a failure already folded into old's history (a journal replayed twice)
    carried = old.previous_failures + ([_without_history(old)] if old.failure is not None else [])
    return new.model_copy(update={"previous_failures": carried + new.previous_failures})


def _without_history(record: Record) -> Record:
    return record.model_copy(update={"previous_failures": []})


class ResultsStore:
    """A run folder: ``results.json`` plus journals (``journal.jsonl``, or ``journal.rank{r}.jsonl`` per rank).

    A command reads its folder once: ``results`` replays the journals on first use and is kept current by ``record``,
    which journals events (on disk first, fsync'd) and folds the very same events into memory, so every later stage
    sees the work without reading the folder again, and memory cannot say what a replay of the disk would not.
    """

    def __init__(self, folder: Path, journal_name: str = "journal.jsonl"):
        self.folder = Path(folder)
        self.results_path = self.folder / RESULTS_NAME
        self.journal = Journal(self.folder / journal_name)
        self._results: Results | None = None
        self._runs: dict[str, Run] = {}  # _results' runs by id, for record (thousands of judge calls, one dict)
        self._journal_sizes: dict[Path, int] = {}  # what ``_results`` holds of each journal, to catch a stale copy

    def exists(self) -> bool:
        return self.results_path.exists()

    def journals(self) -> list[Path]:
        """The tool's own journals in this folder (``TOOL_JOURNAL_RE``); nothing else is replayed or deleted."""
        return sorted(p for p in self.folder.glob(JOURNAL_GLOB) if TOOL_JOURNAL_RE.fullmatch(p.name))

    def load(self) -> Results:
        """The last written file with every journal replayed over it, read from disk (``results`` keeps it)."""
        results = load_results_file(self.results_path)
        runs = results.run_by_id()
        for path in self.journals():
            for k, event in enumerate(Journal(path).events(), start=1):
                try:
                    apply_event(results, event, runs)
                except ResultsError as e:
                    raise ResultsError(f"{path}: event {k}: {e}") from e
        return results

    @property
    def results(self) -> Results:
        """The folder's results, loaded on first use and kept current by ``record``: the stages of a command share
        this one copy (edit it in place; ``compact`` writes it)."""
        if self._results is None:
            self.reload()
        return self._results

    def reload(self) -> Results:
        """Read the folder again: only after other processes wrote to it (torchrun ranks, their own journals)."""
        sizes = self._sizes()
        self._keep(self.load(), sizes)
        return self._results

    def record(self, events: Sequence[JournalEvent]) -> None:
        """Journal ``events`` (a kill after this loses none of them), then fold them into ``results`` as a replay
        would: each as read back from its journal line, so memory holds exactly what the disk says."""
        results = self.results
        self.journal.append_many(events)
        self._journal_sizes[self.journal.path] = self.journal.path.stat().st_size
        for event in events:
            apply_event(results, parse_event(json.loads(event_line(event))), self._runs)

    def write(self, results: Results) -> None:
        """``results`` as the folder's file (atomically). Other results than the store's copy make it out of date:
        it is read again when next used."""
        atomic_write_text(self.results_path, dump_results(results))
        if results is not self._results:
            self._results = None

    def compact(self, results: Results | None = None) -> Results:
        """Fold every journal into results.json (``results``, by default the store's copy), then drop the journals
        (replay is idempotent if we die between). Returns the results written, the store's copy from now on."""
        if results is None:
            results = self.results
            if self._sizes() != self._journal_sizes:  # dropping them would lose events this copy never saw
                raise RuntimeError(f"the journals in {self.folder} changed after this store read them (another "
                                   "process's?); reload() before compact()")
        self.write(results)
        for path in self.journals():
            path.unlink(missing_ok=True)
        self._keep(results, {})
        return results

    def _keep(self, results: Results, journal_sizes: dict[Path, int]) -> None:
        self._results, self._runs, self._journal_sizes = results, results.run_by_id(), journal_sizes

    def _sizes(self) -> dict[Path, int]:
        return {p: p.stat().st_size for p in self.journals()}


# ---------------------------------------------------------------------------------------------------------------------
# The run folder's lock


class FolderBusyError(AOResamplingError):
    """Another live process holds the run folder's lock."""

    exit_code = EXIT_BUSY


class NotAFolderError(AOResamplingError):
    """The run folder's path exists and is not a folder (``--out`` pointing at a file)."""


def holder_description(text: str) -> str:
    """'pid 123 (ao-resampling judge ..., since ...)' from a lock file's JSON, or a fallback for anything else."""
    try:
        info = json.loads(text)  # redacted again: a lock written by an older version holds the command as typed
        return f"pid {info['pid']} ({redact(info['command'])}, since {info['started_at']})"
    except (ValueError, KeyError, TypeError):
        return "another process (it has not said which yet)"


def require_folder(folder: Path) -> None:
    """Make ``folder`` if needed, or say clearly that its path is a file (a traceback would not)."""
    if folder.exists() and not folder.is_dir():
        raise NotAFolderError(f"{folder} is a file, not a run folder; give --out (or the results path) a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:  # a parent on the way is a file
        raise NotAFolderError(f"cannot make the run folder {folder}: {e}") from e
    except OSError as e:  # a read-only or full file system
        raise DiskError(f"cannot make the run folder {folder}: {os.strerror(e.errno) if e.errno else e}") from e


@contextlib.contextmanager
def folder_lock(folder: Path, command: str | None = None) -> Iterator[None]:
    """Hold ``folder``'s lock for the block, or raise FolderBusyError naming the holder. Not re-entrant."""
    folder = Path(folder)
    require_folder(folder)
    path = folder / LOCK_NAME
    if path.is_dir():
        raise NotAFolderError(f"{path} is a folder; the tool keeps its lock file there. Remove or rename it.")
    with writing(path):  # a read-only folder
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # close-on-exec: an exec'd torchrun does not inherit it
    try:
        with contextlib.suppress(PermissionError):  # one made 0644 by an older version; another user's stays as it is
            os.fchmod(fd, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = holder_description(os.pread(fd, 4096, 0).decode(errors="replace"))
            raise FolderBusyError(
                f"{folder} is in use by {holder}: one process at a time works on a run folder. Wait for it to "
                f"finish (or stop it), then re-run; a killed holder releases the folder by itself."
            ) from None
        info = {"pid": os.getpid(), "command": redact(command or " ".join(["ao-resampling", *sys.argv[1:]])),
                "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        with writing(path):  # a full disk stops the command here, before any work
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # the holder is gone; the next reader must not name it
    finally:
        os.close(fd)  # releases the flock
