"""An ordinary user (created by the test: no sudo, no fuse group, no user_allow_other) mounts,
reads and writes attributes, runs ndctl through with-vnvdimm, uses status/wait/inject-error,
the test bed and the pytest fixture; root sees nothing of the mount; --allow-other is refused
with the reason.

The user runs the package under test through PYTHONPATH with a Python it can execute (a
copy of whatever it cannot read, e.g. a venv under /root): `pip install` into a venv of its
own would need the package index, which a test must not. /dev/fuse is made usable by that
user alone (an ACL, removed afterwards) where this machine does not give every user access as
a stock system does (0666).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mount_kit import SMALL_E820, WITH_VNVDIMM, fuse_mounts_under

from vnvdimm.mounts import lazy_unmount

# What `import vnvdimm` and the commands need, plus pytest for the fixture test.
PACKAGES = ("vnvdimm", "mfusepy", "numpy", "rich", "markdown_it", "mdurl", "pygments", "pytest", "_pytest",
            "pluggy", "iniconfig", "packaging", "pytest_timeout")

_ACL_XATTR = "system.posix_acl_access"


@dataclass
class User:
    name: str
    uid: int
    gid: int
    home: Path
    env: dict[str, str]
    python: str

    def run(self, *argv: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--",
                               "env", "-i", *(f"{k}={v}" for k, v in self.env.items()), *argv],
                              capture_output=True, text=True, timeout=timeout, cwd=cwd or self.home)

    def vnvdimm(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run(self.python, "-m", "vnvdimm.cli", *args, timeout=timeout)


def _readable_by(user: User, path: Path) -> bool:
    return user.run("test", "-r", str(path), timeout=30).returncode == 0


def _package_root(name: str) -> Path:
    module = importlib.import_module(name)
    file = Path(module.__file__ or "")
    return file.parent if file.name == "__init__.py" else file


def _grant_dev_fuse(uid: int) -> Iterator[None]:
    """Let `uid` open /dev/fuse for the duration (an ACL entry for that user only)."""
    st = os.stat("/dev/fuse")
    if st.st_mode & 0o006 == 0o006:
        yield
        return
    entries = [(0x01, (st.st_mode >> 6) & 7, 0xFFFFFFFF), (0x02, 6, uid), (0x04, (st.st_mode >> 3) & 7, 0xFFFFFFFF),
               (0x10, 6, 0xFFFFFFFF), (0x20, st.st_mode & 7, 0xFFFFFFFF)]
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    had = None
    with contextlib.suppress(OSError):
        had = os.getxattr("/dev/fuse", _ACL_XATTR)
    os.setxattr("/dev/fuse", _ACL_XATTR, acl)
    try:
        yield
    finally:
        if had is not None:
            os.setxattr("/dev/fuse", _ACL_XATTR, had)
        else:
            with contextlib.suppress(OSError):
                os.removexattr("/dev/fuse", _ACL_XATTR)
        os.chmod("/dev/fuse", stat.S_IMODE(st.st_mode))


def _kill_processes_of(uid: int) -> None:
    """The test user's processes (all started by this test), by pid."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    os.kill(int(pid), signal.SIGKILL)


