"""A disk that fills up or a folder that cannot be written (store.py, analysis/figures.py): one DiskError naming the
file, everything written before intact, no half-written file left. The failures are simulated by making the system
call raise what the kernel raises (ENOSPC, EROFS); the tests run as any user, root included."""

from __future__ import annotations

import errno
import json
import os

import pytest
from matplotlib.figure import Figure

from ao_resampling import store as store_mod
from ao_resampling.analysis.figures import save_figure
from ao_resampling.errors import AOResamplingError
from ao_resampling.events import spread_event
from ao_resampling.results import SpreadMetrics
from ao_resampling.files import DiskError, atomic_write_text
from ao_resampling.store import NotAFolderError, ResultsStore, folder_lock
from tests.support.results_factory import make_results

SPREAD = SpreadMetrics(embedding_model="none", distinct_fraction=0.5, mean_jaccard=0.25)


def raising(code: int):
    def fail(*_args, **_kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize("call", ["fsync", "replace"])
def test_a_full_disk_in_an_atomic_write_is_one_error_and_keeps_the_old_file(tmp_path, monkeypatch, call):
    path = tmp_path / "results.json"
    path.write_text("old contents\n")
    monkeypatch.setattr(store_mod.os, call, raising(errno.ENOSPC))
    with pytest.raises(DiskError, match=f"cannot write {path}: No space left on device.*re-run") as info:
        atomic_write_text(path, "new contents")
    monkeypatch.undo()
    assert isinstance(info.value, AOResamplingError)  # the CLI prints it as one line, exit 2
    assert path.read_text() == "old contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_full_disk_in_a_journal_append_keeps_every_earlier_event(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path)
    results = make_results([[None], [None]])
    store.write(results)
    first, second = (r.run_id for r in results.runs)
    store.journal.append(spread_event(first, SPREAD))
    monkeypatch.setattr(store_mod.os, "fsync", raising(errno.ENOSPC))
    with pytest.raises(DiskError, match="journal.jsonl: No space left on device"):
        store.journal.append(spread_event(second, SPREAD))
    monkeypatch.undo()
    loaded = store.load()
    assert loaded.run_by_id()[first].spread == SPREAD  # the event journaled before the disk filled


def test_a_png_on_a_full_disk_is_not_left_truncated(tmp_path, monkeypatch):
    path = tmp_path / "A_judge_scores.png"
    path.write_bytes(b"the previous report's figure")
    monkeypatch.setattr(store_mod.os, "fsync", raising(errno.ENOSPC))
    with pytest.raises(DiskError, match="A_judge_scores.png"):
        save_figure(Figure(), path, dpi=20)
    monkeypatch.undo()
    assert path.read_bytes() == b"the previous report's figure"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    save_figure(Figure(), path, dpi=20)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_a_read_only_folder_cannot_be_locked_and_says_so(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(store_mod.os, "open", read_only)
    with pytest.raises(DiskError, match=r"cannot write .*\.lock: Read-only file system"):
        with folder_lock(tmp_path):
            pytest.fail("the block ran without the lock")


def test_a_full_disk_while_the_lock_names_its_holder_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod.os, "pwrite", raising(errno.ENOSPC))
    with pytest.raises(DiskError, match=r"\.lock: No space left on device"):
        with folder_lock(tmp_path):
            pytest.fail("the block ran on a full disk")
    monkeypatch.undo()
    with folder_lock(tmp_path):  # released: the next command gets it
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_a_lock_path_that_is_a_folder_is_named(tmp_path):
    (tmp_path / ".lock").mkdir()
    with pytest.raises(NotAFolderError, match=r"\.lock is a folder"):
        with folder_lock(tmp_path):
            pytest.fail("the block ran without the lock")


def test_a_folder_that_cannot_be_made_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod.Path, "mkdir", raising(errno.EROFS))
    with pytest.raises(DiskError, match="cannot make the run folder .*Read-only file system"):
        with folder_lock(tmp_path / "new"):
            pytest.fail("the block ran without a folder")

