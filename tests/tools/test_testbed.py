"""The Testbed API and the pytest plugin: topologies, commands and callables in the emulated
namespace, platform controls, and a teardown that leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from tooltest import clean_env

from vnvdimm.mounts import is_mounted, process_alive, wait_exit
from vnvdimm.testbed import Testbed, TestbedError, to_toml

SMALL_TOML = """\
template = "e820"
[memmap]
workers = 1
[[region]]
size = "256M"
namespace = { mode = "devdax", map = "mem", align = "2M" }
"""


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(") ", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def test_topologies_dict_toml_and_file(tmp_path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(SMALL_TOML)
    for topology in (SMALL_TOML, path):
        with Testbed(topology, base_dir=tmp_path) as tb:
            (ns,) = tb.ndctl("list", "-N")
            assert (ns["mode"], ns["map"], ns["chardev"]) == ("devdax", "mem", "dax0.0")
            assert tb.read("/sys/bus/nd/devices/dax0.0/memmap/workers") in ("1\n",)
    tb = Testbed(None, base_dir=tmp_path, workers=1, ns_per_page=1000)
    assert "ns_per_page = 1000" in tb.toml and "workers = 1" in tb.toml
    tb = Testbed({"region": []}, base_dir=tmp_path)
    tb.add_region("256M", "sector").add_region("512M", "devdax", map="mem")
    with tb:
        namespaces = {ns["dev"]: ns for ns in tb.ndctl("list", "-N")}
        assert namespaces["namespace0.0"]["mode"] == "sector"
        assert namespaces["namespace1.0"]["mode"] == "devdax"
        # On a running test bed: a reboot with one more region; what was there stays.
        tb.write("/dev/pmem0s", b"kept across the reboot".ljust(4096, b"\0"))
        tb.add_region("256M", "fsdax")
        namespaces = {ns["dev"]: ns for ns in tb.ndctl("list", "-N")}
        assert [namespaces[f"namespace{i}.0"]["mode"] for i in range(3)] == ["sector", "devdax", "fsdax"]
        with open(tb.path("/dev/pmem0s"), "rb") as f:
            assert f.read(22) == b"kept across the reboot"


def test_to_toml_round_trips() -> None:
    import tomllib

    doc = {"template": "nfit", "memmap": {"mode": "sync", "workers": 2},
           "dimm": [{"size": "512M"}, {"size": "512M"}],
           "region": [{"dimms": [0, 1], "namespaces": [{"size": "256M", "mode": "fsdax", "name": "a\"b"}]}]}
    assert tomllib.loads(to_toml(doc)) == doc


def test_commands_and_callables_see_the_emulated_system(tmp_path) -> None:
    host_nd = sorted(os.listdir("/sys/bus/nd/devices")) if os.path.isdir("/sys/bus/nd/devices") else None
    with Testbed(base_dir=tmp_path) as tb:
        res = tb.run("ls /sys/bus/nd/devices && test -b /dev/pmem0 && echo pmem0 is there")
        assert res.returncode == 0 and "namespace0.0" in res.stdout and "pmem0 is there" in res.stdout

        def inside() -> dict[str, object]:
            return {"devices": sorted(os.listdir("/sys/bus/nd/devices")),
                    "pmem0": open("/dev/pmem0", "rb").seek(0, os.SEEK_END),  # a block device (root)
                    "null": open("/dev/null", "w").write("x")}

        seen = tb.call(inside)
        assert "namespace0.0" in seen["devices"] and "region1" in seen["devices"]
        assert seen["pmem0"] == 262144000 and seen["null"] == 1
        # Exceptions come back as themselves, closures work, and a stuck callable times out.
        with pytest.raises(FileNotFoundError):
            tb.call(open, "/dev/pmem9")
        limit = 3
        assert tb.call(lambda: len(os.listdir("/sys/bus/nd/devices")) > limit)
        with pytest.raises(TimeoutError):
            tb.call(__import__("time").sleep, 30, timeout=0.5)
        assert tb.ndctl("list", "-R")[0]["dev"] in ("region0", "region1")
    # Nothing changed for this process.
    assert (sorted(os.listdir("/sys/bus/nd/devices")) if os.path.isdir("/sys/bus/nd/devices") else None) == host_nd


def test_platform_controls(tmp_path) -> None:
    with Testbed(base_dir=tmp_path, ns_per_page=20000) as tb:
        out = tb.set_mode("namespace0.0", "devdax", align="2M")
        assert out["mode"] == "devdax" and out["daxregion"]["devices"][0]["chardev"] == "dax0.0"
        assert tb.status().to_json()["buses"][0]["regions"][0]["namespaces"][0]["mode"] == "devdax"
        assert tb.wait_memmap(timeout=30)  # the pool is shared: a device held would hold every device
        tb.pause_memmap(at=0.3)  # every device, also those created from now on
        tb.slow_memmap(20000)
        tb.disable("namespace0.0")
        tb.enable("namespace0.0")  # a new personality and memmap, held at 30 %
        assert not tb.wait_memmap("dax0.0", timeout=1.5)
        mm = tb.memmap("/dev/dax0.0")
        assert mm.state == "active" and 0.3 <= mm.fraction < 0.9
        assert tb.read("/sys/devices/platform/e820_pmem/ndbus0/vnvdimm/memmap_pause_at") == "300\n"
        tb.resume_memmap()
        assert tb.wait_memmap(timeout=30)
        assert tb.memmap("namespace0.0").state == "idle"
        tb.inject_error("namespace0.0", 16, 4)
        assert tb.badblocks("namespace0.0") == [{"block": 16, "count": 4}]
        with pytest.raises(OSError):
            tb.call(lambda: os.pread(os.open("/dev/dax0.0", os.O_RDONLY), 512, 16 * 512))
        tb.clear_error("namespace0.0", 16, 4)
        assert tb.badblocks("namespace0.0") == []
        with pytest.raises(TestbedError, match="out of range"):
            tb.inject_error("namespace0.0", 1 << 40, 1)
        with pytest.raises(TestbedError, match="mode must be"):
            tb.set_mode("namespace0.0", "fast")
        with pytest.raises(OSError):
            tb.write("/sys/bus/nd/devices/dax0.0/memmap_state", "now\n")
        assert "store refused" in tb.log


def test_teardown_leaves_nothing(tmp_path) -> None:
    tb = Testbed(base_dir=tmp_path)
    with pytest.raises(RuntimeError, match="test failed"), tb:
        pid = tb.pid
        root, directory = tb.root, tb.dir
        workers = children_of(pid)
        assert len(workers) == 2 and is_mounted(root)
        raise RuntimeError("test failed")
    assert not is_mounted(root)
    assert not process_alive(pid) and not any(process_alive(w) for w in workers)
    assert not directory.exists()
    tb.stop()  # idempotent
    with pytest.raises(TestbedError, match="not started"):
        tb.root  # noqa: B018


def test_teardown_under_an_open_device_file_kills_nothing(tmp_path) -> None:
    """By `vnvdimm umount`'s rules: a device file still open at teardown (inside the emulated
    namespace here) is served until it is closed; stop() names it and keeps the files."""
    tb = Testbed(SMALL_TOML, base_dir=tmp_path).start()
    pid, directory = tb.pid, tb.dir
    service = tb.spawn(["python3", "-c", "import os, sys; fd = os.open('/dev/dax0.0', os.O_RDWR); "
                        "print('open', flush=True); sys.stdin.readline(); os.pwrite(fd, b'last words', 0)"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert service.stdout is not None and service.stdout.readline() == "open\n"
        with pytest.raises(TestbedError, match=r"/dev/dax0.0: open by pid \d+"):
            tb.stop()
        assert process_alive(pid) and directory is not None and directory.exists()
        service.communicate("go\n", timeout=30)
        assert service.returncode == 0  # its write after the teardown was still served
        assert wait_exit(pid, 10), "the daemon outlived the last open file"
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
    media = sorted((directory / "state").glob("region*.media"))
    assert media and any(b"last words" in m.read_bytes() for m in media)
    shutil.rmtree(directory)


def test_factory_fixture(vnvdimm_testbed_factory) -> None:
    a = vnvdimm_testbed_factory(SMALL_TOML)
    b = vnvdimm_testbed_factory()
    assert a.root != b.root
    assert a.ndctl("list", "-N")[0]["mode"] == "devdax"
    assert {ns["mode"] for ns in b.ndctl("list", "-N")} == {"fsdax", "devdax"}


def test_plugin_is_registered_for_other_projects(tmp_path) -> None:
    """A project that only installed vnvdimm gets the fixtures (pytest11 entry point)."""
    test = tmp_path / "test_user.py"
    test.write_text(textwrap.dedent("""\
        import pytest

        @pytest.mark.vnvdimm_topology({"region": [{"size": "256M", "namespace": {"mode": "sector"}}]})
        def test_sector(vnvdimm_testbed):
            (ns,) = vnvdimm_testbed.ndctl("list", "-N")
            assert ns["mode"] == "sector" and ns["blockdev"] == "pmem0s"
        """))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test),
                          f"--basetemp={tmp_path / 'bt'}"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=clean_env())
    assert "1 passed" in res.stdout, res.stdout + res.stderr
    plugins = subprocess.run([sys.executable, "-c", "from importlib.metadata import entry_points; "
                              "import json; print(json.dumps([e.value for e in entry_points(group='pytest11')]))"],
                             capture_output=True, text=True, timeout=60)
    assert "vnvdimm.pytest_plugin" in json.loads(plugins.stdout)


def test_memmap_paused_starts_held_and_moves_to_exact_fractions(tmp_path) -> None:
    """A bed made with memmap_paused holds every memmap at 0 from its start, even a fast one
    (no ns_per_page floor: a pause set after the mount would come too late), and
    pause_memmap(at=F) moves them to F: past it by less than one align block, not by a run."""
    with Testbed(base_dir=tmp_path, memmap_paused=True) as tb:
        devices = ["pmem0", "dax1.0"]
        for dev in devices:
            mm = tb.memmap(dev)
            assert (mm.state, mm.pages_done) == ("active", 0), mm
        for at in (0.5, 0.75):
            tb.pause_memmap(at=at, wait=True, timeout=60)
            for dev in devices:
                mm = tb.memmap(dev)
                block = 512  # the namespaces' 2 MiB align, in pages
                assert mm.state == "active", mm
                assert at * mm.pages_total <= mm.pages_done < at * mm.pages_total + block, (at, mm)
        tb.resume_memmap()
        assert tb.wait_memmap(timeout=60)
        assert all(tb.memmap(dev).state == "idle" for dev in devices)
    with pytest.raises(TestbedError, match="memmap_paused"):
        Testbed("[memmap]\nworkers = 1\n", memmap_paused=True)
