"""The kernel's cxl_test module (tools/testing/cxl/test/cxl.c, mem.c): the topology it
registers, as ndctl v76.1's CXL tests expect it.

Two host bridges with two root ports each, a switch below every root port with two downstream
ports, a memdev below each of those (8), plus a single-port host bridge with one root port, one
switch and two memdevs (10 memdevs in all; the restricted-CXL-host bridge later kernels add is
not there: v76.1's cxl-topology.sh counts 2 or 3 host bridges). The CFMWS windows are the
modulo-arithmetic set (interleave_arithmetic=0): a 1 GiB and a 2 GiB x2 volatile window, a
1 GiB and a 2 GiB x2 pmem window over the first two bridges, a 1 GiB pmem window on the third.
Each memdev: 2 GiB, half volatile half persistent, a 128 KiB label area, 4 KiB payloads, the
serial its platform device's id, firmware "mock fw v1 ", on NUMA node id % 2.
"""

from __future__ import annotations

from vnvdimm.model import cxl
from vnvdimm.model.cxl import CxlMemdev, CxlTopology, PlatformDev, Window
from vnvdimm.model.system import System
from vnvdimm.topology import nfit_test

MODULE = "cxl_test"

SZ_256M = 256 << 20
SZ_1G = 1 << 30
NR_HOST_BRIDGES = 2
NR_ROOT_PORTS = 2
NR_SWITCH_PORTS = 2
NR_MULTI_ROOT = NR_HOST_BRIDGES * NR_ROOT_PORTS
NR_MEM_MULTI = NR_MULTI_ROOT * NR_SWITCH_PORTS
NR_DECODERS = 8  # NR_CXL_PORT_DECODERS
DEV_SIZE = 2 * SZ_1G
LSA_SIZE = 128 << 10
PAYLOAD_MAX = 4096
FIRMWARE_VERSION = "mock fw v1 "

WINDOWS = (
    Window(eiw=0, eig=4, ram=True, size=SZ_256M * 4, targets=(0,)),
    Window(eiw=1, eig=4, ram=True, size=SZ_256M * 8, targets=(0, 1)),
    Window(eiw=0, eig=4, ram=False, size=SZ_256M * 4, targets=(0,)),
    Window(eiw=1, eig=4, ram=False, size=SZ_256M * 8, targets=(0, 1)),
    Window(eiw=0, eig=4, ram=False, size=SZ_256M * 4, targets=(2,)),
)
# interleave_arithmetic=1: the XOR-arithmetic windows instead (CXIMS xormaps below), an x1,
# an x2 and an x4 pmem window, the x4 one alternating the two multi-port host bridges.
XOR_WINDOWS = (
    Window(eiw=0, eig=4, ram=False, size=SZ_256M * 8, targets=(0,), xor=True),
    Window(eiw=1, eig=0, ram=False, size=SZ_256M * 8, targets=(0, 1), xor=True),
    Window(eiw=2, eig=0, ram=False, size=SZ_256M * 16, targets=(0, 1, 0, 1), xor=True),
)
XORMAPS = (0x404100, 0x808200)  # cxims0, hbig 0
# The mock pool: the top 64 GiB of a 46-bit physical address space; the host bridges'
# component registers come first, the windows after them at 256 MiB alignment.
POOL_BASE = (1 << 46) - (64 << 30)
WINDOW_BASE = POOL_BASE + SZ_256M


def build(system: System, interleave_arithmetic: int = 0) -> CxlTopology:
    """Register cxl_test's platform devices and let the drivers probe them (module init).
    `interleave_arithmetic`: the module parameter (0 modulo windows, 1 XOR windows)."""
    acpi = PlatformDev(system, "cxl_acpi", 0, None)
    bridges = [PlatformDev(system, "cxl_host_bridge", i, None, physical_node=True) for i in range(NR_HOST_BRIDGES + 1)]
    root_ports = [PlatformDev(system, "cxl_root_port", i, bridges[i % NR_HOST_BRIDGES]) for i in range(NR_MULTI_ROOT)]
    uports = [PlatformDev(system, "cxl_switch_uport", i, root_ports[i]) for i in range(NR_MULTI_ROOT)]
    dports = [PlatformDev(system, "cxl_switch_dport", i, uports[i % NR_MULTI_ROOT]) for i in range(NR_MEM_MULTI)]
    mems = [PlatformDev(system, "cxl_mem", i, dports[i], numa_node=i % 2) for i in range(NR_MEM_MULTI)]
    # the single-port host bridge
    single_rp = PlatformDev(system, "cxl_root_port", NR_MULTI_ROOT, bridges[NR_HOST_BRIDGES])
    single_uport = PlatformDev(system, "cxl_switch_uport", NR_MULTI_ROOT, single_rp)
    single_dports = [PlatformDev(system, "cxl_switch_dport", NR_MEM_MULTI + i, single_uport)
                     for i in range(NR_SWITCH_PORTS)]
    mems += [PlatformDev(system, "cxl_mem", NR_MEM_MULTI + i, single_dports[i], numa_node=i % 2)
             for i in range(NR_SWITCH_PORTS)]
    windows = XOR_WINDOWS if interleave_arithmetic else WINDOWS
    topo = CxlTopology(system, acpi, bridges, list(windows), NR_DECODERS, XORMAPS)
    topo.window_base = WINDOW_BASE
    # nfit_test's buses and DIMMs (the same platform) keep their ids across its reloads
    topo.nd_bus_floor, topo.nmem_floor = len(nfit_test.BUSES), len(nfit_test.DIMMS)
    topo.region_floor = len(nfit_test.REGIONS)
    cxl.register(system, lambda: system.cxl_topologies)
    system.cxl_topologies.append(topo)
    with system.lock:
        system.roots += [acpi, *bridges]
        system.device_add(acpi)  # cxl_acpi probes: root0, its decoders, the host-bridge ports
        for memdev_id, pdev in enumerate(mems):  # cxl_mock_mem probes: memN, then cxl_mem binds
            memdev = CxlMemdev(topo, memdev_id, pdev, serial=pdev.pdev_id, ram_size=DEV_SIZE // 2,
                               pmem_size=DEV_SIZE // 2, lsa_size=LSA_SIZE, payload_max=PAYLOAD_MAX,
                               firmware_version=FIRMWARE_VERSION)
            topo.memdevs.append(memdev)
            system.device_add(memdev)
    return topo


def remove(system: System, topo: CxlTopology) -> None:
    """Module exit: every device unbound and unregistered."""
    with system.lock:
        for memdev in topo.memdevs:
            system.driver_detach(memdev)
        system.driver_detach(topo.acpi)
        gone = {id(topo.acpi), *(id(b) for b in topo.host_bridges)}
        system.roots[:] = [r for r in system.roots if id(r) not in gone]
        system.cxl_topologies.remove(topo)
        system.changed()
