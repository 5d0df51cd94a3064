"""``report FILE --out DIR`` reads the run folder and writes only under DIR: the results file (an older format, a
journal not folded in, spreads missing) is left byte for byte, no ``.lock`` appears beside it, and a run folder that
cannot be written (read-only, archived) is reported all the same. What ``report`` cannot write or read is one
``error:`` line: a full disk under --out, a NaN spread in the file. The CLI in-process; read-only is simulated by
making every write under the run folder fail with EROFS (the tests may run as root, for whom chmod changes nothing).
"""

from __future__ import annotations

import builtins
import errno
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ao_resampling import store as store_mod
from ao_resampling.cli import app
from ao_resampling.errors import EXIT_USAGE
from ao_resampling.results import RESULTS_NAME, SpreadMetrics, dump_results
from tests.support.results_factory import make_results

# A spread journaled after the file was last written: replayed for the report, never folded into the file by it.
JOURNAL = ('{"type":"spread","run_id":"run__t2__q1","spread":{"embedding_model":"none","embedding_mean_cosine":null,'
           '"distinct_fraction":0.75,"mean_jaccard":0.125}}\n')


def invoke(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def run_folder(folder: Path) -> Path:
    results = make_results([[8, 6], [5, 5], [9, 9]])  # judged, no spreads yet
    results.meta.config = {"embedding_model": "none", "bootstrap_resamples": 100}
    folder.mkdir(parents=True)
    (folder / RESULTS_NAME).write_text(dump_results(results))
    (folder / "journal.jsonl").write_text(JOURNAL)
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def read_only(monkeypatch):
    """Every write under the folders given (file opened for writing, temp file, lock, rename, mkdir) fails as on a
    read-only file system."""
    folders: list[Path] = []

    def under(path) -> bool:
        return any(Path(os.path.abspath(path)).is_relative_to(f) for f in folders)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    real_open, real_os_open, real_replace, real_mkdir = builtins.open, os.open, os.replace, Path.mkdir

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, Path)) and any(c in mode for c in "wax+") and under(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        if under(dst):
            refuse(dst)
        return real_replace(src, dst, *args, **kwargs)

    def mkdir(self, *args, **kwargs):
        if under(self) and not self.is_dir():
            refuse(self)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    return lambda folder: folders.append(Path(folder).resolve())


def test_report_with_out_leaves_the_run_folder_as_it_was(tmp_path):
    folder = run_folder(tmp_path / "run")
    before = snapshot(folder)
    result = invoke("report", folder / RESULTS_NAME, "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    assert snapshot(folder) == before  # not migrated, no spreads added, journal not folded in, no .lock
    assert not (folder / ".lock").exists()
    # The report has every run's spread: the journal's (0.75) and, computed for it alone, the other five runs' (their
    # three answers all differ: 1.0); the file gained none of them.
    distinct = json.loads((tmp_path / "out" / "summary.json").read_text())["lexical"]["distinct_fraction"]
    assert (distinct["n"], distinct["min"]) == (6, 0.75) and distinct["mean"] == pytest.approx((5 * 1.0 + 0.75) / 6)
    assert (tmp_path / "out" / "report.md").exists()


def test_a_read_only_run_folder_is_reported(tmp_path, read_only):
    folder = run_folder(tmp_path / "archive" / "run")
    before = snapshot(folder)
    read_only(folder)
    result = invoke("report", folder, "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "report.md").exists() and snapshot(folder) == before


def test_a_read_only_run_folder_without_out_says_so_in_one_line(tmp_path, read_only):
    folder = run_folder(tmp_path / "run")
    read_only(folder)
    result = invoke("report", folder, "--quiet")
    assert result.exit_code == EXIT_USAGE, result.output
    assert result.output.startswith("error: cannot make the run folder") and "Read-only file system" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_full_disk_under_out_is_one_line_and_leaves_no_truncated_png(tmp_path, monkeypatch):
    folder = run_folder(tmp_path / "run")
    out = tmp_path / "out"

    def full(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_mod.os, "fsync", full)
    result = invoke("report", folder, "--out", out, "--quiet")
    assert result.exit_code == EXIT_USAGE, result.output
    assert result.output.startswith("error: cannot write ") and "No space left on device" in result.output
    assert [p.name for p in out.iterdir() if p.name != ".lock"] == []  # no half-written figure


def test_a_nan_spread_in_the_file_is_one_line_naming_the_field(tmp_path):
    folder = tmp_path / "run"
    results = make_results([[8, 6], [5, 5]], spread=lambda *_: SpreadMetrics(embedding_model="none",
                                                                            embedding_mean_cosine=0.5))
    results.meta.config = {"embedding_model": "none"}
    data = json.loads(dump_results(results))
    data["runs"][2]["spread"]["embedding_mean_cosine"] = float("nan")  # a hand-edited file: the bare word NaN
    folder.mkdir()
    (folder / RESULTS_NAME).write_text(json.dumps(data))
    result = invoke("report", folder, "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == EXIT_USAGE, result.output
    assert "field 'runs.2.spread.embedding_mean_cosine': Input should be a finite number" in result.output
