"""struct cxl_region regionN (drivers/cxl/core/region.c): its attributes, HPA allocation,
target attach and detach with the kernel's position and routing checks, and the commit of
the decoders on its path."""

from __future__ import annotations

import errno
import re
import uuid as uuidlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

from vnvdimm.model.base import (
    NULL_UUID,
    Device,
    Entry,
    cstring,
    fail,
    kstrtobool,
    kstrtoull,
    ro,
    rw,
    streq_text,
    sysfs_streq,
)
from vnvdimm.model.cxl.common import (
    CXL_BUS,
    CXL_CONFIG_ACTIVE,
    CXL_CONFIG_COMMIT,
    CXL_CONFIG_IDLE,
    CXL_CONFIG_INTERLEAVE_ACTIVE,
    CXL_DEVICE_REGION,
    MAX_REGION_TARGETS,
    SZ_256M,
    CxlDev,
    c_hex,
    eig_of,
    eiw_of,
    kstrtoint,
)

if TYPE_CHECKING:
    from vnvdimm.model.cxl.decoder import CxlDecoder
    from vnvdimm.model.cxl.port import CxlPort
    from vnvdimm.model.media import Media

class CxlRegion(CxlDev):
    """struct cxl_region regionN below its root decoder (drivers/cxl/core/region.c)."""

    devtype = "cxl_region"
    cxl_type = CXL_DEVICE_REGION

    def __init__(self, root_decoder: CxlDecoder, region_id: int, mode: str) -> None:
        super().__init__(root_decoder.system, f"region{region_id}", root_decoder)
        self.root_decoder = root_decoder
        self.id = region_id
        self.mode = mode
        self.uuid = NULL_UUID
        self.interleave_ways = 0
        self.interleave_granularity = 0
        self.res: tuple[int, int] | None = None  # (start, size)
        self.state = CXL_CONFIG_IDLE
        self.targets: list[CxlDecoder | None] = [None] * MAX_REGION_TARGETS
        self.port_decoders: dict[int, CxlDecoder] = {}  # id(port) -> the switch decoder it gave
        self.pmem_region: Device | None = None  # pmem_regionN while the region is enabled (pmem)
        # the bytes behind the HPA range: made when cxl_pmem first maps the region, kept while
        # the region has its range (a disable and enable finds its namespaces' data again)
        self.media: Media | None = None

    def children(self) -> Iterable[Device]:
        return [self.pmem_region] if self.pmem_region is not None else []

    @property
    def nr_targets(self) -> int:
        return sum(t is not None for t in self.targets)

    def entries(self) -> list[Entry]:
        out: list[Entry] = [
            *super().entries(),
            rw("commit", lambda: f"{int(self.state == CXL_CONFIG_COMMIT)}\n", self._commit_store),
            rw("interleave_ways", lambda: f"{self.interleave_ways}\n", self._ways_store),
            rw("interleave_granularity", lambda: f"{self.interleave_granularity}\n", self._granularity_store),
            ro("resource", lambda: f"{c_hex(self.res[0] if self.res else (1 << 64) - 1)}\n"),
            rw("size", lambda: f"{c_hex(self.res[1] if self.res else 0)}\n", self._size_store),
            ro("mode", lambda: f"{self.mode}\n"),
        ]
        if self.mode == "pmem":
            out.append(rw("uuid", lambda: f"{self.uuid}\n", self._uuid_store))
        for pos in range(min(self.interleave_ways, MAX_REGION_TARGETS)):
            out.append(rw(f"target{pos}", lambda pos=pos: self._target_show(pos),
                          lambda buf, pos=pos: self._target_store(pos, buf)))
        return out

    # -- attributes
    def _uuid_store(self, buf: bytes) -> None:
        text = cstring(buf)
        if not re.fullmatch(rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
                            text[:36]):
            raise fail(errno.EINVAL, "malformed uuid")
        value = uuidlib.UUID(text[:36].decode())
        if value == NULL_UUID:
            raise fail(errno.EINVAL, "null uuid")
        if value == self.uuid:
            return
        if self.state >= CXL_CONFIG_ACTIVE:
            raise fail(errno.EBUSY, f"{self.name} is active")
        for topo in self.system.cxl_topologies:
            if topo.root is not None and any(r.uuid == value for d in topo.root.decoders for r in d.regions):
                raise fail(errno.EBUSY, f"uuid {value} is another region's")
        self.uuid = value

    def _ways_store(self, buf: bytes) -> None:
        val = kstrtoint(buf)
        eiw_of(val)
        root_ways = self.root_decoder.interleave_ways
        if val % root_ways or (val // root_ways) & (val // root_ways - 1):
            raise fail(errno.EINVAL, f"invalid interleave: {val}")
        if self.state >= CXL_CONFIG_INTERLEAVE_ACTIVE:
            raise fail(errno.EBUSY, f"{self.name} has its size")
        self.interleave_ways = val
        self.system.changed()  # the targetN attributes follow the ways

    def _granularity_store(self, buf: bytes) -> None:
        val = kstrtoint(buf)
        eig_of(val)
        root = self.root_decoder
        if root.interleave_ways > 1 and val != root.interleave_granularity:
            raise fail(errno.EINVAL, f"granularity {val} differs from the interleaved root's")
        if self.state >= CXL_CONFIG_INTERLEAVE_ACTIVE:
            raise fail(errno.EBUSY, f"{self.name} has its size")
        self.interleave_granularity = val

    def _size_store(self, buf: bytes) -> None:
        size = kstrtoull(buf, 0)
        if size:
            self.alloc_hpa(size)
        else:
            self.free_hpa()

    def alloc_hpa(self, size: int) -> None:
        if self.res is not None and self.res[1] == size:
            return
        if self.res is not None or self.state >= CXL_CONFIG_INTERLEAVE_ACTIVE:
            raise fail(errno.EBUSY, f"{self.name} has its size")
        if not self.interleave_ways or not self.interleave_granularity or (
                self.mode == "pmem" and self.uuid == NULL_UUID):
            raise fail(errno.ENXIO, "ways, granularity and uuid come before the size")
        if size % (SZ_256M * self.interleave_ways):
            raise fail(errno.EINVAL, f"size {size:#x} is no multiple of 256 MiB x {self.interleave_ways}")
        root = self.root_decoder
        taken = sorted(r.res for r in root.regions if r.res is not None)
        start = root.start
        for t_start, t_size in taken:  # first fit, 256 MiB aligned
            if start + size <= t_start:
                break
            start = max(start, -(-(t_start + t_size) // SZ_256M) * SZ_256M)
        if start + size > root.start + root.size:
            raise fail(errno.ENOSPC, f"no {size:#x} free in {root.name}")
        self.res = (start, size)
        self.state = CXL_CONFIG_INTERLEAVE_ACTIVE

    def free_hpa(self) -> None:
        if self.res is None:
            return
        if self.state >= CXL_CONFIG_ACTIVE:
            raise fail(errno.EBUSY, f"{self.name} is active")
        self.res = None
        self.state = CXL_CONFIG_IDLE
        self.drop_media()

    def drop_media(self) -> None:
        """The HPA range is given back: what was stored there is gone."""
        if self.media is not None:
            self.media.close()
            self.media = None

    def _target_show(self, pos: int) -> str:
        target = self.targets[pos]
        return f"{target.name if target else ''}\n"

    def _target_store(self, pos: int, buf: bytes) -> None:
        if sysfs_streq(buf, ""):
            self.detach(pos)
            return
        dev = self.system.find_device(CXL_BUS, buf)
        if dev is None:
            raise fail(errno.ENODEV, f"no {streq_text(buf)} on the cxl bus")
        if dev.devtype != "cxl_decoder_endpoint":  # is_endpoint_decoder(): the device's type
            raise fail(errno.EINVAL, f"{dev.name} is no endpoint decoder")
        self.attach(cast("CxlDecoder", dev), pos)

    def _commit_store(self, buf: bytes) -> None:
        commit = kstrtobool(buf)
        if commit == (self.state >= CXL_CONFIG_COMMIT):  # already in the requested state
            return
        if commit and self.state < CXL_CONFIG_ACTIVE:
            raise fail(errno.ENXIO, f"{self.name} is not ready to commit")
        if commit:
            self.decode_commit()
            self.state = CXL_CONFIG_COMMIT
        else:
            self.system.driver_detach(self)
            self.decode_reset()
            self.state = CXL_CONFIG_ACTIVE

    # -- the decoders of the region's path
    def path(self, cxled: CxlDecoder) -> list[CxlPort]:
        """The ports from the endpoint's up to (not including) the root."""
        ports, port = [], cxled.port
        while port is not None and port.kind != "root":
            ports.append(port)
            port = port.parent_port
        return ports

    def decoder_of(self, port: CxlPort, cxled: CxlDecoder) -> CxlDecoder:
        return cxled if port.kind == "endpoint" else self.port_decoders[id(port)]

    def decode_commit(self) -> None:
        done: list[CxlDecoder] = []
        try:
            for cxled in self.targets[:self.interleave_ways]:
                assert cxled is not None
                for port in self.path(cxled):
                    decoder = self.decoder_of(port, cxled)
                    if not decoder.enabled:
                        decoder.commit()
                        done.append(decoder)
        except OSError:
            for decoder in reversed(done):
                decoder.reset()
            raise

    def decode_reset(self) -> None:
        for cxled in self.targets[:self.interleave_ways]:
            if cxled is not None:
                for port in self.path(cxled):
                    self.decoder_of(port, cxled).reset()

    # -- attach and detach (cxl_region_attach(), cxl_region_detach())
    def ep_dport(self, port: CxlPort, cxled: CxlDecoder) -> int:
        """The id of the port's dport the endpoint's memdev is below (cxl_ep_load()->dport)."""
        dev: Device | None = cxled.memdev.pdev
        while dev is not None:
            for dport_id, dport in port.dports.items():
                if dport is dev:
                    return dport_id
            dev = dev.parent
        raise fail(errno.ENXIO, f"{cxled.memdev.name} is not below {port.name}")

    def attach(self, cxled: CxlDecoder, pos: int) -> None:
        if cxled.mode != self.mode:
            raise fail(errno.EINVAL, f"{cxled.name} mode {cxled.mode} differs from {self.mode}")
        if self.state > CXL_CONFIG_INTERLEAVE_ACTIVE:
            raise fail(errno.EBUSY, f"{self.name} is active")
        if self.state < CXL_CONFIG_INTERLEAVE_ACTIVE:
            raise fail(errno.ENXIO, f"{self.name}: interleave config missing")
        if not 0 <= pos < self.interleave_ways:
            raise fail(errno.ENXIO, f"position {pos} out of range {self.interleave_ways}")
        if self.targets[pos] is cxled:
            return
        if self.targets[pos] is not None:
            raise fail(errno.EBUSY, f"position {pos} already assigned")
        if any(t is not None and t.memdev is cxled.memdev for t in self.targets):
            raise fail(errno.EBUSY, f"{cxled.memdev.name} already has a position")
        if self.nr_targets >= self.interleave_ways:
            raise fail(errno.EINVAL, f"{self.name} already has its endpoints")
        if cxled.region is not None:
            raise fail(errno.EBUSY, f"{cxled.name} is in {cxled.region.name}")
        root_port = self.root_decoder.port
        hb_port = self.path(cxled)[-1]
        dport = next((i for i, d in root_port.dports.items() if d is hb_port.uport), None)
        if dport is None or dport not in self.root_decoder.targets:
            raise fail(errno.ENXIO, f"{cxled.name}: invalid target for {self.root_decoder.name}")
        if not cxled.dpa_size:
            raise fail(errno.ENXIO, f"{cxled.name}: missing DPA allocation")
        assert self.res is not None
        if cxled.dpa_size * self.interleave_ways != self.res[1]:
            raise fail(errno.EINVAL, f"{cxled.name}: decoder size {cxled.dpa_size:#x} x {self.interleave_ways} "
                                     f"!= region size {self.res[1]:#x}")
        root = self.root_decoder
        if dport != self.calc_hb(pos):
            raise fail(errno.ENXIO, f"{cxled.name}: invalid target position for {root.name}")
        # cxl_port_attach_region(): each switch port on the way gives the region a decoder
        taken: list[CxlPort] = []
        for port in self.path(cxled)[1:]:
            if id(port) in self.port_decoders:
                continue
            free = next((d for d in port.decoders if d.region is None and not d.enabled), None)
            if free is None:
                for p in taken:
                    self.port_decoders.pop(id(p)).region = None
                raise fail(errno.EBUSY, f"{port.name} has no free decoder")
            free.region = self
            self.port_decoders[id(port)] = free
            taken.append(port)
        self.targets[pos] = cxled
        cxled.pos = pos
        cxled.region = self
        if self.nr_targets == self.interleave_ways:
            try:
                self.setup_targets()
            except OSError:
                self.targets[pos] = None
                cxled.region, cxled.pos = None, -1
                self.release_port_decoders()
                raise
            self.state = CXL_CONFIG_ACTIVE
        cxled.interleave_ways = self.interleave_ways
        cxled.interleave_granularity = self.interleave_granularity
        cxled.start, cxled.size = self.res

    def calc_hb(self, pos: int) -> int:
        """The host bridge (root dport id) a region position must be below: cxl_hb_modulo()
        or, for an XOR window, cxl_hb_xor() (the parity of the position's HPA under each xormap)."""
        root = self.root_decoder
        iw = root.interleave_ways
        if root.window is None or not root.window.xor:
            return root.targets[pos % iw]
        hpa = root.start + pos * root.interleave_granularity
        n = 0
        if iw != 3:
            for i, xormap in enumerate(root.port.topo.xormaps):
                n |= (bin(hpa & xormap).count("1") & 1) << i
        if iw & (iw - 1):  # x3, x6, x12: a modulo on top
            eiw = eiw_of(iw)
            if eiw == 8:
                n = (hpa // root.interleave_granularity) % 3
            else:
                n |= ((hpa >> (eiw - 8 + eig_of(root.interleave_granularity) + 8)) % 3) << (eiw - 8)
        return root.targets[n]

    def release_port_decoders(self) -> None:
        """Give back the switch decoders no attached endpoint goes through any more."""
        used = {id(p) for t in self.targets if t is not None for p in self.path(t)[1:]}
        for key in [k for k in self.port_decoders if k not in used]:
            decoder = self.port_decoders.pop(key)
            decoder.region = None
            decoder.reset_range()

    def setup_targets(self) -> None:
        """cxl_region_setup_targets(): program each switch decoder's ways, granularity, range
        and targets, walking the endpoints in position order, each from the top port down,
        refusing positions a port cannot route (check_last_peer())."""
        root = self.root_decoder
        eps = [t for t in self.targets[:self.interleave_ways] if t is not None]
        ports: dict[int, CxlPort] = {}
        dports_used: dict[int, set[int]] = {}
        for cxled in eps:
            for port in self.path(cxled)[1:]:
                ports[id(port)] = port
                dports_used.setdefault(id(port), set()).add(self.ep_dport(port, cxled))
        nr_targets = {k: len(v) for k, v in dports_used.items()}
        targets_set: dict[int, list[int]] = {k: [] for k in ports}
        programmed: dict[int, tuple[int, int]] = {}
        try:
            for cxled in eps:
                for port in reversed(self.path(cxled)[1:]):
                    key = id(port)
                    decoder = self.port_decoders[key]
                    nr = nr_targets[key]
                    if nr & (nr - 1):
                        raise fail(errno.EINVAL, f"{port.name}: invalid target count {nr}")
                    dport = self.ep_dport(port, cxled)
                    if targets_set[key]:
                        distance, it = 1, port
                        while it is not None and it.kind != "root":
                            distance *= nr_targets[id(it)]
                            it = it.parent_port
                        distance *= root.interleave_ways
                        if dport in targets_set[key]:
                            pos = cxled.pos
                            peer = self.targets[pos - distance] if pos >= distance else None
                            if peer is None or self.ep_dport(port, peer) != dport:
                                raise fail(errno.ENXIO, f"{port.name}: {cxled.memdev.name} cannot take position {pos}")
                            continue
                    else:
                        parent = port.parent_port
                        if parent is None or parent.kind == "root":
                            parent_ig, parent_iw = self.interleave_granularity, root.interleave_ways
                            if parent_iw & (parent_iw - 1):
                                parent_iw //= 3
                        else:
                            parent_iw, parent_ig = programmed[id(parent)]
                        eiw_of(nr)
                        ig = 256 << eig_of(parent_ig * parent_iw)
                        if nr > 8 or nr > decoder.nr_targets:
                            raise fail(errno.ENXIO, f"{decoder.name}: ways {nr} overflow targets {decoder.nr_targets}")
                        decoder.interleave_ways, decoder.interleave_granularity = nr, ig
                        assert self.res is not None
                        decoder.start, decoder.size = self.res
                        programmed[key] = (nr, ig)
                    if len(targets_set[key]) == nr:
                        raise fail(errno.ENXIO, f"{port.name}: targets full")
                    targets_set[key].append(dport)
                    decoder.targets = list(targets_set[key])
        except OSError:
            for key in ports:
                self.port_decoders[key].reset_range()
            raise

    def detach(self, pos: int) -> None:
        if pos >= self.interleave_ways:
            raise fail(errno.ENXIO, f"position {pos} out of range")
        cxled = self.targets[pos]
        if cxled is None:
            return
        self.system.driver_detach(self)  # the region driver loses a target
        if self.state > CXL_CONFIG_ACTIVE:
            self.decode_reset()
            self.state = CXL_CONFIG_ACTIVE
        if self.state == CXL_CONFIG_ACTIVE:
            self.state = CXL_CONFIG_INTERLEAVE_ACTIVE
            for decoder in self.port_decoders.values():
                decoder.reset_range()
        self.targets[pos] = None
        cxled.region, cxled.pos = None, -1
        cxled.reset_range()
        self.release_port_decoders()

    def unregister(self) -> None:
        """unregister_region(): every target detached, the HPA freed, the device gone."""
        self.system.driver_detach(self)
        for pos in range(self.interleave_ways):
            self.detach(pos)
        self.res = None
        self.state = CXL_CONFIG_IDLE
        self.drop_media()
        self.root_decoder.regions.remove(self)
        self.system.region_ida.put(self.id)
        self.system.changed()


