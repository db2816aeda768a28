"""The namespace labels of old state dirs, and their migration into the label areas.

Before DIMMs had label storage areas (labels/nmemN.lsa, written as the kernel writes labels),
vnvdimm kept each DIMM's namespaces as JSON in labels/nmemN.json: one label per namespace on
every DIMM of its interleave set (uuid, name, isetcookie, position, nlabel, dpa, rawsize,
lbasize). The first boot of such a state dir (boot.build_system) reads them here and writes
their namespaces into the label areas (migrate_json_labels); the JSON files are then kept as
nmemN.json.migrated. The writer (DimmLabels.write, InterleaveLabels.save) makes such state
dirs for the tests of the migration.
"""

from __future__ import annotations

import json
import logging
import os
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vnvdimm.model.label_format import DimmLabelData, InterleaveSet, InterleaveSetLabels, LabelMapping, ScannedNamespace
from vnvdimm.safe_files import write_atomically
from vnvdimm.topology.config import format_size
from vnvdimm.topology.statedir import MIGRATED, StateDir

if TYPE_CHECKING:
    from vnvdimm.model.dimm import Nvdimm
    from vnvdimm.topology.record import Platform

log = logging.getLogger("vnvdimm.topology")


@dataclass(frozen=True)
class NamespaceLabel:
    """A namespace as the region sees it, rebuilt from its per-DIMM labels."""

    uuid: uuidlib.UUID
    name: str
    offset: int  # in region space
    size: int
    lbasize: int


class DimmLabels:
    """The label area of one DIMM."""

    def __init__(self, path: Path, *, dir_fd: int | None = None) -> None:
        """`dir_fd`: the descriptor of `path`'s directory; the file is opened in it by name."""
        self.path = path
        self.dir_fd = dir_fd

    def read(self) -> list[dict[str, object]]:
        try:
            fd = os.open(self.path.name if self.dir_fd is not None else self.path,
                         os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=self.dir_fd)
            with os.fdopen(fd, encoding="utf-8") as f:
                doc = json.loads(f.read())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.path}: unreadable label area: {e}") from e
        labels = doc.get("labels", []) if isinstance(doc, dict) else None
        if not isinstance(labels, list):
            raise ValueError(f"{self.path}: 'labels' is not a list")
        return [lab for lab in labels if isinstance(lab, dict)]

    def write(self, labels: list[dict[str, object]]) -> None:
        doc = {"version": "1.1", "labels": labels}
        write_atomically(self.path, json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n", dir_fd=self.dir_fd)


class InterleaveLabels:
    """The labels of one interleave set: what `Region` loads at probe and saves on change."""

    def __init__(self, dimms: list[tuple[DimmLabels, int]], isetcookie: int) -> None:
        self.dimms = dimms  # (label area, dpa of the region's mapping on that DIMM)
        self.isetcookie = isetcookie

    def load(self) -> list[NamespaceLabel]:
        ways = len(self.dimms)
        found: dict[str, list[dict[str, object]]] = {}
        for area, _dpa in self.dimms:
            for lab in area.read():
                if lab.get("isetcookie") == self.isetcookie:
                    found.setdefault(str(lab.get("uuid")), []).append(lab)
        out: list[NamespaceLabel] = []
        for uuid_text, labs in found.items():
            if len(labs) != ways:
                continue  # an incomplete set: the kernel ignores it too
            first = labs[0]
            try:
                _, dpa0 = self.dimms[0]
                out.append(NamespaceLabel(
                    uuid=uuidlib.UUID(uuid_text),
                    name=str(first.get("name", "")),
                    offset=(int(first["dpa"]) - dpa0) * ways,  # type: ignore[call-overload]
                    size=int(first["rawsize"]) * ways,  # type: ignore[call-overload]
                    lbasize=int(first.get("lbasize", 512)),  # type: ignore[call-overload]
                ))
            except (KeyError, ValueError, TypeError):
                continue
        return sorted(out, key=lambda lab: lab.offset)

    def save(self, namespaces: list[NamespaceLabel]) -> None:
        ways = len(self.dimms)
        for position, (area, dpa) in enumerate(self.dimms):
            keep = [lab for lab in area.read() if lab.get("isetcookie") != self.isetcookie]
            for slot, ns in enumerate(namespaces):
                keep.append({
                    "uuid": str(ns.uuid), "name": ns.name, "isetcookie": self.isetcookie,
                    "position": position, "nlabel": ways, "slot": slot,
                    "dpa": dpa + ns.offset // ways, "rawsize": ns.size // ways, "lbasize": ns.lbasize,
                })
            area.write(keep)


def dimm_labels(state: StateDir, dimm: int) -> DimmLabels:
    """DIMM `dimm`'s namespaces as the JSON of old state dirs."""
    return DimmLabels(state.label_path(dimm), dir_fd=state.labels_fd)


def migrate_json_labels(platform: Platform, state: StateDir, dimms: list[Nvdimm]) -> None:
    """State dirs of vnvdimm before label areas kept each DIMM's namespaces as JSON
    (labels/nmemN.json). Their namespaces are written into the label areas as the kernel
    writes labels, then the JSON files are kept as nmemN.json.migrated."""
    paths = [state.label_path(i) for i in range(len(dimms))]
    if not any(state.has(p.name, state.labels_fd) for p in paths):
        return
    data = {i: DimmLabelData(d.label_area) for i, d in enumerate(dimms) if d.label_area is not None}
    for r in platform.regions:
        if not r.dimms:
            continue
        old = InterleaveLabels([(dimm_labels(state, d), dpa) for d, dpa in r.dimms], r.json_label_cookie).load()
        if not old:
            continue
        share = r.size // len(r.dimms)
        labels = InterleaveSetLabels([LabelMapping(data[d], dpa, share) for d, dpa in r.dimms],
                                     InterleaveSet(r.set_cookie, r.cookie2, r.altcookie))
        for ns in old:
            labels.update(ScannedNamespace(ns.uuid, ns.name.encode("utf-8", "surrogateescape"), ns.offset, ns.size,
                                           ns.lbasize, ""))
            log.info("migrated namespace %s (%s) into the label areas", ns.uuid, format_size(ns.size))
    for p in paths:
        if state.has(p.name, state.labels_fd):
            os.replace(p.name, p.name + MIGRATED, src_dir_fd=state.labels_fd, dst_dir_fd=state.labels_fd)
