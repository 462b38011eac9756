"""Caching primitives: keys are stable, writes are atomic, the ledger records only committed units."""

from __future__ import annotations

import pytest

from pipeline.cache import Ledger, atomic_path, atomic_write_bytes, stable_hash


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
