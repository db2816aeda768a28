"""Through a mount: reconfiguring a namespace hundreds of times (pfn and dax devices given a
uuid, enabled, disabled and deleted by sysfs writes, as ndctl does) leaves the daemon's
resident memory where it was after warm-up. (tests/unit/test_soak.py runs thousands of
cycles in process, with a bound per cycle; here the whole stack is in the loop, FUSE,
kernfs nodes, the memmap jobs, with a bound on the total.)"""

from __future__ import annotations

import os
import uuid

from topologies import e820

WARM_UP = 150
CYCLES = int(os.environ.get("VNVDIMM_SOAK_MOUNT_CYCLES", "450"))
# A leak of a kernfs node or a memmap job per cycle is kilobytes a cycle. Measured: the daemon
# settles by about 100 B a cycle for the first 1500 cycles (170 KiB), then stays flat.
MAX_GROWTH = 1 << 20
# The cycles after warm-up are measured in windows. A leak grows the daemon in every one of
# them; what a loaded machine adds is a step, not a slope: libfuse starts another worker
# thread when requests queue up (its stack and malloc arena become resident once), so one
# window may jump while the others stay flat. The test fails when no window is flat.
WINDOWS = 3
def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) << 10


def test_reconfiguring_through_the_mount_keeps_the_daemon_flat(make_mount) -> None:
    m = make_mount(e820("32M raw"))
    m.write("sys/bus/nd/drivers/nd_pmem/unbind", b"namespace0.0\0")

    def cycle() -> None:
        for kind, driver in (("pfn", "nd_pmem"), ("dax", "dax_pmem")):
            dev = m.read(f"sys/bus/nd/devices/region0/{kind}_seed").strip()
            d = f"sys/bus/nd/devices/{dev}"
            m.write(f"{d}/uuid", str(uuid.uuid4()).encode() + b"\0")
            m.write(f"{d}/mode", b"pmem\0")
            m.write(f"{d}/namespace", b"namespace0.0\0")
            m.write(f"sys/bus/nd/drivers/{driver}/bind", dev.encode() + b"\0")
            m.write(f"sys/bus/nd/drivers/{driver}/unbind", dev.encode() + b"\0")
            m.write(f"{d}/namespace", b"\n")

    assert m.pid is not None
    for _ in range(WARM_UP):
        cycle()
    window = max(CYCLES // WINDOWS, 1)
    growths = []
    for _ in range(WINDOWS):
        before = rss(m.pid)
        for _ in range(window):
            cycle()
        growths.append(rss(m.pid) - before)
    assert min(growths) < MAX_GROWTH // WINDOWS, (
        f"the daemon grew in every window of {window} cycles after warm-up: {growths} bytes "
        f"(at least {min(growths) / window:.0f} B a cycle)")
