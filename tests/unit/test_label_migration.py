"""State dirs written before label areas (namespaces as labels/nmemN.json, a platform record
without NFIT cookies or buses) mount with every namespace, name, size, sector size and mode
as they were: the JSON namespaces are written into the label areas and the files kept."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from label_image import read_image
from model_kit import NFIT_TWO, Machine

from vnvdimm.topology.legacy_labels import DimmLabels, InterleaveLabels, NamespaceLabel

M = 1 << 20
OLD_COOKIE = 0x1234_5678_9ABC_0000  # vnvdimm's old cookie: a hash of its own


def make_old_state_dir(state: Path) -> dict[str, tuple[str, int, int]]:
    """An nfit state dir as the previous vnvdimm left it: media of the provisioned platform
    (namespace0.0: fsdax "first"), JSON labels for region0 (that namespace and one more) and
    region1, an old-schema platform.json, no label areas."""
    m = Machine(state, NFIT_TWO)
    m.boot()
    first = m.read("namespace0.0/uuid").strip()
    m.shutdown()
    for lsa in (state / "labels").glob("*.lsa"):
        lsa.unlink()
    record = json.loads((state / "platform.json").read_text())
    record.pop("buses")
    for d in record["dimms"]:
        for key in ("bus", "vendor", "device", "revision", "mfg_location", "mfg_date", "format", "flags",
                    "label_fill"):
            d.pop(key)
    for r in record["regions"]:
        for key in ("bus", "cookie2", "altcookie", "range_index", "region_offsets", "flush_hints", "persistence",
                    "json_label_cookie"):
            r.pop(key)
        r["set_cookie"] = OLD_COOKIE + r["start"]
    (state / "platform.json").write_text(json.dumps(record))
    second, third = uuid.uuid4(), uuid.uuid4()
    for r, namespaces in ((record["regions"][0], [NamespaceLabel(uuid.UUID(first), "first", 0, 64 * M, 512),
                                                  NamespaceLabel(second, "second \udcff", 96 * M, 32 * M, 4096)]),
                          (record["regions"][1], [NamespaceLabel(third, "", 0, 128 * M, 512)])):
        InterleaveLabels([(DimmLabels(state / "labels" / f"nmem{d}.json"), dpa) for d, dpa in r["dimms"]],
                         r["set_cookie"]).save(namespaces)
    return {"first": (first, 0, 64 * M), "second \udcff": (str(second), 96 * M, 32 * M), "": (str(third), 0, 128 * M)}


def test_json_labels_are_migrated_into_the_label_areas(tmp_path: Path) -> None:
    state = tmp_path / "state"
    expected = make_old_state_dir(state)
    m = Machine(state, None)
    m.boot()
    try:
        found = {}
        for r in (0, 1):
            start = int(m.read(f"region{r}/resource"), 16)
            for ns in m.dev(f"region{r}").namespaces:  # type: ignore[attr-defined]
                if ns.size:
                    found[ns.alt_name] = (str(ns.uuid), ns.start - start, ns.size)
        assert found == expected
        assert m.read("namespace0.0/mode") == "memory\n"  # its fsdax info block on the media
        assert "[4096]" in m.read("namespace0.1/sector_size")
        assert sorted(p.name for p in (state / "labels").iterdir()) == sorted(
            [f"nmem{i}.json.migrated" for i in range(4)] + [f"nmem{i}.lsa" for i in range(4)])
        _, _, _, labels = read_image((state / "labels" / "nmem1.lsa").read_bytes())
        names = sorted([b"first", "second \udcff".encode("utf-8", "surrogateescape")])
        assert sorted(lab.name for lab in labels) == names
        assert {lab.position for lab in labels} == {1}
    finally:
        m.shutdown()
    # a second mount has nothing left to migrate and finds the same namespaces
    m = Machine(state, None)
    m.boot()
    try:
        assert m.read("namespace1.0/uuid").strip() == expected[""][0]
    finally:
        m.shutdown()
