"""Every refused store is in the daemon's log (STATE/vnvdimm.log) with device, attribute and reason."""

from __future__ import annotations

import errno

import pytest
from tooltest import holder


def test_refused_stores_are_logged(mnt) -> None:
    pfn = holder(mnt, "namespace0.0")
    attempts = [
        (f"sys/bus/nd/devices/{pfn}/memmap_state", b"later\n", errno.EINVAL),
        (f"sys/bus/nd/devices/{pfn}/mode", b"pmem\0", errno.EBUSY),
        (f"sys/bus/nd/devices/{pfn}/memmap/ns_per_page", b"fast\n", errno.EINVAL),
        ("sys/bus/nd/drivers/dax_pmem/bind", b"namespace0.0\0", errno.ENODEV),
        ("sys/bus/nd/drivers/nd_pmem/unbind", b"region1\0", errno.ENODEV),
    ]
    for path, data, code in attempts:
        with pytest.raises(OSError) as e:
            mnt.write(path, data)
        assert e.value.errno == code, path
    log = (mnt.state_dir / "vnvdimm.log").read_text()
    refused = [line for line in log.splitlines() if "store refused" in line]
    assert len(refused) == len(attempts)
    assert " INFO: " in refused[0]
    assert f"device {pfn}, attribute memmap_state, value 'later': memmap_state only accepts 'sync' (EINVAL)" \
        in refused[0]
    assert f"device {pfn}, attribute mode, value 'pmem':" in refused[1] and "(EBUSY)" in refused[1]
    assert f"device {pfn}, attribute memmap/ns_per_page, value 'fast':" in refused[2]
    assert "device dax_pmem, attribute bind, value 'namespace0.0':" in refused[3] and "(ENODEV)" in refused[3]
    assert "device nd_pmem, attribute unbind, value 'region1':" in refused[4]
    # ... and each names the sysfs path it was written to.
    assert refused[3].endswith("[/sys/bus/nd/drivers/dax_pmem/bind]")
    # Accepted stores are not logged as refusals.
    mnt.write(f"sys/bus/nd/devices/{pfn}/memmap_state", b"sync\n")
    assert (mnt.state_dir / "vnvdimm.log").read_text().count("store refused") == len(attempts)
