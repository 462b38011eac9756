"""Caching primitives: keys are stable, writes are atomic, the ledger records only committed units."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from pipeline.cache import (
    Ledger,
    atomic_path,
    atomic_write_bytes,
    check_store_root,
    stable_hash,
    sweep_temporaries,
)
from pipeline.errors import PipelineError


def test_stable_hash_ignores_key_order_and_sees_every_value():
    assert stable_hash({"eps": 0.05, "k": 3}) == stable_hash({"k": 3, "eps": 0.05})
    assert stable_hash({"eps": 0.05, "k": 3}) != stable_hash({"eps": 0.05, "k": 5})
    assert len(stable_hash({"a": 1})) == 12


def test_atomic_write_replaces_the_file_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "sub" / "table.parquet"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.parquet"]


def test_a_failed_write_keeps_the_old_file_and_cleans_up(tmp_path):
    target = tmp_path / "table.parquet"
    target.write_bytes(b"complete")
    with pytest.raises(RuntimeError, match="killed"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["table.parquet"]


def test_atomic_folder_replaces_a_folder(tmp_path):
    target = tmp_path / "extracted"
    for content in ("old", "new"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / content).write_text(content)
    assert [p.name for p in target.iterdir()] == ["new"]


def test_ledger_records_and_forgets_units(tmp_path):
    ledger = Ledger(tmp_path / ".done")
    assert ledger.done_units() == [] and not ledger.is_done("fetch:a.zip")
    ledger.mark_done("fetch:a.zip", {"size": 3})
    ledger.mark_done("batch/0001")
    assert ledger.is_done("fetch:a.zip") and ledger.record("fetch:a.zip") == {
        "unit": "fetch:a.zip",
        "size": 3,
    }
    assert ledger.done_units() == ["batch/0001", "fetch:a.zip"]
    ledger.clear("fetch:a.zip")
    assert not ledger.is_done("fetch:a.zip") and ledger.record("fetch:a.zip") is None


def test_sweep_removes_the_temporaries_of_dead_processes_only(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    left = tmp_path / "a" / f".part-00001.parquet.tmp-{host}-{int(dead.stdout)}-x1y2z3"
    live = tmp_path / f".summary.md.tmp-{host}-{os.getpid()}-abc"
    remote = tmp_path / f".summary.md.tmp-elsewhere-{int(dead.stdout)}-abc"
    kept = tmp_path / "downloads" / "TSS.zip.part"
    for folder in (left, live, remote):
        (folder / "inner").mkdir(parents=True)
    kept.parent.mkdir()
    kept.write_bytes(b"resumable")
    assert sweep_temporaries(tmp_path) == [left]
    assert not left.exists() and live.exists() and remote.exists() and kept.exists()
    with atomic_path(tmp_path / "new.txt") as tmp:  # the temporaries atomic_path makes are recognised
        tmp.write_text("x")
        assert sweep_temporaries(tmp_path) == []
        assert tmp.parent.name.startswith(f".new.txt.tmp-{host}-{os.getpid()}-")


def test_a_store_root_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "outputs").write_text("not a folder")
    with pytest.raises(PipelineError, match=r"^stores.outputs .*outputs is a file, not a folder; point it at"):
        check_store_root(str(tmp_path / "outputs"), "stores.outputs")
    check_store_root(str(tmp_path / "new" / "root"), "stores.cache_root")
    assert (tmp_path / "new" / "root").is_dir()
