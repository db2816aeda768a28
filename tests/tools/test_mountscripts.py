"""The shell integration end to end: vnvdimm-wait-memmap, the mount(8) helper, the systemd
unit (verified by systemd-analyze, its commands run as systemd runs a Type=forking service),
and the install script."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mount_kit import memmap_state
from tooltest import SCRIPTS, SLOW_E820, clean_env, hold_memmap, holder, memmap_progress, release_memmap

from vnvdimm.mounts import lazy_unmount, mount_entry, process_alive, vnvdimm_processes, wait_exit

WAIT = SCRIPTS / "vnvdimm-wait-memmap"
HELPER = SCRIPTS / "mount.fuse.vnvdimm"
UNIT = SCRIPTS / "vnvdimm@.service"
INSTALL = SCRIPTS / "install"
WITH = SCRIPTS / "with-vnvdimm"


def sh(*argv: object, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                          env=env or clean_env())


def vnvdimm_wrapper(tmp_path: Path) -> Path:
    """A `vnvdimm` command that runs this checkout with this interpreter."""
    path = tmp_path / "bin" / "vnvdimm"
    path.parent.mkdir(exist_ok=True)
    repo = SCRIPTS.parent
    path.write_text(f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(repo))} exec {shlex.quote(sys.executable)} "
                    f"-m vnvdimm.cli \"$@\"\n")
    path.chmod(0o755)
    return path


def fuse_mounted(path: Path) -> str | None:
    entry = mount_entry(path)
    return entry.fstype if entry else None


def wait_gone(pid: int, timeout: float = 15) -> bool:
    return wait_exit(pid, timeout)


@pytest.mark.parametrize("script", [WAIT, HELPER, INSTALL, WITH])
def test_help(script: Path) -> None:
    res = sh(script, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(script.name + " ") or res.stdout.startswith(f"mountscripts/{script.name} ")
    assert len(res.stdout.splitlines()) >= 3


# ---------------------------------------------------------------- vnvdimm-wait-memmap


def test_wait_memmap_script(slow_mnt) -> None:
    m = slow_mnt
    assert sh(WAIT, "--sysfs", m.root, "--timeout", "30").returncode == 0  # a mount point works too
    pfn = holder(m, "namespace0.0")
    hold_memmap(m, pfn, 300)
    try:
        t0 = time.monotonic()
        res = sh(WAIT, "--sysfs", m.sys, "--timeout", "0.6", "pmem0", "namespace0.0")
        assert res.returncode == 1
        assert 0.6 <= time.monotonic() - t0 < 10
        assert res.stderr.strip() == f"vnvdimm-wait-memmap: timed out after 0.6 s; still active: {pfn}"
        # A dax device file resolves to its own memmap (held or not: the pool is shared), never pmem0's.
        dax = holder(m, "namespace1.0")
        dax_state = memmap_state(m.root, dax)  # held: cannot change until the release
        res = sh(WAIT, "--sysfs", m.sys, "--timeout", "0.2", "/dev/dax1.0")
        assert pfn not in res.stderr
        assert (res.returncode, dax in res.stderr) == ((1, True) if dax_state == "active" else (0, False)), \
            (dax_state, res.returncode, res.stderr)
        # Inside the emulated namespace the default /sys is the emulated one.
        proc = subprocess.Popen([WITH, m.root, "--", WAIT, "--timeout", "30", "--interval", "0.05"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(0.5)
        release_memmap(m, pfn)
        out, err = proc.communicate(timeout=30)
        assert (proc.returncode, out, err) == (0, "", "")
        assert memmap_progress(m, pfn)[0] == "idle"
    finally:
        release_memmap(m, pfn)


def test_wait_memmap_script_errors(mnt, tmp_path) -> None:
    res = sh(WAIT, "--sysfs", mnt.root, "pmem7")
    assert res.returncode == 2 and "pmem7: no such device" in res.stderr
    res = sh(WAIT, "--sysfs", tmp_path)
    assert res.returncode == 2 and "no nvdimm bus" in res.stderr
    res = sh(WAIT, "--sysfs", mnt.root, "--timeout", "soon")
    assert res.returncode == 2 and "--timeout needs a number" in res.stderr
    res = sh(WAIT, "--bogus")
    assert res.returncode == 2


# ---------------------------------------------------------------- mount.fuse.vnvdimm


@pytest.fixture
def sbin_helper():
    """/sbin/mount.fuse.vnvdimm -> this checkout's helper, for the test only."""
    link = Path("/sbin/mount.fuse.vnvdimm")
    if os.path.lexists(link):
        if os.path.realpath(link) != str(HELPER.resolve()):
            pytest.skip(f"{link} exists and is not this checkout's helper")
        yield link
        return
    if not os.access("/sbin", os.W_OK):
        pytest.skip("/sbin is not writable")
    link.symlink_to(HELPER.resolve())
    try:
        yield link
    finally:
        link.unlink()


