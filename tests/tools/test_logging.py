"""The daemon's log (STATE/vnvdimm.log): every refused store with device, attribute and
reason, the driver core's normal probing kept out of it, a line per finished memmap, nothing
from libfuse at mount, and a bounded size (rotation, short values)."""

from __future__ import annotations

import errno
import os
import re
import signal

import pytest
from mount_kit import have_ndctl, wait_for
from tooltest import holder

from vnvdimm.logfile import MAX_BYTES_ENV


def log_text(m) -> str:
    return (m.state_dir / "vnvdimm.log").read_text()


def test_refused_stores_are_logged(mnt) -> None:
    pfn = holder(mnt, "namespace0.0")
    attempts = [
        (f"sys/bus/nd/devices/{pfn}/memmap_state", b"later\n", errno.EINVAL),
        (f"sys/bus/nd/devices/{pfn}/mode", b"pmem\0", errno.EBUSY),
        (f"sys/bus/nd/devices/{pfn}/memmap/ns_per_page", b"fast\n", errno.EINVAL),
        ("sys/bus/nd/drivers/nd_pmem/unbind", b"region1\0", errno.ENODEV),
    ]
    for path, data, code in attempts:
        with pytest.raises(OSError) as e:
            mnt.write(path, data)
        assert e.value.errno == code, path
    refused = [line for line in log_text(mnt).splitlines() if "store refused" in line]
    assert len(refused) == len(attempts)
    assert " INFO: " in refused[0]
    assert f"device {pfn}, attribute memmap_state, value 'later': memmap_state only accepts 'sync' (EINVAL)" \
        in refused[0]
    assert f"device {pfn}, attribute mode, value 'pmem':" in refused[1] and "(EBUSY)" in refused[1]
    assert f"device {pfn}, attribute memmap/ns_per_page, value 'fast':" in refused[2]
    assert "device nd_pmem, attribute unbind, value 'region1':" in refused[3] and "(ENODEV)" in refused[3]
    # ... and each names the sysfs path it was written to.
    assert refused[3].endswith("[/sys/bus/nd/drivers/nd_pmem/unbind]")
    # Accepted stores are not logged as refusals.
    mnt.write(f"sys/bus/nd/devices/{pfn}/memmap_state", b"sync\n")
    assert log_text(mnt).count("store refused") == len(attempts)


def test_the_driver_core_probing_of_an_enable_is_no_refusal(mnt) -> None:
    """A bind to a driver that does not match (ENODEV), of a device already bound (EBUSY) and
    nd_pmem's ENXIO for a claimed namespace are what ndctl's enable loop expects: the writer
    still gets the errno, the log does not call them refused stores."""
    dax = holder(mnt, "namespace1.0")
    for driver, name, code in (("nd_region", "namespace1.0", errno.ENODEV), ("dax_pmem", dax, errno.EBUSY)):
        with pytest.raises(OSError) as e:
            mnt.write(f"sys/bus/nd/drivers/{driver}/bind", name.encode() + b"\0")
        assert e.value.errno == code, driver
    if have_ndctl():
        mnt.ndctl("disable-namespace", "namespace1.0")
        mnt.ndctl("enable-namespace", "namespace1.0")
        assert (mnt.sys / f"bus/nd/devices/{dax}/driver").exists()
    log = log_text(mnt)
    assert "store refused" not in log, log
    # what the enable did is there, as what it is
    assert "namespace1.0: claimed by dax1.1, found on its media" in log
    # a name that is no device is the writer's mistake, not probing
    with pytest.raises(OSError) as e:
        mnt.write("sys/bus/nd/drivers/nd_pmem/bind", b"nosuchdevice\0")
    assert e.value.errno == errno.ENODEV
    assert "store refused: device nd_pmem, attribute bind, value 'nosuchdevice': nd_pmem: no device " \
           "'nosuchdevice' on the nd bus (ENODEV)" in log_text(mnt)


def test_no_libfuse_warning_at_mount_and_a_line_per_finished_memmap(mnt) -> None:
    for dev in ("pfn0.1", "dax1.1"):
        mnt.write(f"sys/bus/nd/devices/{dev}/memmap_state", b"sync\n")
    wait_for(lambda: log_text(mnt).count("pages done in") >= 2, 10, "the memmaps' end lines")
    log = log_text(mnt)
    assert "Ignoring invalid max threads value" not in log, log
    for dev in ("pfn0.1", "dax1.1"):
        pages = int(mnt.read(f"sys/bus/nd/devices/{dev}/memmap/pages_total"))
        found = re.search(rf"{dev}: memmap of (\d+) pages done in ([0-9.]+) s \((\d+) pages/s\)", log)
        assert found and int(found[1]) == pages and int(found[3]) > 0, log


SMALL_LOG = 16 << 10


def test_the_log_rotates_and_a_refused_value_is_logged_short(make_mount, monkeypatch) -> None:
    monkeypatch.setenv(MAX_BYTES_ENV, str(SMALL_LOG))
    m = make_mount()
    pfn = holder(m, "namespace0.0")
    path = f"sys/bus/nd/devices/{pfn}/memmap_state"
    # a whole page of garbage: the line carries a prefix and the size
    with pytest.raises(OSError):
        m.write(path, b"A" * 4096)
    line = next(ln for ln in log_text(m).splitlines() if "store refused" in ln)
    assert "... (4096 bytes)" in line and len(line) < 500, line
    # enough refusals to fill the log several times over
    for i in range(400):
        with pytest.raises(OSError):
            m.write(path, f"refusal {i:04d} ".encode() + b"B" * 40)
    files = sorted(p.name for p in m.state_dir.iterdir() if p.name.startswith("vnvdimm.log"))
    assert files == ["vnvdimm.log", "vnvdimm.log.1", "vnvdimm.log.2"], files
    for name in files:
        assert (m.state_dir / name).stat().st_size <= SMALL_LOG, name
    # the newest refusal is in the live file, the generations in order, nothing lost between them
    live, one, two = (m.state_dir / name for name in files)
    assert "refusal 0399" in live.read_text()
    last_of_two = re.findall(r"refusal (\d{4})", two.read_text())[-1]
    first_of_one = re.findall(r"refusal (\d{4})", one.read_text())[0]
    assert int(first_of_one) == int(last_of_two) + 1
    # stderr and the stack dumps (SIGUSR1) follow the rotation into the live file
    assert m.pid is not None
    for fd in ("2",):
        assert os.readlink(f"/proc/{m.pid}/fd/{fd}") == str(live)
    size = live.stat().st_size
    os.kill(m.pid, signal.SIGUSR1)
    wait_for(lambda: "most recent call first" in live.read_text()[size:], 10, "the stack dump in the live log")
