"""Writing a file so that a reader never sees half of it, and a failed write is one line for the user.

The foundation of every file the tool writes: a run folder's results and journal (store.py), the report and its
figures (analysis/), a sweep's manifest, and the tokenizer folder the loader converts (engine/loading/models.py).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ao_resampling.errors import AOResamplingError


class DiskError(AOResamplingError, OSError):
    """A file the tool must write cannot be: a full disk, a read-only folder, no permission. What was written before
    (the last results.json, every journaled event) is intact; the message names the file and how to go on."""


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turns an OSError while writing ``path`` into a DiskError: one line for the user, not a traceback."""
    try:
        yield
    except DiskError:
        raise
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise DiskError(f"cannot write {path}: {reason}. Everything written before is kept; make room (or make the "
                        "folder writable) and re-run the same command to continue.") from e


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers see the old file or the new, never half."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """As ``atomic_write_text``; a failed write (a full disk) leaves the old file, or none, never a truncated one."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared like any output
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