def test_mount_t_fuse_vnvdimm(sbin_helper, tmp_path) -> None:
    config = tmp_path / "lab.toml"
    config.write_text(SLOW_E820.replace("ns_per_page = 20000", "ns_per_page = 0"))
    mnt, state = tmp_path / "mnt", tmp_path / "state"
    mnt.mkdir()
    env = clean_env(VNVDIMM=str(vnvdimm_wrapper(tmp_path)))
    pid = None
    try:
        res = sh("mount", "-t", "fuse.vnvdimm", config, mnt, "-o", f"state_dir={state},workers=1,nofail", env=env)
        assert res.returncode == 0, res.stderr
        assert fuse_mounted(mnt) == "fuse.vnvdimm"
        pid = int((state / "lock").read_text().split()[0])
        assert process_alive(pid)
        assert (mnt / "sys/bus/nd/devices/pfn0.1/memmap/workers").read_text() == "1\n"
        res = sh(WITH, mnt, "--", "ndctl", "list", "-N")
        assert res.returncode == 0 and '"blockdev":"pmem0"' in res.stdout
        res = sh("umount", mnt)
        assert res.returncode == 0, res.stderr
        assert fuse_mounted(mnt) is None
        assert wait_gone(pid), "the daemon outlived its mount"
    finally:
        if fuse_mounted(mnt):
            lazy_unmount(mnt)
        if pid and not wait_gone(pid, 5):
            os.kill(pid, 9)


