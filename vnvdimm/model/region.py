"""Regions (drivers/nvdimm/region_devs.c, region.c): capacity, seeds and the namespaces,
pfn/dax/btt devices that live below them."""

from __future__ import annotations

import errno
import logging
import uuid as uuidlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vnvdimm.model.badblocks import show as badblocks_show
from vnvdimm.model.base import (
    PAGE_SIZE,
    SZ_16M,
    Device,
    Entry,
    Group,
    Ida,
    align_down,
    align_up,
    fail,
    kstrtobool,
    kstrtoull,
    ro,
    rw,
)
from vnvdimm.model.label_format import InterleaveSet, InterleaveSetLabels, LabelMapping, ScannedNamespace
from vnvdimm.model.namespace import Namespace, NamespacePmem
from vnvdimm.model.nd import ND_BUS, NdDeviceType, release_uuid
from vnvdimm.model.personality import Btt, Dax, Personality, Pfn

if TYPE_CHECKING:
    from vnvdimm.model.bus import NvdimmBus
    from vnvdimm.model.dimm import Nvdimm
    from vnvdimm.model.media import Media

log = logging.getLogger("vnvdimm.model")

def default_align(size: int, ways: int) -> int:
    """region_devs.c default_align(): 16 MiB (MEMREMAP_COMPAT_ALIGN_MAX), a page for regions
    smaller than that, times the interleave ways when they do not divide it."""
    align = SZ_16M if size >= SZ_16M else PAGE_SIZE
    ways = max(1, ways)
    if align % ways:
        align *= ways
    return align


@dataclass(frozen=True)
class Mapping:
    """mappingN: a DIMM's share of the interleave set."""

    dimm: Nvdimm
    dpa: int
    length: int
    position: int


