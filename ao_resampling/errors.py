"""One base class for every error this tool raises on purpose, and the exit codes the CLI ends with.

Each module keeps its own error class (``ConfigError``, ``ResultsError``, ...) for its callers to catch; all of them
also derive from ``AOResamplingError``, so cli.py catches the tool's errors in one place and prints their message
(no traceback), while anything else -- a bug -- still shows its traceback. ``describe_problems`` is the one wording of
a pydantic ValidationError in those messages (results files, baseline files, configs): every problem names its field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError

EXIT_OK = 0
EXIT_BUG = 1  # an unexpected exception (Python's own code for an uncaught error): please report it
EXIT_USAGE = 2  # bad flags (typer's) or input the tool refused with a message: nothing was done or lost
EXIT_CALLS_FAILED = 3  # finished, but some judge calls failed; they are recorded and a re-run retries them
EXIT_BUSY = 4  # another process holds the run folder's lock; nothing was done
EXIT_INTERRUPTED = 130  # Ctrl-C; everything finished before it is kept, a re-run continues


class AOResamplingError(Exception):
    """An error with a message meant for the user: it names the file, field or setting and what was expected."""

    exit_code: int = EXIT_USAGE


class PipelineError(AOResamplingError, RuntimeError):
    """A pre-flight check or a resume that cannot go ahead; the message says what to change.

    Here, not in pipeline.py, because the stages and the process launcher (ranks.py) raise it too and import nothing
    above them."""


class NonFiniteError(AOResamplingError, FloatingPointError):
    """Activations read from the model, or the state an injection writes, hold NaN or inf: every answer decoded from
    them would be noise (all whitespace, say), so the run stops instead. Raised by the engine (engine/hooks.py)."""


def describe_problems(error: ValidationError, *, limit: int | None = None, root: str = "<top level>") -> str:
    """A pydantic ValidationError as ``field 'a.0.b': problem; ...``, each problem naming its field (``root`` for the
    object as a whole). With ``limit``, the first ``limit`` problems and how many there are in all: a damaged results
    file can have thousands, and a message that long hides the first one. Callers put the file or source in front."""
    problems = error.errors()
    shown = "; ".join(f"field '{'.'.join(str(p) for p in err['loc']) or root}': {err['msg']}"
                      for err in problems[:limit])
    return shown if limit is None or len(problems) <= limit else f"{shown} ({len(problems)} problems in all)"