def test_mount_helper_refuses_and_fakes(sbin_helper, tmp_path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = clean_env(VNVDIMM=str(vnvdimm_wrapper(tmp_path)))
    res = sh("mount", "-t", "fuse.vnvdimm", "none", mnt, "-o", "bogus=1", env=env)
    assert res.returncode != 0 and "unknown option bogus=1" in res.stderr
    res = sh("mount", "-t", "fuse.vnvdimm", tmp_path / "missing.toml", mnt, env=env)
    assert res.returncode != 0 and "no such topology file" in res.stderr
    assert fuse_mounted(mnt) is None
    # The helper called directly, as mount(8) calls it; -f only shows the command.
    res = sh(HELPER, "none", mnt, "-f", "-o", "rw,allow_other,workers=3,x-systemd.automount", env=env)
    assert res.returncode == 0
    assert res.stderr.strip() == (f"mount.fuse.vnvdimm: {env['VNVDIMM']} mount {mnt} "
                                  "--state-dir /var/lib/vnvdimm/default --allow-other --workers 3")
    assert fuse_mounted(mnt) is None


def test_mount_helper_linked_by_hand_from_a_checkout_finds_its_venv(tmp_path) -> None:
    """`ln -s CHECKOUT/mountscripts/mount.fuse.vnvdimm /sbin/` after the README's quick start
    (a .venv in the checkout), with no VNVDIMM and no vnvdimm on mount(8)'s PATH: the helper
    runs the checkout's .venv/bin/vnvdimm and the platform mounts."""
    checkout = tmp_path / "checkout"
    (checkout / "mountscripts").mkdir(parents=True)
    shutil.copy2(HELPER, checkout / "mountscripts" / HELPER.name)
    venv_bin = checkout / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    vnvdimm_wrapper(tmp_path).rename(venv_bin / "vnvdimm")
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    (sbin / HELPER.name).symlink_to(checkout / "mountscripts" / HELPER.name)
    mnt, state = tmp_path / "mnt", tmp_path / "state"
    mnt.mkdir()
    env = clean_env()
    env.pop("VNVDIMM", None)
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    if shutil.which("vnvdimm", path=env["PATH"]) is not None:
        pytest.skip("a vnvdimm command is on the system PATH: the helper would run that one")
    res = sh(sbin / HELPER.name, "none", mnt, "-v", "-o", f"state_dir={state},workers=1", env=env)
    try:
        assert res.returncode == 0, res.stderr
        assert f"mount.fuse.vnvdimm: {venv_bin / 'vnvdimm'} mount {mnt}" in res.stderr, res.stderr
        assert fuse_mounted(mnt) == "fuse.vnvdimm"
    finally:
        sh(venv_bin / "vnvdimm", "umount", mnt, env=env)
        if fuse_mounted(mnt):
            lazy_unmount(mnt)


# ---------------------------------------------------------------- the systemd unit


def unit_service_section(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_systemd_unit_verifies(tmp_path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    dest = tmp_path / "dest"
    res = sh(INSTALL, "--destdir", dest, "--vnvdimm", vnvdimm_wrapper(tmp_path))
    assert res.returncode == 0, res.stderr
    unit = tmp_path / "vnvdimm@lab.service"
    shutil.copy(dest / "etc/systemd/system/vnvdimm@.service", unit)
    # (--man=no: its man:vnvdimm(1) is installed under the test's destdir, not on the MANPATH;
    # test_install_and_uninstall checks that it is installed)
    res = sh("systemd-analyze", "verify", "--man=no", unit)
    assert res.returncode == 0, res.stderr + res.stdout


def test_systemd_unit_runs_as_a_forking_service(tmp_path) -> None:
    """ExecStartPre, ExecStart, PIDFile, ExecStop, with %i and the paths pointed into tmp_path:
    when ExecStart returns the mount answers and PIDFile names the daemon; ExecStop ends it, or
    refuses while a device file is open (then SIGTERM detaches and the daemon serves it)."""
    wrapper = vnvdimm_wrapper(tmp_path)
    etc, run, var = tmp_path / "etc", tmp_path / "run", tmp_path / "var"
    (etc / "vnvdimm").mkdir(parents=True)
    (etc / "vnvdimm" / "lab.toml").write_text(SLOW_E820)
    service = unit_service_section(UNIT.read_text())
    assert service["Type"] == ["forking"]

    def expand(value: str) -> list[str]:
        value = (value.replace("%i", "lab").replace("/usr/local/bin/vnvdimm ", f"{wrapper} ")
                 .replace("/etc/vnvdimm", str(etc / "vnvdimm")).replace("/run/vnvdimm", str(run / "vnvdimm"))
                 .replace("/var/lib/vnvdimm", str(var / "vnvdimm")))
        return shlex.split(value)

    (var / "vnvdimm" / "lab").mkdir(parents=True)  # StateDirectory=
    mnt = run / "vnvdimm" / "lab"
    pid = None
    try:
        for cmd in service["ExecStartPre"]:
            assert subprocess.run(expand(cmd), timeout=30).returncode == 0
        (start,) = service["ExecStart"]
        res = subprocess.run(expand(start), capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        # Ready when the start command returned: the mount answers at once.
        assert (mnt / "sys/bus/nd/devices/ndbus0").exists()
        (pidfile,) = expand(service["PIDFile"][0])
        pid = int(Path(pidfile).read_text().split()[0])
        assert process_alive(pid)
        assert pid in vnvdimm_processes(mnt, "daemon")
        assert os.getsid(pid) == pid  # the daemon runs in its own session, as a forking service must
        (stop,) = service["ExecStop"]
        # A stop with a device file open: ExecStop refuses, naming it, and the SIGTERM systemd
        # sends next (never a SIGKILL) detaches the mount; the daemon serves the file until it
        # is closed, then exits.
        assert service["SendSIGKILL"] == ["no"]
        fd = os.open(mnt / "dev/pmem0", os.O_RDWR)
        try:
            res = subprocess.run(expand(stop), capture_output=True, text=True, timeout=60)
            assert res.returncode == 1 and "/dev/pmem0: open by pid" in res.stderr, res.stderr
            assert fuse_mounted(mnt) == "fuse.vnvdimm"
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while fuse_mounted(mnt) is not None:
                assert time.monotonic() < deadline, "SIGTERM did not detach the mount"
                time.sleep(0.02)
            assert process_alive(pid)
            os.fsync(fd)  # still served
        finally:
            os.close(fd)
        assert wait_gone(pid)
        # Nothing open: ExecStop unmounts and the daemon exits.
        res = subprocess.run(expand(start), capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        pid = int(Path(pidfile).read_text().split()[0])
        assert subprocess.run(expand(stop), capture_output=True, timeout=60).returncode == 0
        assert fuse_mounted(mnt) is None
        assert wait_gone(pid)
    finally:
        if fuse_mounted(mnt):
            lazy_unmount(mnt)
        if pid and not wait_gone(pid, 5):
            os.kill(pid, 9)


# ---------------------------------------------------------------- install


def test_install_and_uninstall(tmp_path) -> None:
    dest = tmp_path / "dest"
    wrapper = vnvdimm_wrapper(tmp_path)
    res = sh(INSTALL, "--destdir", dest, "--prefix", "/opt/vn", "--vnvdimm", wrapper)
    assert res.returncode == 0, res.stderr
    for rel in ("opt/vn/bin/with-vnvdimm", "opt/vn/bin/vnvdimm-wait-memmap", "sbin/mount.fuse.vnvdimm"):
        assert os.access(dest / rel, os.X_OK), rel
    unit = (dest / "etc/systemd/system/vnvdimm@.service").read_text()
    assert f"ExecStart={wrapper} mount /run/vnvdimm/%i" in unit
    assert f"ExecStop={wrapper} umount /run/vnvdimm/%i" in unit
    assert "/opt/vn/bin/vnvdimm-wait-memmap" in unit
    helper = (dest / "sbin/mount.fuse.vnvdimm").read_text()
    assert f"vnvdimm=${{VNVDIMM:-{wrapper}}}" in helper
    # The unit's documentation is what was installed with it.
    (documentation,) = [line for line in unit.splitlines() if line.startswith("Documentation=")]
    for uri in documentation.removeprefix("Documentation=").split():
        if uri.startswith("file://"):
            assert uri.startswith("file:///opt/vn/share/doc/vnvdimm/"), uri
            assert (dest / uri.removeprefix("file:///")).is_file(), uri
    assert (dest / "opt/vn/share/doc/vnvdimm/README.md").is_file()
    assert "man:vnvdimm(1)" in documentation.removeprefix("Documentation=").split()
    assert (dest / "opt/vn/share/man/man1/vnvdimm.1").read_text().startswith(".TH VNVDIMM 1 ")
    assert "complete -F _vnvdimm vnvdimm" in (dest / "opt/vn/share/bash-completion/completions/vnvdimm").read_text()
    assert sh(dest / "opt/vn/bin/vnvdimm-wait-memmap", "--help").returncode == 0
    res = sh(INSTALL, "--destdir", dest, "--prefix", "/opt/vn", "--uninstall")
    assert res.returncode == 0
    assert not (dest / "sbin/mount.fuse.vnvdimm").exists()
    assert not (dest / "etc/systemd/system/vnvdimm@.service").exists()
    assert not (dest / "opt/vn/bin/vnvdimm-wait-memmap").exists()
    assert not (dest / "opt/vn/share/doc/vnvdimm").exists()
    assert not (dest / "opt/vn/share/man/man1/vnvdimm.1").exists()
    assert not (dest / "opt/vn/share/bash-completion/completions/vnvdimm").exists()