@pytest.fixture(scope="module")
def user() -> Iterator[User]:
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("useradd", "userdel", "setpriv", "fusermount3")):
        pytest.skip("needs root, useradd, setpriv and fusermount3 to create an unprivileged user")
    home = Path(tempfile.mkdtemp(prefix="vnvdimm-rootless-"))
    home.chmod(0o755)
    name = f"vnvdimm-rl-{secrets.token_hex(4)}"
    res = subprocess.run(["useradd", "--no-create-home", "--home-dir", str(home), "--shell", "/bin/sh",
                          "--user-group", name], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    try:
        pw = pwd.getpwnam(name)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        env = {"HOME": str(home), "USER": name, "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LANG": "C.UTF-8", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
        u = User(name, pw.pw_uid, pw.pw_gid, home, env, "")
        version = f"python{sys.version_info[0]}.{sys.version_info[1]}"  # the same ABI as the packages
        candidates = (os.path.realpath(sys.executable), f"/usr/bin/{version}", f"/usr/local/bin/{version}")
        usable = [p for p in candidates if os.path.exists(p) and u.run(p, "-c", "pass", timeout=30).returncode == 0]
        assert usable, f"no {version} the user {name} can run among {candidates}"
        u.python = usable[0]
        # The packages where they are if the user can read them, else a copy it can.
        copies = home / "site"
        paths = []
        for package in PACKAGES:
            if importlib.util.find_spec(package) is None:
                continue
            root = _package_root(package)
            if not _readable_by(u, root):
                copies.mkdir(exist_ok=True)
                target = copies / root.name
                (shutil.copytree if root.is_dir() else shutil.copy2)(root, target)  # type: ignore[operator]
                # a wheel's vendored shared libraries sit beside the package (numpy.libs)
                libs = root.parent / f"{root.name}.libs"
                if libs.is_dir():
                    shutil.copytree(libs, copies / libs.name)
                root = target
            paths.append(str(root.parent))
        subprocess.run(["chown", "-R", f"{pw.pw_uid}:{pw.pw_gid}", str(home)], check=True)
        u.env["PYTHONPATH"] = ":".join(dict.fromkeys(paths))
        assert u.run("id", "-u").stdout.strip() == str(pw.pw_uid)
        with contextlib.contextmanager(_grant_dev_fuse)(pw.pw_uid):
            yield u
    finally:
        for m in fuse_mounts_under(home):
            lazy_unmount(m)
        with contextlib.suppress(KeyError):
            uid = pwd.getpwnam(name).pw_uid
            _kill_processes_of(uid)
            shutil.rmtree(f"/tmp/vnvdimm-{uid}", ignore_errors=True)  # its runtime dir (mount records)
        subprocess.run(["userdel", name], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def user_mount(user: User) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="case-", dir=user.home))
    (root / "mnt").mkdir()
    (root / "topology.toml").write_text(SMALL_E820)
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(root)], check=True)
    res = user.vnvdimm("mount", str(root / "mnt"), "--config", str(root / "topology.toml"),
                       "--state-dir", str(root / "state"))
    assert res.returncode == 0, res.stderr
    try:
        yield root / "mnt"
    finally:
        user.vnvdimm("umount", str(root / "mnt"))
        if str(root / "mnt") in fuse_mounts_under(root):
            lazy_unmount(root / "mnt")


