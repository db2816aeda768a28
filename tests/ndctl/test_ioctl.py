"""The ioctl surface through with-vnvdimm and the preload library, with the real ndctl,
daxctl and util-linux: device node types, block ioctls, health and SMART injection, the
health event `ndctl monitor` waits for, media error injection / scrub / clearing, firmware
update, and daxctl's device model."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from mount_kit import NFIT_BUS, WITH_VNVDIMM, have_ndctl, read, wait_for

from vnvdimm.ioctl import wire

pytestmark = [pytest.mark.ndctl, pytest.mark.skipif(not have_ndctl(), reason="needs ndctl and daxctl")]


@pytest.fixture(autouse=True)
def preload_block_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are of the preload library: /dev/pmemN as it presents them, not the loop
    devices with-vnvdimm binds over them as root."""
    monkeypatch.setenv("VNVDIMM_BLOCKDEVS", "0")


def sh(mnt, script: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return mnt.run("sh", "-c", script)


def ok(mnt, script: str) -> str:  # type: ignore[no-untyped-def]
    res = sh(mnt, script)
    assert res.returncode == 0, f"{script}: rc {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def test_emulated_nodes_are_device_nodes_with_their_sysfs_numbers(nfit_mnt) -> None:  # type: ignore[no-untyped-def]
    out = ok(nfit_mnt, "stat -c '%n %F %t:%T' /dev/ndctl0 /dev/nmem1 /dev/pmem0 /dev/null; "
                       "[ -b /dev/pmem0 ] && [ -c /dev/nmem1 ] && echo tests-agree")
    lines = out.splitlines()
    nodes = {line.split()[0]: (" ".join(line.split()[1:-1]), line.split()[-1]) for line in lines[:4]}

    def sysfs_dev(rel: str) -> str:
        major, minor = read(nfit_mnt.sys / rel / "dev").decode().split(":")
        return f"{int(major):x}:{int(minor):x}"

    assert nodes["/dev/ndctl0"] == ("character special file", sysfs_dev("class/nd/ndctl0"))
    assert nodes["/dev/nmem1"] == ("character special file", sysfs_dev(f"{NFIT_BUS}/nmem1"))
    assert nodes["/dev/pmem0"] == ("block special file", sysfs_dev("block/pmem0"))
    assert nodes["/dev/null"] == ("character special file", "1:3")  # a real node, left alone
    assert lines[4] == "tests-agree"
    # outside the preload library they are what the file system serves: regular files
    assert (nfit_mnt.dev / "pmem0").is_file()


def test_blockdev_reads_the_disk_geometry(nfit_mnt) -> None:  # type: ignore[no-untyped-def]
    # By its path: an ordinary user's PATH has no /sbin, but the ioctls work for them too.
    blockdev = shutil.which("blockdev", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if blockdev is None:
        pytest.skip("blockdev (util-linux) is not installed")
    out = ok(nfit_mnt, f"{blockdev} --getsize64 --getsz --getss --getpbsz --getro /dev/pmem0")
    sectors = int(read(nfit_mnt.sys / "block/pmem0/size"))
    assert out.split() == [str(sectors * 512), str(sectors), "512", "4096", "0"]


def health(mnt, dimm: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
    (entry,) = mnt.ndctl("list", "-DH", "-d", dimm)
    return entry["health"]  # type: ignore[no-any-return]


def test_list_health_shows_the_platform_defaults_and_injected_smart(nfit_mnt) -> None:  # type: ignore[no-untyped-def]
    h = health(nfit_mnt, "nmem0")
    assert h["health_state"] == "non-critical"
    assert (h["temperature_celsius"], h["controller_temperature_celsius"]) == (23.0, 25.0)
    assert (h["spares_percentage"], h["spares_threshold"], h["temperature_threshold"]) == (75, 5, 40.0)
    assert (h["life_used_percentage"], h["shutdown_state"], h["shutdown_count"]) == (5, "clean", 42)

    ok(nfit_mnt, "ndctl inject-smart nmem0 -m 52 -s 3 -f -U")
    h = health(nfit_mnt, "nmem0")
    assert h["health_state"] == "fatal"
    assert (h["temperature_celsius"], h["spares_percentage"]) == (52.0, 3)
    assert (h["shutdown_state"], h["shutdown_count"]) == ("dirty", 43)
    assert health(nfit_mnt, "nmem1")["health_state"] == "non-critical"  # one DIMM's firmware each

    ok(nfit_mnt, "ndctl inject-smart nmem0 -N")
    h = health(nfit_mnt, "nmem0")
    assert (h["health_state"], h["temperature_celsius"], h["spares_percentage"]) == ("non-critical", 23.0, 75)
    ok(nfit_mnt, "ndctl inject-smart nmem0 -M 60 -S 10")
    h = health(nfit_mnt, "nmem0")
    assert (h["temperature_threshold"], h["spares_threshold"]) == (60.0, 10)


def blocked_in_wait(pid: int) -> bool:
    """The process sits in epoll_wait/poll (its syscall number per /proc/PID/syscall)."""
    try:
        nr = Path(f"/proc/{pid}/syscall").read_text().split()[0]
    except (OSError, IndexError):
        return False
    return nr in ("7", "232", "271", "281")  # poll, epoll_wait, ppoll, epoll_pwait


def test_monitor_reports_a_dimm_health_event(nfit_mnt, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "monitor.log"
    proc = nfit_mnt_spawn(nfit_mnt, ["ndctl", "monitor", "-d", "nmem1", "-l", str(log)])
    try:
        wait_for(lambda: blocked_in_wait(proc.pid), 60, "ndctl monitor to wait for events")
        log.write_text("")  # its start-up lines
        ok(nfit_mnt, "ndctl inject-smart nmem1 -f")  # a fatal health state notifies the DIMM
        wait_for(lambda: log.read_text().strip() != "", 60, "the monitor's event line")
        event = json.loads(log.read_text().splitlines()[0])
        assert event["dimm"]["dev"] == "nmem1"
        assert event["dimm"]["health"]["health_state"] == "fatal"
        assert "dimm-health-state" in json.dumps(event["event"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def nfit_mnt_spawn(mnt, argv: list[str]) -> subprocess.Popen[str]:  # type: ignore[no-untyped-def]
    return subprocess.Popen([str(WITH_VNVDIMM), str(mnt.root), "--", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, text=True)


def status_blocks(mnt, ns: str) -> list[dict[str, int]]:  # type: ignore[no-untyped-def]
    res = mnt.run("ndctl", "inject-error", "--status", ns)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout).get("badblocks", []) if res.stdout.strip() else []  # type: ignore[no-any-return]


def test_inject_error_scrub_and_clear_by_write(nfit_mnt) -> None:  # type: ignore[no-untyped-def]
    """inject-error.sh's sequence: an error injected without notification is in the platform's
    list (--status) but not in badblocks until a scrub; --uninject removes it; a scrub makes an
    injected error a bad block (EIO on read); a write over it clears both."""
    ok(nfit_mnt, "ndctl inject-error --block=42 --count=8 --no-notify namespace0.0")
    assert status_blocks(nfit_mnt, "namespace0.0") == [{"block": 42, "count": 8}]
    assert read(nfit_mnt.sys / "block/pmem0/badblocks") == b""

    ok(nfit_mnt, "ndctl inject-error --block=42 --count=8 --uninject namespace0.0")
    assert status_blocks(nfit_mnt, "namespace0.0") == []

    ok(nfit_mnt, "ndctl inject-error --block=42 --count=8 --no-notify namespace0.0")
    scrub_before = int(read(nfit_mnt.sys / NFIT_BUS / "nfit/scrub"))
    ok(nfit_mnt, "ndctl start-scrub ndbus0 && ndctl wait-scrub ndbus0")
    assert int(read(nfit_mnt.sys / NFIT_BUS / "nfit/scrub")) == scrub_before + 1
    assert read(nfit_mnt.sys / "block/pmem0/badblocks") == b"42 8\n"
    res = sh(nfit_mnt, "dd if=/dev/pmem0 of=/dev/null bs=512 skip=44 count=1 iflag=direct")
    assert res.returncode != 0 and "Input/output error" in res.stderr

    ok(nfit_mnt, "dd if=/dev/zero of=/dev/pmem0 bs=512 count=8 seek=42 oflag=direct")
    assert read(nfit_mnt.sys / "block/pmem0/badblocks") == b""
    assert status_blocks(nfit_mnt, "namespace0.0") == []


def test_inject_error_with_notification_is_a_bad_block_at_once(nfit_mnt) -> None:  # type: ignore[no-untyped-def]
    ok(nfit_mnt, "ndctl inject-error --block=7 --count=2 namespace0.0")
    assert read(nfit_mnt.sys / "block/pmem0/badblocks") == b"7 2\n"
    (ns,) = nfit_mnt.ndctl("list", "-N", "-M", "-n", "namespace0.0")
    assert [(b["offset"], b["length"]) for b in ns["badblocks"]] == [(7, 2)]
    ok(nfit_mnt, "ndctl clear-errors namespace0.0")
    assert read(nfit_mnt.sys / "block/pmem0/badblocks") == b""
    assert status_blocks(nfit_mnt, "namespace0.0") == []


def test_vnvdimm_inject_error_is_a_front_end_of_the_same_platform(nfit_mnt) -> None:  # type: ignore[no-untyped-def]
    res = subprocess.run([sys.executable, "-m", "vnvdimm.cli", "inject-error", str(nfit_mnt.root), "namespace0.0",
                          "--block", "3", "--count", "1"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert read(nfit_mnt.sys / "block/pmem0/badblocks") == b"3 1\n"
    assert status_blocks(nfit_mnt, "namespace0.0") == [{"block": 3, "count": 1}]


def test_update_firmware(nfit_mnt, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "fw.img"
    image.write_bytes(os.urandom(1000))
    (before,) = nfit_mnt.ndctl("list", "-DF", "-d", "nmem2")
    assert before["firmware"]["current_version"] == 0 and "next_version" not in before["firmware"]
    res = nfit_mnt.run("ndctl", "update-firmware", "-f", str(image), "nmem2")
    assert res.returncode == 0, res.stderr
    (after,) = nfit_mnt.ndctl("list", "-DF", "-d", "nmem2")
    assert after["firmware"]["next_version"] == 0xFFFFFFFFABCD
    assert after["firmware"]["activate_state"] == "armed"  # staged and armed for activation
    # a second update must wait for the activation (or a power cycle): "already updated"
    res = nfit_mnt.run("ndctl", "update-firmware", "-f", str(image), "nmem2")
    assert res.returncode != 0


def firmware_states(out: str) -> list[str]:
    return [d["firmware"]["activate_state"] for d in json.loads(out)]


def test_firmware_arm_overflow_and_activation(nfit_mnt, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """firmware-update.sh's flow: the platform activates at most three DIMMs within its quiesce
    time, so the fourth arm trips "overflow" unless forced; disarm all; activate."""
    image = tmp_path / "fw.img"
    image.write_bytes(bytes(196608))
    (bus,) = nfit_mnt.ndctl("list", "-b", "ndbus0", "-F")
    assert bus["firmware"] == {"activate_method": "suspend", "activate_state": "idle"}
    res = nfit_mnt.run("ndctl", "update-firmware", "-b", "ndbus0", "-f", str(image), "all")
    assert sorted(firmware_states(res.stdout)) == ["armed", "armed", "armed", "idle"], res.stderr
    idle = next(d["dev"] for d in json.loads(res.stdout) if d["firmware"]["activate_state"] == "idle")
    assert firmware_states(ok(nfit_mnt, f"ndctl update-firmware -b ndbus0 {idle} -A --force")) == ["armed"]
    assert nfit_mnt.ndctl("list", "-b", "ndbus0", "-F")[0]["firmware"]["activate_state"] == "overflow"
    assert firmware_states(ok(nfit_mnt, "ndctl update-firmware -b ndbus0 -D all")) == ["idle"] * 4
    assert read(nfit_mnt.sys / NFIT_BUS / "firmware/activate") == b"idle\n"
    assert firmware_states(ok(nfit_mnt, "ndctl update-firmware -b ndbus0 -A --force all")) == ["armed"] * 4
    out = json.loads(ok(nfit_mnt, "ndctl activate-firmware -v ndbus0"))
    states = [d["firmware"]["activate_state"] for d in out[0]["dimms"]]
    assert states in (["idle"] * 4, ["busy"] * 4)
    # the platform reports the result once it is idle again (busy for three seconds): then
    # each DIMM's staged image is the running one
    results = {read(nfit_mnt.sys / NFIT_BUS / f"nmem{i}/firmware/result") for i in range(4)}
    busy = read(nfit_mnt.sys / NFIT_BUS / "firmware/activate") == b"busy\n"
    assert results == ({b"none\n"} if busy else {b"success\n"})


def test_daxctl_sees_the_dax_bus_device_model(mnt) -> None:  # type: ignore[no-untyped-def]
    ok(mnt, "[ -c /dev/dax1.0 ]")
    ok(mnt, "daxctl disable-device dax1.0")
    (dev,) = json.loads(ok(mnt, "daxctl list -i -d dax1.0"))
    assert dev["state"] == "disabled"
    assert not (mnt.sys / "bus/dax/devices/dax1.0/driver").exists()
    ok(mnt, "daxctl enable-device dax1.0")
    assert os.readlink(mnt.sys / "bus/dax/devices/dax1.0/driver").endswith("device_dax")
    out = ok(mnt, "daxctl reconfigure-device -m devdax -f dax1.0")
    assert json.loads(out)[0]["mode"] == "devdax"


MMAP_PROBE = """
import errno, json, mmap, os, sys
fd = os.open("/dev/dax1.0", os.O_RDWR)
out = {}
for name, length, flags, offset in [("private", 2 << 20, mmap.MAP_PRIVATE, 0),
                                    ("short", 4096, mmap.MAP_SHARED, 0),
                                    ("offset", 2 << 20, mmap.MAP_SHARED, 4096),
                                    ("aligned", 2 << 20, mmap.MAP_SHARED, 2 << 20)]:
    try:
        m = mmap.mmap(fd, length, flags, offset=offset)
        out[name] = m[:4].hex()
        m.close()
    except OSError as e:
        out[name] = errno.errorcode[e.errno]
print(json.dumps(out))
"""


def test_devdax_mmap_is_checked_as_check_vma_does(mnt) -> None:  # type: ignore[no-untyped-def]
    res = mnt.run(sys.executable, "-c", MMAP_PROBE)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"private": "EINVAL", "short": "EINVAL", "offset": "EINVAL",
                                      "aligned": "00000000"}


NFIT_TEST = 'template = "nfit_test"\n[memmap]\nworkers = 1\n'
ND_IOCTL_ARS_CAP, ND_IOCTL_ARS_START, ND_IOCTL_ARS_STATUS, ND_IOCTL_CLEAR_ERROR = (
    0xC0204E01, 0xC0204E02, 0xC0304E03, 0xC0204E04)


def test_ars_and_clear_error_on_the_bus_empty_the_region_badblocks(make_mount) -> None:  # type: ignore[no-untyped-def]
    """daxdev-errors' sequence on nfit_test.0: an error injected into a devdax namespace is in
    the region's badblocks (read through the platform device's place on the platform bus, as
    the test does); ARS_CAP / ARS_START / ARS_STATUS over it report the injected 256-byte
    ranges, CLEAR_ERROR of the whole range clears it all and the badblocks are empty."""
    nt = make_mount(NFIT_TEST)
    ok(nt, "ndctl disable-region -b nfit_test.0 all && ndctl init-labels -f -b nfit_test.0 all"
           " && ndctl enable-region -b nfit_test.0 all")
    ns = json.loads(ok(nt, "ndctl create-namespace -b nfit_test.0 -r region1 -m devdax -a 4096 2>/dev/null"))
    ok(nt, f"ndctl inject-error --block={ns['size'] // 512 // 2} --count=8 {ns['dev']}")
    platform = nt.sys / "bus/platform/devices/nfit_test.0"
    assert os.readlink(platform) == "../../../devices/platform/nfit_test.0"
    assert os.readlink(platform / "subsystem") == "../../../bus/platform"
    offset, count = map(int, read(platform / "ndbus0/region1/badblocks").split())
    assert count == 8
    start = int(read(nt.sys / "bus/nd/devices/region1/resource"), 16) + offset * 512
    sock = os.getxattr(nt.dev / "ndctl0", "user.vnvdimm").decode().split()[4]

    cap = bytearray(struct.pack("<QQ", start, count * 512) + bytes(16))
    assert wire.call(sock, nt.dev / "ndctl0", ND_IOCTL_ARS_CAP, cap) == wire.Result(0, 0)
    max_ars_out, clear_unit = struct.unpack_from("<II", cap, 20)
    assert clear_unit == 256
    start_cmd = bytearray(struct.pack("<QQHB5x", start, count * 512, 2, 0) + bytes(8))
    assert wire.call(sock, nt.dev / "ndctl0", ND_IOCTL_ARS_START, start_cmd) == wire.Result(0, 0)
    status = bytearray(max_ars_out)
    struct.pack_into("<I", status, 4, max_ars_out)  # out_length, as libndctl sets it
    assert wire.call(sock, nt.dev / "ndctl0", ND_IOCTL_ARS_STATUS, status) == wire.Result(0, 0)
    nrecs = struct.unpack_from("<I", status, 44)[0]
    records = [struct.unpack_from("<QQ", status, 48 + i * 24 + 8) for i in range(nrecs)]
    # libndctl injects block by block, each clamped to the clear unit
    assert records == [(start + i * 512, 256) for i in range(8)]

    clear = bytearray(struct.pack("<QQ", start, count * 512) + bytes(16))
    assert wire.call(sock, nt.dev / "ndctl0", ND_IOCTL_CLEAR_ERROR, clear) == wire.Result(0, 0)
    assert struct.unpack_from("<Q", clear, 24)[0] == count * 512  # cleared
    assert read(platform / "ndbus0/region1/badblocks") == b""
    clear = bytearray(struct.pack("<QQ", start + 128, 256) + bytes(16))  # not in clear units
    assert wire.call(sock, nt.dev / "ndctl0", ND_IOCTL_CLEAR_ERROR, clear).errno == errno.EINVAL
