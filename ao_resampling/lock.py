"""One writer per run folder: ``folder_lock`` holds an exclusive ``flock`` on ``<folder>/.lock`` while a command works.

A second ``run``/``judge``/``baseline``/``report`` on the same folder would redo the same work (double GPU time, double
judge spend) and the last write would win; instead it stops at once, naming the holder (pid, command, start time,
which the holder writes into the lock file). The lock belongs to the open file, so the kernel releases it when the
holder exits however it exits (kill -9 included): a crash never leaves a folder locked. The file itself stays.

Under torchrun only rank 0 takes the lock (cli.py); the other ranks write only their own rank journals and meet rank 0
at every step, so while rank 0 holds the folder, the whole group does.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from ao_resampling.errors import EXIT_BUSY, AOResamplingError

LOCK_NAME = ".lock"


class FolderBusyError(AOResamplingError):
    """Another live process holds the run folder's lock."""

    exit_code = EXIT_BUSY


class NotAFolderError(AOResamplingError):
    """The run folder's path exists and is not a folder (``--out`` pointing at a file)."""


def holder_description(text: str) -> str:
    """'pid 123 (ao-resampling judge ..., since ...)' from a lock file's JSON, or a fallback for anything else."""
    try:
        info = json.loads(text)
        return f"pid {info['pid']} ({info['command']}, since {info['started_at']})"
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


@contextlib.contextmanager
def folder_lock(folder: Path, command: str | None = None) -> Iterator[None]:
    """Hold ``folder``'s lock for the block, or raise FolderBusyError naming the holder. Not re-entrant."""
    folder = Path(folder)
    require_folder(folder)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # close-on-exec: an exec'd torchrun does not inherit it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = holder_description(os.pread(fd, 4096, 0).decode(errors="replace"))
            raise FolderBusyError(
                f"{folder} is in use by {holder}: one process at a time works on a run folder. Wait for it to "
                f"finish (or stop it), then re-run; a killed holder releases the folder by itself."
            ) from None
        info = {"pid": os.getpid(), "command": command or " ".join(["ao-resampling", *sys.argv[1:]]),
                "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # the holder is gone; the next reader must not name it
    finally:
        os.close(fd)  # releases the flock