def test_user_mounts_and_writes_what_root_may(user: User, user_mount: Path) -> None:
    pfn = user_mount / "sys/bus/nd/devices/pfn0.1"
    # The user owns everything, so the kernel's modes let them do what they let root do.
    res = user.run("stat", "-c", "%u %a", str(pfn / "memmap_state"), str(pfn / "resource"),
                   str(user_mount / "dev/pmem0"))
    assert res.stdout.split("\n")[:3] == [f"{user.uid} 644", f"{user.uid} 400", f"{user.uid} 600"], res.stderr
    res = user.run("sh", "-c", f"echo 20000 > {pfn}/memmap/ns_per_page && cat {pfn}/memmap/ns_per_page && "
                               f"echo sync > {pfn}/memmap_state && cat {pfn}/memmap_state && cat {pfn}/resource")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["20000", "idle"]
    # What no one may write stays refused (0444), as for root on the kernel.
    res = user.run("sh", "-c", f"echo 1 > {pfn}/size")
    assert res.returncode != 0 and "Permission denied" in res.stderr
    # Root, here just another user of the machine, sees nothing of it (no allow_other).
    with pytest.raises(PermissionError):
        os.stat(user_mount / "sys")
    # ... and vnvdimm's tools, run by root, say why and what to do, without a traceback.
    for command in (["status", str(user_mount)], ["wait", str(user_mount), "--timeout", "1"]):
        res = subprocess.run([sys.executable, "-m", "vnvdimm.cli", *command], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert f"{user_mount} is mounted by {user.name} (uid {user.uid}) without --allow-other" in res.stderr
        assert "root included" in res.stderr and "run this as that user" in res.stderr


def test_user_runs_ndctl_and_the_tools(user: User, user_mount: Path) -> None:
    res = user.run(str(WITH_VNVDIMM), str(user_mount), "--", "sh", "-c",
                   "id -u && echo x > /dev/null && ndctl create-namespace -e namespace1.0 -m fsdax -f && "
                   "test -s /lib/modules/$(uname -r)/modules.dep.bin")
    assert res.returncode == 0, res.stderr
    assert "with-vnvdimm" not in res.stderr  # the platform's /lib/modules laid over the host's there too
    uid, created = res.stdout.split("\n", 1)
    assert uid == "0"  # root inside the user namespace
    assert json.loads(created)["mode"] == "fsdax"
    res = user.run(str(WITH_VNVDIMM), str(user_mount), "--", "ndctl", "list", "-N")
    assert {ns["dev"]: ns["mode"] for ns in json.loads(res.stdout)} == {"namespace0.0": "fsdax",
                                                                         "namespace1.0": "fsdax"}
    res = user.vnvdimm("wait", str(user_mount), "--timeout", "60")
    assert res.returncode == 0, res.stderr
    res = user.vnvdimm("inject-error", str(user_mount), "namespace0.0", "--block", "8", "--count", "2")
    assert res.returncode == 0, res.stderr
    res = user.vnvdimm("inject-error", str(user_mount), "namespace0.0", "--status")
    assert json.loads(res.stdout)["badblocks"] == [{"block": 8, "count": 2}]
    res = user.vnvdimm("status", str(user_mount), "--json")
    assert res.returncode == 0 and "namespace1.0" in res.stdout, res.stderr


def test_user_ioctls_reach_their_own_daemon(user: User, user_mount: Path) -> None:
    """The library trusts the user's daemon (the mount's owner, root in the user namespace)
    and the daemon the user's client: a block ioctl answers with the disk's size."""
    blockdev = shutil.which("blockdev") or "/sbin/blockdev"
    res = user.run(str(WITH_VNVDIMM), str(user_mount), "--", blockdev, "--getsize64", "/dev/pmem0")
    assert res.returncode == 0, res.stderr
    sectors = int(user.run("cat", str(user_mount / "sys/block/pmem0/size")).stdout)
    assert int(res.stdout) == sectors * 512


FLOOD = r"""
import os, resource, socket, sys
path = os.getxattr(sys.argv[1], "user.vnvdimm").decode().split()[4]
daemon, tasks = int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.prlimit(daemon, resource.RLIMIT_NPROC)
resource.prlimit(daemon, resource.RLIMIT_NPROC, (max(tasks - 1, 1), hard))  # no thread more
held, dropped = [], 0
for _ in range(40):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
    except OSError:
        continue  # the backlog is full
    held.append(s)
for s in held:
    s.settimeout(1)  # a served connection waits 5 s for its request; a dropped one ends now
    try:
        dropped += s.recv(1) == b""  # the daemon closed it: no thread to serve it
    except OSError:
        pass
    s.close()
resource.prlimit(daemon, resource.RLIMIT_NPROC, (soft, hard))
print(dropped)
"""


def test_a_connection_flood_under_the_users_process_limit(user: User, user_mount: Path) -> None:
    """The user's daemon cannot start one more thread (RLIMIT_NPROC reached) while a flood
    of connections comes: each one is dropped, the accept loop lives on, and once the limit
    is lifted an ioctl answers. (The daemon used to lose its accept thread for good.)"""
    pid = int((user_mount.parent / "state/lock").read_text().split()[0])
    tasks = sum(1 for proc in Path("/proc").glob("[0-9]*/task/*")
                if proc.exists() and proc.stat().st_uid == user.uid)
    res = user.run(user.python, "-c", FLOOD, str(user_mount / "dev/pmem0"), str(pid), str(tasks))
    assert res.returncode == 0, res.stderr
    assert int(res.stdout) > 0  # the limit bit: connections went unserved
    blockdev = shutil.which("blockdev") or "/sbin/blockdev"
    res = user.run(str(WITH_VNVDIMM), str(user_mount), "--", blockdev, "--getsize64", "/dev/pmem0")
    assert res.returncode == 0, res.stderr
    assert int(res.stdout) > 0


def test_allow_other_is_refused_with_the_reason(user: User) -> None:
    with open("/etc/fuse.conf") as f:
        if any(line.strip() == "user_allow_other" for line in f):
            pytest.skip("this machine's /etc/fuse.conf lets users mount with allow_other")
    root = Path(tempfile.mkdtemp(prefix="case-", dir=user.home))
    (root / "mnt").mkdir()
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(root)], check=True)
    res = user.vnvdimm("mount", str(root / "mnt"), "--state-dir", str(root / "state"), "--allow-other")
    assert res.returncode != 0
    assert "user_allow_other" in res.stderr and "/etc/fuse.conf" in res.stderr and "Traceback" not in res.stderr
    assert "not even root" in res.stderr  # a user's mount is closed to root too (the kernel's FUSE rule)
    assert fuse_mounts_under(root) == [] and not (root / "state").exists()


