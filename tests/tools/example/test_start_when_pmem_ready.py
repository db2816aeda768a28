"""The service starts only once its pmem is ready (docs/testbed.md's worked example)."""

import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("start-when-pmem-ready")

# One 256 MiB fsdax namespace (/dev/pmem0) whose memmap takes 20 us a page to initialize.
pytestmark = pytest.mark.vnvdimm_topology({
    "template": "e820",
    "memmap": {"workers": 2, "ns_per_page": 20000},
    "region": [{"size": "256M", "namespace": {"mode": "fsdax", "map": "dev"}}],
})


def test_service_waits_for_the_memmap(vnvdimm_testbed, tmp_path):
    tb = vnvdimm_testbed
    tb.pause_memmap("pmem0", at=0.5)  # hold the init half way
    started = tmp_path / "started"
    service = tb.spawn([SCRIPT, "pmem0", "touch", started])

    time.sleep(1)
    assert service.poll() is None  # still waiting...
    assert not started.exists()  # ...and the service has not started
    assert tb.memmap("pmem0").state == "active"

    tb.resume_memmap()
    assert service.wait(timeout=30) == 0
    assert started.exists()
    assert tb.memmap("pmem0").state == "idle"


def test_service_gives_up_when_pmem_stays_busy(vnvdimm_testbed, tmp_path):
    tb = vnvdimm_testbed
    tb.pause_memmap("pmem0", at=0.5)
    started = tmp_path / "started"
    result = tb.run([SCRIPT, "-t", "1", "pmem0", "touch", started])
    assert result.returncode == 1
    assert "/dev/pmem0 not ready after 1 s" in result.stderr
    assert not started.exists()


def test_service_starts_at_once_when_pmem_is_ready(vnvdimm_testbed, tmp_path):
    tb = vnvdimm_testbed
    assert tb.wait_memmap("pmem0", timeout=30)
    result = tb.run([SCRIPT, "pmem0", "echo", "up"], check=True)
    assert result.stdout == "up\n"