class Region(Device):
    bus_name = ND_BUS
    devtype = "nd_pmem"
    nd_type = NdDeviceType.REGION_PMEM

    def __init__(self, bus: NvdimmBus, region_id: int, start: int, size: int, media: Media, *,
                 numa_node: int = 0, target_node: int | None = None, mappings: Iterable[Mapping] = (),
                 iset: InterleaveSet | None = None, pagemap: bool = False, persistence: str = "",
                 range_index: int | None = None, flush_hints: bool = False) -> None:
        super().__init__(bus.system, f"region{region_id}", bus)
        self.bus = bus
        self.id = region_id
        self.start = start
        self.size = size
        self.media = media
        media.badblocks.on_write_cleared = lambda: self.system.notify(self, "badblocks")
        self.numa_node = numa_node
        self.target_node = numa_node if target_node is None else target_node
        self.mappings = list(mappings)
        # A labelled PM region: its interleave set's cookies; the labels of its DIMMs are
        # read when it probes (init_active_labels()) and written when a namespace changes.
        self.iset = iset if self.mappings else None
        self.labels: InterleaveSetLabels | None = None
        self.range_index = region_id + 1 if range_index is None else range_index
        self.flush_hints = flush_hints
        self.pagemap = pagemap  # ND_REGION_PAGEMAP: legacy namespaces map their pages (e820)
        self.persistence = persistence
        self.align = default_align(size, len(self.mappings))
        self.ns_active = self.ns_count = 0  # nd_region_data: what the last probe registered
        # nd_region_create(): a DIMM that is not armed makes the region read-only
        self.read_only = any(not m.dimm.identity.armed for m in self.mappings)
        self.namespaces: list[Namespace] = []
        self.personalities: list[Personality] = []
        self.ns_ida, self.pfn_ida, self.dax_ida, self.btt_ida = Ida(), Ida(), Ida(), Ida()
        self.ns_seed: Namespace | None = None
        self.pfn_seed: Pfn | None = None
        self.dax_seed: Dax | None = None
        self.btt_seed: Btt | None = None

    @property
    def nstype(self) -> NdDeviceType:
        """nd_region_to_nstype(): a PM region one of whose DIMMs is labelling (NDD_LABELING)
        hosts pmem namespaces; any other one IO namespace over all of it. Asked when the
        region probes (and by `nstype`), so a label-less region of label-capable DIMMs turns
        labelled at its next enable once a DIMM probe has found a valid label index."""
        if self.iset is not None and any(m.dimm.labeling for m in self.mappings):
            return NdDeviceType.NAMESPACE_PMEM
        return NdDeviceType.NAMESPACE_IO

    @property
    def labelled(self) -> bool:
        return self.nstype == NdDeviceType.NAMESPACE_PMEM

    # ------------------------------------------------------------ sysfs

    def entries(self) -> list[Entry]:
        def seed(dev: Device | None) -> str:
            return f"{dev.name}\n" if dev is not None else "\n"

        out: list[Entry] = [
            *super().entries(),
            ro("size", lambda: f"{self.size}\n"),
            rw("align", lambda: f"{self.align:#x}\n", self._align_store),
            ro("nstype", lambda: f"{self.nstype}\n"),
            ro("mappings", lambda: f"{len(self.mappings)}\n"),
            ro("btt_seed", lambda: seed(self.btt_seed)),
            ro("pfn_seed", lambda: seed(self.pfn_seed)),
            ro("dax_seed", lambda: seed(self.dax_seed)),
            ro("namespace_seed", lambda: seed(self.ns_seed)),
            rw("read_only", lambda: f"{int(self.read_only)}\n", self._read_only_store),
            ro("max_available_extent", lambda: f"{self.max_available_extent()}\n"),
            ro("init_namespaces", self._init_namespaces),
            ro("badblocks", self._badblocks_show),
            ro("resource", lambda: f"{self.start:#x}\n", mode=0o400),
            ro("numa_node", lambda: f"{self.numa_node}\n"),
            ro("target_node", lambda: f"{self.target_node}\n"),
        ]
        if self.iset is not None:
            out.append(ro("available_size", lambda: f"{self.available_size()}\n"))
            out.append(ro("set_cookie", self._set_cookie_show))
        if self.mappings:  # nvdimm_has_flush(): 1 with flush hints, 0 without (ADR)
            out.append(ro("deep_flush", lambda: f"{int(self.flush_hints)}\n"))
        if self.persistence:
            out.append(ro("persistence_domain", lambda: f"{self.persistence}\n"))
        for i, m in enumerate(self.mappings):
            out.append(ro(f"mapping{i}", lambda m=m: f"{m.dimm.name},{m.dpa},{m.length},{m.position}\n"))
        if self.bus.nfit:
            out.append(Group("nfit", [ro("range_index", lambda: f"{self.range_index}\n")]))
        return out

    def _align_store(self, buf: bytes) -> None:
        """region_devs.c align_store(): the per-DIMM share must be a power of two of at least
        a page, the value a multiple of the interleave ways and at most the region size.
        (The kernel takes a new value at any time; allocations consult it when they happen.)"""
        value = kstrtoull(buf)
        ways = max(1, len(self.mappings))
        dpa, remainder = divmod(value, ways)
        if dpa == 0 or dpa & (dpa - 1) or dpa < PAGE_SIZE or value > self.size or remainder:
            raise fail(errno.EINVAL, f"unsupported region align {value:#x}")
        self.align = value

    def _set_cookie_show(self) -> str:
        """set_cookie_show(): the cookie of the label version of the first DIMM's current index
        (v1.2's when it has none); ENXIO while that DIMM is disabled."""
        assert self.iset is not None
        data = self.mappings[0].dimm.label_data
        if data is None:
            raise fail(errno.ENXIO, f"{self.mappings[0].dimm.name} is disabled")
        return f"{InterleaveSetLabels([], self.iset).cookie(data.index(data.ns_current)):#x}\n"

    def _read_only_store(self, buf: bytes) -> None:
        self.read_only = kstrtobool(buf)

    def _init_namespaces(self) -> str:
        if self.driver is None:
            raise fail(errno.ENXIO, "region disabled")
        return f"{self.ns_active}/{self.ns_count}\n"

    def _badblocks_show(self) -> str:
        if self.driver is None:
            raise fail(errno.ENXIO, "region disabled")
        return badblocks_show(self.media.badblocks.ranges())

    # ------------------------------------------------------------ capacity (labelled regions)

    def _extents(self, exclude: Namespace | None = None) -> list[tuple[int, int]]:
        """The free extents, trimmed to the region align (space_valid(): a DPA allocation
        starts and ends on align / ways, i.e. on align in region space)."""
        used = sorted((ns.offset, ns.size) for ns in self.namespaces if ns.size and ns is not exclude)
        free: list[tuple[int, int]] = []

        def add(lo: int, hi: int) -> None:
            lo, hi = align_up(lo, self.align), align_down(hi, self.align)
            if hi > lo:
                free.append((lo, hi - lo))

        cursor = 0
        for off, size in used:
            if off > cursor:
                add(cursor, off)
            cursor = max(cursor, off + size)
        if cursor < self.size:
            add(cursor, self.size)
        return free

    def available_size(self) -> int:
        if self.iset is None:
            return 0
        if not self.labelled:
            return self._unlabelled_dpa(sum)
        return sum(size for _, size in self._extents())

    def max_available_extent(self) -> int:
        if self.iset is None:
            return 0
        if not self.labelled:
            return self._unlabelled_dpa(lambda lengths: min(lengths) * len(self.mappings))
        return max((size for _, size in self._extents()), default=0)

    def _unlabelled_dpa(self, combine: Callable[[list[int]], int]) -> int:
        """nd_region_available_dpa() / nd_region_allocatable_dpa() of a PM region whose DIMMs
        have no labels: no DPA is allocated on them, so each mapping is free whole (aligned to
        the region's per-DIMM align), and nothing is while one of its DIMMs is disabled."""
        if any(m.dimm.label_data is None for m in self.mappings):
            return 0
        per_dimm = self.align // len(self.mappings)
        return combine([align_down(m.length, per_dimm) for m in self.mappings])

    def resize_namespace(self, ns: NamespacePmem, size: int) -> None:
        """__size_store(): grow in place, shrink, allocate (first fit) or free."""
        if size == ns.size:
            return
        if size == 0:
            old = ns.uuid
            ns.size = 0
            ns.offset = 0
            if old is not None:
                self.write_labels(ns, delete=old)
            ns.uuid = None  # setting size zero == 'delete namespace'
            if ns.id != 0 and ns is not self.ns_seed and ns.claim is None:
                self.unregister_namespace(ns)
            self.system.changed()
            return
        if ns.size and size < ns.size:
            ns.size = size
        elif ns.size:
            grow = size - ns.size
            end = ns.offset + ns.size
            if not any(off == end and length >= grow for off, length in self._extents(exclude=ns)):
                raise fail(errno.ENOSPC, f"no room to grow {ns.name} by {grow}")
            ns.size = size
        else:
            extent = next(((off, length) for off, length in self._extents() if length >= size), None)
            if extent is None:
                raise fail(errno.ENOSPC, f"{size} bytes not available in {self.name}")
            ns.offset, ns.size = extent[0], size
        self.system.changed()
        self.write_labels(ns)

    def update_labels(self, ns: Namespace, old_uuid: uuidlib.UUID | None = None) -> None:
        """nd_namespace_label_update() after a uuid, name, sector size or claim class change:
        only a namespace with an allocation has labels to write."""
        if ns.size and ns.uuid is not None:
            self.write_labels(ns, rename_from=old_uuid)

    def btt_claim_is_v2(self) -> bool:
        """btt_claim_class(): BTT2 where the DIMMs have v1.2 labels, BTT (1.1) where they have
        v1.1 labels or none; ENXIO where they disagree."""
        if self.labels is None or not self.labels.mappings:
            return False
        versions = {m.dimm.label_size >= 256 for m in self.labels.mappings}
        if len(versions) > 1:
            raise fail(errno.ENXIO, f"the DIMMs of {self.name} disagree about their label version")
        return versions == {True}

    def labels_in_use(self) -> bool:
        """Whether the DIMMs of the set track labels of this region's namespaces."""
        return any(ns.size and ns.uuid is not None for ns in self.namespaces)

    def write_labels(self, ns: Namespace, *, delete: uuidlib.UUID | None = None,
                     rename_from: uuidlib.UUID | None = None) -> None:
        """nd_pmem_namespace_label_update(): the namespace's labels on every DIMM of the set
        (or their deletion)."""
        if self.labels is None:
            return
        if delete is not None:
            self.labels.delete(delete)
            return
        assert ns.uuid is not None
        claim = ns.claim_class
        if claim == "btt" and ns.claim_btt2:
            claim = "btt2"  # v1.2 labels name the BTT2 format
        self.labels.update(ScannedNamespace(ns.uuid, ns.alt_name.encode("utf-8", "surrogateescape"), ns.offset,
                                            ns.size, ns.lbasize, claim), old_uuid=rename_from)

    # ------------------------------------------------------------ device registration

    def children(self) -> Iterable[Device]:
        yield from self.namespaces
        yield from self.personalities

    def add_namespace(self, ns: Namespace) -> Namespace:
        self.ns_ida.take(ns.id)
        self.namespaces.append(ns)
        self.system.changed()
        return ns

    def create_ns_seed(self) -> None:
        if not self.labelled:
            return
        ns = NamespacePmem(self, self.ns_ida.get(), 0, 0)
        self.ns_seed = self.add_namespace(ns)
        self.system.device_add(ns)

    def create_personality(self, kind: type[Personality]) -> Personality:
        ida = {Pfn: self.pfn_ida, Dax: self.dax_ida, Btt: self.btt_ida}[kind]
        dev = kind(self, ida.get())  # type: ignore[call-arg]
        self.personalities.append(dev)
        self.system.changed()
        return dev

    def create_seed(self, kind: type[Personality]) -> None:
        dev = self.create_personality(kind)
        if kind is Pfn:
            self.pfn_seed = dev  # type: ignore[assignment]
        elif kind is Dax:
            self.dax_seed = dev  # type: ignore[assignment]
        else:
            self.btt_seed = dev  # type: ignore[assignment]
        self.system.device_add(dev)

    def advance_seeds(self, dev: Device) -> None:
        """nd_region_advance_seeds(): a seed that got enabled is replaced by a fresh one."""
        if dev is self.ns_seed:
            self.create_ns_seed()
            return
        if not isinstance(dev, Personality):
            return
        for kind, current in ((Btt, self.btt_seed), (Dax, self.dax_seed), (Pfn, self.pfn_seed)):
            if dev is current and type(dev) is kind:
                self.create_seed(kind)
        if dev.ndns is not None and dev.ndns is self.ns_seed:
            self.create_ns_seed()

    def unregister_personality(self, dev: Personality) -> None:
        if dev.driver is not None:
            self.system.driver_detach(dev)
        if dev.ndns is not None:
            dev.ndns.claim = None
            dev.ndns = None
        if dev in self.personalities:
            self.personalities.remove(dev)
            release_uuid(dev)
            ida = self.dax_ida if isinstance(dev, Dax) else self.pfn_ida if isinstance(dev, Pfn) else self.btt_ida
            ida.put(dev.id)
        if self.pfn_seed is dev:
            self.pfn_seed = None
        if self.dax_seed is dev:
            self.dax_seed = None
        if self.btt_seed is dev:
            self.btt_seed = None
        self.system.changed()

    def unregister_namespace(self, ns: Namespace) -> None:
        if ns.claim is not None:
            self.unregister_personality(ns.claim)
        if ns.driver is not None:
            self.system.driver_detach(ns)
        if ns in self.namespaces:
            self.namespaces.remove(ns)
            release_uuid(ns)
            self.ns_ida.put(ns.id)
        if self.ns_seed is ns:
            self.ns_seed = None
        self.system.changed()

    def valid_labels(self) -> list[ScannedNamespace]:
        """init_active_labels() and scan_labels(): the namespaces the DIMMs' labels describe,
        in region order. Every DIMM of the set must be enabled (its label data read)."""
        assert self.iset is not None
        mappings = []
        for m in self.mappings:
            if m.dimm.label_data is None:
                raise fail(errno.ENXIO, f"{m.dimm.name}: is disabled, failing probe")
            mappings.append(LabelMapping(m.dimm.label_data, m.dpa, m.length))
        self.labels = InterleaveSetLabels(mappings, self.iset)
        try:
            scanned = self.labels.scan()
        except OSError as e:
            # scan_labels()'s dev_err() on the region ("nmem1 missing label for <uuid>"): the
            # region does not probe
            log.info("%s: %s: namespace labels not usable, region not enabled", self.name,
                     (e.strerror or str(e)).removesuffix(" (ENODEV)"))
            raise
        out: list[ScannedNamespace] = []
        end = 0
        dimms = ", ".join(m.dimm.name for m in self.mappings)
        for label in scanned:
            # overlapping DPA ranges: the kernel's DPA reservation at DIMM probe refuses them;
            # the region align is not looked at, it only rules allocations
            if label.offset < end:
                log.info("%s: labels of %s (offset %#x, size %#x, on %s) overlap those of %s (up to %#x): "
                         "namespace skipped", self.name, label.uuid, label.offset, label.size, dimms, out[-1].uuid, end)
                continue
            if label.offset + label.size > self.size or label.size <= 0:
                log.info("%s: labels of %s (offset %#x, size %#x, on %s) reach past the region (%#x): "
                         "namespace skipped", self.name, label.uuid, label.offset, label.size, dimms, self.size)
                continue
            out.append(label)
            end = label.offset + label.size
        return out
