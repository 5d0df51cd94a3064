"""How a command (and the test session) runs and ends with respect to the garbage collector: full collections
seldom while it runs (``fewer_full_collections``), none at exit, and without the leak report Triton's bindings print
at teardown.

A command's heap is mostly the millions of long-lived objects torch and transformers create on import; the last
collection walks them all (~1 s of each exit, more than a short command's own work). Frozen objects are not collected
at exit; memory goes back with the process. Objects kept that way include Triton's (torch imports Triton where it is
installed, as it is beside every CUDA torch), and its nanobind bindings then list each as "leaked" on stderr as the
interpreter shuts down (~30 lines after pytest's summary or a command's last line). Triton silences the same report in
its own compile workers the same way: stderr goes to /dev/null once everything else has run.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys


def fewer_full_collections() -> None:
    """A full collection after every 100 middle ones, not 10. Each walks every object torch, transformers and peft
    create on import (~0.2-0.3 s); at the default rate importing them alone set off ~2 s of them, and a small run
    ~0.6 s. One in 100 still frees what a command's own work leaves in cycles. Call before those imports."""
    gc.set_threshold(*gc.get_threshold()[:2], 100)


def _stderr_to_devnull() -> None:
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def end_without_final_collection() -> None:
    """Call last: every file written and closed, every message printed."""
    gc.freeze()
    if "triton" in sys.modules:
        atexit.register(_stderr_to_devnull)  # atexit runs last-registered first: the handlers before it still print