TESTBED_SCRIPT = """
from vnvdimm.testbed import Testbed
with Testbed({"memmap": {"workers": 2}, "region": [{"size": "64M", "namespace": {"mode": "fsdax"}}]}) as tb:
    listed = tb.ndctl("list", "-N")
    print((listed[0] if isinstance(listed, list) else listed)["mode"])
    # Inside the bed's namespaces: the emulated /sys, and root (of the user namespace).
    inside = tb.call(lambda: (open("/sys/bus/nd/devices/namespace0.0/holder").read(), __import__("os").getuid()))
    print(inside == (tb.read("sys/bus/nd/devices/namespace0.0/holder"), 0), inside[0].strip())
    root = tb.root
print(root.exists())
"""

FIXTURE_TEST = """
def test_uses_the_fixture(vnvdimm_testbed):
    assert sorted(ns["mode"] for ns in vnvdimm_testbed.ndctl("list", "-N")) == ["devdax", "fsdax"]
"""


def test_user_runs_the_test_bed_and_the_fixture(user: User) -> None:
    res = user.run(user.python, "-c", TESTBED_SCRIPT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:3] == ["fsdax", "True pfn0.1", "False"]
    case = Path(tempfile.mkdtemp(prefix="case-", dir=user.home))
    (case / "test_fixture.py").write_text(FIXTURE_TEST)
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(case)], check=True)
    # --basetemp under the user's home (removed with it), not /tmp/pytest-of-<user>
    res = user.run(user.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "vnvdimm.pytest_plugin",
                   "-rs", f"--basetemp={case / 'tmp'}", "test_fixture.py", cwd=case)
    assert res.returncode == 0 and "1 passed" in res.stdout and "skipped" not in res.stdout, res.stdout + res.stderr


def test_a_refused_mount_says_why_in_fusermount3s_words(user: User) -> None:
    """A mount point the user may not write: fusermount3's own reason reaches the user (it was
    'error: 4'), with what to do, and nothing is left mounted."""
    root = Path(tempfile.mkdtemp(prefix="case-", dir=user.home))
    subprocess.run(["chown", f"{user.uid}:{user.gid}", str(root)], check=True)
    (root / "mnt").mkdir(mode=0o755)  # root's
    res = user.vnvdimm("mount", str(root / "mnt"), "--state-dir", str(root / "state"))
    assert res.returncode != 0 and fuse_mounts_under(root) == []
    assert "fusermount3: " in res.stderr and "mount on a directory you own" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "error: 4" not in res.stderr


