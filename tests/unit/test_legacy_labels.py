"""The JSON namespace labels of old state dirs (legacy_labels): round trip, interleave-set
bookkeeping, damaged files named, and atomic replacement (a failed write leaves the previous
labels intact)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from vnvdimm.topology.legacy_labels import DimmLabels, InterleaveLabels, NamespaceLabel

M = 1 << 20
COOKIE = 0x1234_5678_9ABC_0000


def interleave(tmp_path: Path, ways: int = 2, dpa: int = 0, cookie: int = COOKIE) -> InterleaveLabels:
    return InterleaveLabels([(DimmLabels(tmp_path / f"nmem{i}.json"), dpa) for i in range(ways)], cookie)


def test_round_trip(tmp_path: Path) -> None:
    labels = interleave(tmp_path, dpa=32 * M)
    a = NamespaceLabel(uuid.uuid4(), "alpha", 0, 64 * M, 512)
    b = NamespaceLabel(uuid.uuid4(), "bêta \udcff", 128 * M, 32 * M, 4096)
    labels.save([b, a])
    assert labels.load() == [a, b]  # sorted by region offset
    # each DIMM keeps one label per namespace, with its share of the interleave
    docs = [json.loads((tmp_path / f"nmem{i}.json").read_text()) for i in range(2)]
    for position, doc in enumerate(docs):
        by_name = {lab["name"]: lab for lab in doc["labels"]}
        assert by_name["alpha"]["dpa"] == 32 * M and by_name["alpha"]["rawsize"] == 32 * M
        assert by_name["bêta \udcff"]["dpa"] == 32 * M + 64 * M and by_name["bêta \udcff"]["rawsize"] == 16 * M
        assert {lab["position"] for lab in doc["labels"]} == {position}
        assert {lab["nlabel"] for lab in doc["labels"]} == {2}
        assert {lab["isetcookie"] for lab in doc["labels"]} == {COOKIE}


def test_other_interleave_sets_are_kept(tmp_path: Path) -> None:
    one = interleave(tmp_path, cookie=1)
    two = interleave(tmp_path, cookie=2, dpa=64 * M)
    x = NamespaceLabel(uuid.uuid4(), "x", 0, 32 * M, 512)
    y = NamespaceLabel(uuid.uuid4(), "y", 0, 64 * M, 512)
    one.save([x])
    two.save([y])
    assert one.load() == [x] and two.load() == [y]
    one.save([])
    assert one.load() == [] and two.load() == [y]


def test_an_incomplete_label_set_is_ignored(tmp_path: Path) -> None:
    labels = interleave(tmp_path)
    a = NamespaceLabel(uuid.uuid4(), "a", 0, 32 * M, 512)
    labels.save([a])
    doc = json.loads((tmp_path / "nmem1.json").read_text())
    doc["labels"] = []
    (tmp_path / "nmem1.json").write_text(json.dumps(doc))
    assert labels.load() == []


def test_missing_label_area_is_empty_and_garbage_is_an_error_naming_the_file(tmp_path: Path) -> None:
    area = DimmLabels(tmp_path / "nmem0.json")
    assert area.read() == []
    area.path.write_text("{ not json")
    with pytest.raises(ValueError, match=r"nmem0\.json"):
        area.read()
    area.path.write_text('{"labels": 3}')
    with pytest.raises(ValueError, match=r"nmem0\.json"):
        area.read()


def test_a_failed_write_leaves_the_previous_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = interleave(tmp_path)
    a = NamespaceLabel(uuid.uuid4(), "a", 0, 32 * M, 512)
    labels.save([a])
    before = [(tmp_path / f"nmem{i}.json").read_bytes() for i in range(2)]

    def fail_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail_fsync)
    with pytest.raises(OSError):
        labels.save([a, NamespaceLabel(uuid.uuid4(), "b", 32 * M, 32 * M, 512)])
    monkeypatch.undo()
    assert [(tmp_path / f"nmem{i}.json").read_bytes() for i in range(2)] == before
    assert labels.load() == [a]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nmem0.json", "nmem1.json"]  # temp file removed