def test_a_runtime_dir_taken_by_someone_else_is_refused(user: User) -> None:
    """Mount records go to $XDG_RUNTIME_DIR/vnvdimm (else /tmp/vnvdimm-UID/vnvdimm, a name
    anyone can take first): one that another user owns is refused, nothing written into it."""
    root = Path(tempfile.mkdtemp(prefix="case-", dir=user.home))
    (root / "mnt").mkdir()
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(root)], check=True)
    taken = root / "run" / "vnvdimm"
    taken.mkdir(parents=True)
    taken.chmod(0o777)  # root's, open to all: as a stranger would leave it
    res = user.run("env", f"XDG_RUNTIME_DIR={root / 'run'}", user.python, "-m", "vnvdimm.cli", "mount",
                   str(root / "mnt"), "--state-dir", str(root / "state"))
    assert res.returncode != 0 and fuse_mounts_under(root) == []
    assert f"{taken}: owned by root" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert list(taken.iterdir()) == []


def test_root_stopping_a_users_mount_is_told_whose_it_is_and_needs_force(user: User, user_mount: Path) -> None:
    vnvdimm = [sys.executable, "-m", "vnvdimm.cli", "umount"]
    res = subprocess.run([*vnvdimm, str(user_mount)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stderr
    assert res.stderr == (f"vnvdimm: {user_mount}: the vnvdimm mount of user {user.name} (uid {user.uid}), not "
                          "yours; stopping it stops their emulated platform: use `vnvdimm umount --force "
                          f"{user_mount}` to stop it anyway; nothing was unmounted\n")
    assert fuse_mounts_under(user_mount) == [str(user_mount)]
    assert user.run("cat", str(user_mount / "sys/bus/nd/devices/region0/size")).returncode == 0
    res = subprocess.run([*vnvdimm, "--force", str(user_mount)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert f"stopping the vnvdimm mount of user {user.name} (uid {user.uid})" in res.stderr
    assert fuse_mounts_under(user_mount) == []


def test_the_users_state_dir_and_mount_in_their_home_pass_the_checks(user: User) -> None:
    """StrictModes as a user: their home (theirs) under / (root's) is fine; a directory of the
    user's inside a directory of another user's is refused, naming it."""
    root = Path(tempfile.mkdtemp(prefix="case-", dir=user.home))
    (root / "mnt").mkdir()
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(root)], check=True)
    res = user.vnvdimm("mount", str(root / "mnt"), "--state-dir", str(root / "state"))
    assert res.returncode == 0, res.stderr
    assert user.vnvdimm("umount", str(root / "mnt")).returncode == 0
    top = Path(tempfile.mkdtemp(prefix="vnvdimm-strangers-"))  # root's, in the sticky /tmp: fine
    try:
        top.chmod(0o755)
        strangers = top / "strangers"
        (strangers / "mine").mkdir(parents=True)
        subprocess.run(["chown", f"{user.uid}:{user.gid}", str(strangers / "mine")], check=True)
        os.chown(strangers, 65534, 65534)
        res = user.vnvdimm("mount", str(root / "mnt"), "--state-dir", str(strangers / "mine" / "state"))
        assert res.returncode == 1 and fuse_mounts_under(root) == []
        assert f"vnvdimm: {strangers}: owned by nobody, who could replace {strangers / 'mine'}" in res.stderr, (
            res.stderr)
        assert not (strangers / "mine" / "state").exists()
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_a_user_cannot_stop_roots_mount_and_is_not_told_to_force_it(user: User, tmp_path: Path) -> None:
    top = Path(tempfile.mkdtemp(prefix="vnvdimm-roots-"))  # where the user can see the mount point
    try:
        top.chmod(0o755)
        (top / "mnt").mkdir()
        (top / "topology.toml").write_text(SMALL_E820)
        res = subprocess.run([sys.executable, "-m", "vnvdimm.cli", "mount", str(top / "mnt"), "--state-dir",
                              str(tmp_path / "state"), "--config", str(top / "topology.toml")],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        for flags in ([], ["--force"], ["--lazy"]):
            res = user.vnvdimm("umount", *flags, str(top / "mnt"))
            assert res.returncode == 1
            assert res.stderr == (f"vnvdimm: {top / 'mnt'}: the vnvdimm mount of user root (uid 0), not yours: only "
                                  "they (or root) can unmount it; nothing was unmounted\n")
            assert fuse_mounts_under(top) == [str(top / "mnt")]
        res = subprocess.run([sys.executable, "-m", "vnvdimm.cli", "umount", str(top / "mnt")],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
    finally:
        for m in fuse_mounts_under(top):
            subprocess.run([sys.executable, "-m", "vnvdimm.cli", "umount", "--force", m], capture_output=True,
                           timeout=120)
        shutil.rmtree(top, ignore_errors=True)


def test_each_others_mounts_are_a_clear_refusal(user: User, user_mount: Path, tmp_path: Path) -> None:
    """The user points status, wait, inject-error and run at root's mount, root points them at
    the user's: FUSE keeps each out of the other's mount (no allow_other); each command says
    so in one line, no traceback."""
    commands = (["status"], ["wait", "-t", "5"], ["inject-error", "namespace0.0", "-B", "0"], ["run", "--", "true"])
    top = Path(tempfile.mkdtemp(prefix="vnvdimm-roots-"))  # where the user can see the mount point
    try:
        top.chmod(0o755)
        (top / "mnt").mkdir()
        (top / "topology.toml").write_text(SMALL_E820)
        res = subprocess.run([sys.executable, "-m", "vnvdimm.cli", "mount", str(top / "mnt"), "--state-dir",
                              str(tmp_path / "state"), "--config", str(top / "topology.toml")],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        for command in commands:
            for mnt, run in ((top / "mnt", user.vnvdimm),
                             (user_mount, lambda *a: subprocess.run([sys.executable, "-m", "vnvdimm.cli", *a],
                                                                    capture_output=True, text=True, timeout=120))):
                argv = [command[0], str(mnt), *command[1:]]
                res = run(*argv)
                assert res.returncode != 0, argv
                assert "Traceback" not in res.stderr, res.stderr
                assert f"{mnt}: permission denied" in res.stderr, res.stderr
                assert ("is open only to the user who mounted it" in res.stderr
                        or "without --allow-other, so no one else can read it" in res.stderr), res.stderr
    finally:
        for m in fuse_mounts_under(top):
            subprocess.run([sys.executable, "-m", "vnvdimm.cli", "umount", "--force", m], capture_output=True,
                           timeout=120)
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("planted", ["directory", "link"])
def test_a_runtime_dir_fallback_planted_in_tmp_is_refused(user: User, planted: str) -> None:
    """Without XDG_RUNTIME_DIR a user's mount records go to /tmp/vnvdimm-UID/vnvdimm, a name
    anyone can take first: nobody plants it (a directory open to all, or a link to a directory
    of nobody's) before the user's first mount. The mount is refused naming it, and nothing is
    written there."""
    fallback = Path(f"/tmp/vnvdimm-{user.uid}")
    shutil.rmtree(fallback, ignore_errors=True)  # what the user's earlier mounts left (none is running)
    target = Path(tempfile.mkdtemp(prefix="vnvdimm-nobodys-"))
    root = Path(tempfile.mkdtemp(prefix="case-", dir=user.home))
    try:
        (root / "mnt").mkdir()
        subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(root)], check=True)
        target.chmod(0o777)
        os.chown(target, 65534, 65534)
        if planted == "directory":
            fallback.mkdir(mode=0o777)
            fallback.chmod(0o777)
            os.chown(fallback, 65534, 65534)
            written = fallback
        else:
            fallback.symlink_to(target)
            os.lchown(fallback, 65534, 65534)
            written = target
        res = user.vnvdimm("mount", str(root / "mnt"), "--state-dir", str(root / "state"))
        assert res.returncode != 0 and fuse_mounts_under(root) == [], res.stderr
        assert f"{fallback}: " in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert list(written.iterdir()) == []
    finally:
        for m in fuse_mounts_under(root):
            lazy_unmount(m)
        if fallback.is_symlink() or fallback.is_file():
            fallback.unlink()
        else:
            shutil.rmtree(fallback, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
