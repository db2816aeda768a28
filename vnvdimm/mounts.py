"""What vnvdimm knows of a mount from the outside: the mount table, whether a daemon still
answers, the mount records of the runtime dir, the processes and loop devices that hold its
files, and whether it is a vnvdimm mount that may be touched. Used by the daemon, the tools,
the test bed, the tests and the benchmarks; stopping a mount by these facts is umount.py's.

A mount is *busy* when a device file under it (``MNT/dev/pmemN``, ``daxR.M``...) is open,
mapped, or the backing file of a loop device (`Holder.device`): those hold data in flight, and
stopping the daemon under them makes the kernel fail their I/O.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import select
import shutil
import signal
import stat
import struct
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vnvdimm import safe_files

#: The daemon detaches its mount (like `umount -l`) on these and exits once no device file is
#: open any more: the open files keep working until they are closed.
DETACH_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
#: The daemon stops at once on this one (`vnvdimm umount --force`, Ctrl-\ in the foreground):
#: every request fails, open device files report errors from then on. (SIGUSR1 dumps the
#: daemon's stacks, SIGUSR2 its request profile when profiling.)
FORCE_SIGNAL = signal.SIGQUIT

LOOP_MAJOR = 7
#: The device files whose data the daemon serves: namespaces' block devices (pmemN, a BTT's
#: pmemNs) and device-dax instances.
DATA_DEVICE = re.compile(r"/dev/(pmem\d+s?|dax\d+\.\d+)$")
LOOP_GET_STATUS64 = 0x4C05


# ---------------------------------------------------------------- the mount table


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/PID/mountinfo."""

    mountpoint: str
    root: str  # the directory of the file system mounted there ("/dev" for a bind of MNT/dev)
    dev: tuple[int, int]
    fstype: str
    options: frozenset[str] = frozenset()  # the mount's and its super block's (allow_other...)

    @property
    def is_fuse(self) -> bool:
        return self.fstype == "fuse" or self.fstype.startswith("fuse.")


def _unescape(field: str) -> str:
    """The kernel writes space, tab, newline and backslash in mount paths as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_table(pid: int | str = "self") -> list[MountEntry]:
    """The mounts of the mount namespace of `pid`, in mount order (the last one at a path is
    the one on top). Empty if it cannot be read."""
    out = []
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or not tail:
            continue
        major, _, minor = fields[2].partition(":")
        options = frozenset(fields[5].split(",")) | frozenset(tail[2].split(",") if len(tail) > 2 else ())
        out.append(MountEntry(_unescape(fields[4]), _unescape(fields[3]), (int(major), int(minor)), tail[0], options))
    return out


def mount_entry(path: Path | str, table: list[MountEntry] | None = None) -> MountEntry | None:
    """The mount on top at exactly `path` (no stat of it: a stuck daemon would hang that)."""
    found = None
    for entry in table if table is not None else mount_table():
        if entry.mountpoint == str(path):
            found = entry
    return found


def is_mounted(path: Path | str) -> bool:
    return mount_entry(path) is not None


def fuse_mounts() -> dict[str, str]:
    """Mount points of FUSE file systems in this mount namespace -> file system type."""
    return {e.mountpoint: e.fstype for e in mount_table() if e.is_fuse}


def fuse_mounts_under(prefix: Path | str) -> list[str]:
    """FUSE mount points at or below `prefix` (a test's or a benchmark's temp dir)."""
    base = str(prefix).rstrip("/")
    return [m for m in fuse_mounts() if m == base or m.startswith(base + "/")]


#: What a request to a FUSE mount whose daemon is gone answers: ENOTCONN ("Transport endpoint
#: is not connected"), or ECONNABORTED for a request that was in flight while it died.
DEAD_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)


def daemon_errno(path: Path | str) -> int | None:
    """None if a request for `path` reaches the daemon serving it and is answered; else the
    errno (DEAD_ERRNOS: the daemon is gone; ENOENT: not there). statfs, not stat: the kernel
    answers stat() from its attribute cache even when the daemon is gone; statfs always asks
    the daemon."""
    try:
        os.statvfs(path)
    except OSError as e:
        return e.errno
    return None


def is_dead_mount(path: Path | str) -> bool:
    """A FUSE mount whose daemon is gone: every access fails (a crash, a SIGKILL)."""
    return daemon_errno(path) in DEAD_ERRNOS


def watch_unmount(path: Path | str, done: Callable[[], bool]) -> bool:
    """Wait until the mount at `path` leaves this namespace's mount table (True), waking on
    every change of the table, or until `done()` (checked at least once a second) says to
    stop looking (False)."""
    with open("/proc/self/mountinfo", "rb") as f:
        p = select.poll()
        p.register(f, select.POLLERR | select.POLLPRI)
        while not done():
            if not is_mounted(path):
                return True
            p.poll(1000)
            f.seek(0)
            f.read()
    return False


def lazy_unmount(path: Path | str) -> None:
    """Detach the mount at `path` (`umount -l`): gone from the tree at once, its open files
    keep working until they are closed."""
    if shutil.which("fusermount3"):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False, capture_output=True, timeout=30)
    if str(path) in fuse_mounts():
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True, timeout=30)


# ---------------------------------------------------------------- processes


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its parent to reap it has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` seconds for `pid` to exit; True if it did."""
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def cmdline(pid: int) -> list[str]:
    """The arguments `pid` runs with ([] once it is gone, and for a kernel thread)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")[:-1] if raw.endswith(b"\0") else [raw.decode(errors="replace")]


def command_of(pid: int) -> str:
    """`pid`'s command line on one line of at most 80 characters, for messages."""
    text = " ".join(" ".join(cmdline(pid)).split())  # one line, whatever the arguments hold
    if not text:
        with contextlib.suppress(OSError):
            text = Path(f"/proc/{pid}/comm").read_text().strip()
    # Anyone chooses their own command line: no control character of theirs (a terminal's
    # escape sequences) reaches the terminal of whoever reads this (root running umount).
    text = "".join(c if c.isprintable() else "?" for c in text)
    return (text[:77] + "...") if len(text) > 80 else text or "?"


def process_group_of(pid: int) -> int | None:
    """The process group of `pid` (a daemon's workers are in the daemon's)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


VNVDIMM_COMMANDS = frozenset({"vnvdimm", "vnvdimm.cli", "with-vnvdimm"})


def is_vnvdimm(args: list[str]) -> bool:
    """A command line of vnvdimm's: `python -m vnvdimm.cli ...` or the `vnvdimm` script (a
    daemon, its workers, with-vnvdimm's block device helper), or with-vnvdimm."""
    return any(os.path.basename(a) in VNVDIMM_COMMANDS for a in args)


def vnvdimm_processes(naming: Path | str, command: str | None = None) -> list[int]:
    """Live vnvdimm processes whose command line names `naming` (a mount point, a state dir,
    or a directory they are under), optionally only those running `command` ("mount")."""
    needle = str(naming)
    out = []
    for pid in pids():
        args = cmdline(pid)
        if (is_vnvdimm(args) and needle in " ".join(args) and (command is None or command in args)
                and process_alive(pid)):
            out.append(pid)
    return sorted(out)


# ---------------------------------------------------------------- mount records


def runtime_dir() -> Path:
    """Where mount records live. Raises UnsafeStateDir if someone else could change it."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    base = xdg or ("/run" if os.geteuid() == 0 else f"/tmp/vnvdimm-{os.getuid()}")
    path = Path(base) / "vnvdimm"
    # Private, as the state dir: /tmp/vnvdimm-UID is a name anyone can take first, and a
    # link planted in it would choose which file a mount record overwrites.
    for directory in (path,) if xdg or os.geteuid() == 0 else (path.parent, path):
        directory.mkdir(mode=safe_files.DIR_MODE, parents=True, exist_ok=True)
        safe_files.check_entry(os.lstat(directory), directory)
    # And so are the directories above it (see safe_files: StrictModes).
    fd, _ = safe_files.open_checked_dir(safe_files.canonical(path), "runtime dir")
    os.close(fd)
    return path


def mount_record(mountpoint: Path) -> Path:
    """Where the daemon of `mountpoint` writes its pid and state dir while it runs."""
    key = hashlib.sha256(str(mountpoint).encode()).hexdigest()[:16]
    return runtime_dir() / f"mount-{key}.json"


def read_record_file(path: Path) -> dict[str, object]:
    with contextlib.suppress(OSError, ValueError):
        doc = json.loads(safe_files.read_private(path))
        if isinstance(doc, dict):
            return doc
    return {}


def read_record(mountpoint: Path) -> dict[str, object]:
    return read_record_file(mount_record(mountpoint))


def runtime_records() -> list[Path]:
    """Every mount record of this user's runtime dir."""
    base = runtime_dir()
    return sorted(base / name for name in os.listdir(base) if name.startswith("mount-") and name.endswith(".json"))


def _is_daemon(pid: object) -> bool:
    """A live process at `pid`, the record's daemon as far as can be told. (Its command line
    is not checked: a daemon may retitle itself; a pid reused meanwhile only keeps a record.)"""
    return isinstance(pid, int) and pid > 0 and process_alive(pid)


def _listened(path: Path) -> bool:
    """Whether a process accepts connections on the unix socket `path` (a refused connect:
    nobody does; connect() never waits for the accept, so this cannot hang on a busy daemon)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # busy, timed out, no permission: not ours to judge stale
    return True


def key_of(name: str) -> str:
    """The mount point's key in a runtime file's name (mount-KEY.json, ioctl-KEY.sock)."""
    return name.split("-", 1)[-1].split(".", 1)[0]


def clean_stale_records() -> list[str]:
    """Remove the mount records and ioctl sockets that daemons killed without a chance to
    clean up left in the runtime dir (a record whose pid is not a running vnvdimm, its
    socket, a socket nobody listens on, a temporary record), as `vnvdimm mount` and `umount`
    do first. Returns the names removed."""
    base = runtime_dir()
    removed = []
    names = set(os.listdir(base))
    for name in sorted(names):
        key = key_of(name)
        stale = False
        if name.startswith("mount-") and name.endswith(".json"):
            stale = not _is_daemon(read_record_file(base / name).get("pid"))
            if stale and f"ioctl-{key}.sock" in names:
                with contextlib.suppress(FileNotFoundError):
                    (base / f"ioctl-{key}.sock").unlink()
                    removed.append(f"ioctl-{key}.sock")
        elif name.startswith("mount-") and name.endswith(".tmp"):
            st = os.stat(base / name, follow_symlinks=False)
            stale = time.time() - st.st_mtime > 60  # a record being written is renamed at once
        elif name.startswith("ioctl-") and name.endswith(".sock") and f"mount-{key_of(name)}.json" not in names:
            # A daemon binds and listens before it writes its record: a socket without one is
            # stale once nobody listens on it and it is not a daemon's that is starting.
            st = os.stat(base / name, follow_symlinks=False)
            stale = time.time() - st.st_mtime > 60 and not _listened(base / name)
        if stale:
            with contextlib.suppress(FileNotFoundError):
                (base / name).unlink()
                removed.append(name)
    return removed


def daemon_pid(mountpoint: Path) -> int | None:
    """The pid of the daemon serving `mountpoint` (also after a lazy unmount), if it runs."""
    pid = read_record(mountpoint).get("pid")
    if isinstance(pid, int) and pid > 0 and process_alive(pid):
        return pid
    return None


# ---------------------------------------------------------------- holders


@dataclass(frozen=True)
class Holder:
    """Something that keeps a file of a mount in use."""

    path: str  # inside the mounted file system: "/dev/pmem0", "/sys/bus/nd/..."
    how: str  # "open", "mapped", "cwd", "loop device /dev/loop0 (mounted on /mnt)"
    pid: int | None = None
    command: str = ""

    @property
    def device(self) -> bool:
        """A device file with data behind it (not /dev/null and the like): I/O may be in flight."""
        return DATA_DEVICE.match(self.path) is not None

    def __str__(self) -> str:
        who = f" by pid {self.pid} ({self.command})" if self.pid is not None else ""
        return f"{self.path}: {self.how}{who}"


class _NamespaceView:
    """Paths as one mount namespace sees them -> paths inside our file system."""

    def __init__(self, table: list[MountEntry], dev: tuple[int, int]) -> None:
        # Longest mount points first, and of mounts at the same point the later (on top)
        # first: the first one whose point is a prefix of a path holds that path.
        order = sorted(enumerate(table), key=lambda ie: (len(ie[1].mountpoint), ie[0]), reverse=True)
        self.mounts = [e for _, e in order]
        self.dev = dev

    def _mount_of(self, path: str) -> MountEntry | None:
        for entry in self.mounts:
            mp = entry.mountpoint.rstrip("/")
            if path == entry.mountpoint or path.startswith(mp + "/") or mp == "":
                return entry
        return None

    def inside(self, path: str) -> str | None:
        """`path` (as this namespace sees it) in our file system's terms, or None."""
        entry = self._mount_of(path)
        if entry is None or entry.dev != self.dev:
            return None
        rest = path[len(entry.mountpoint.rstrip("/")):]
        return (entry.root.rstrip("/") + rest) or "/"

    def fstype(self, path: str) -> str:
        entry = self._mount_of(path)
        return entry.fstype if entry else ""


def pids() -> Iterator[int]:
    """Every process but this one."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            yield int(entry)


def loop_devices() -> Iterator[tuple[str, tuple[int, int], int, str]]:
    """Attached loop devices: (/dev/loopN, backing file's device, backing inode, backing path)."""
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir("/sys/block")):
            if not name.startswith("loop"):
                continue
            try:
                backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
            except OSError:
                continue  # not attached
            dev, ino = (-1, -1), -1
            with contextlib.suppress(OSError):
                fd = os.open(f"/dev/{name}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
                try:
                    info = bytearray(232)  # struct loop_info64
                    fcntl.ioctl(fd, LOOP_GET_STATUS64, info)
                    lo_device, lo_inode = struct.unpack_from("=QQ", info)
                    dev, ino = (os.major(lo_device), os.minor(lo_device)), lo_inode
                finally:
                    os.close(fd)
            yield f"/dev/{name}", dev, ino, backing


def holders(mountpoint: Path | str, entry: MountEntry | None = None, daemon: int | None = None) -> list[Holder]:
    """Every process that has a file of the mount open, mapped, or as its working directory
    (in any mount namespace this process can inspect: a `with-vnvdimm` command sees
    MNT/dev as /dev), and every loop device backed by one of its files. Processes of other
    users are only seen by root. `daemon`: the daemon's pid (it and its workers are skipped)."""
    entry = entry or mount_entry(mountpoint)
    if entry is None:
        return []
    dev = entry.dev
    base = entry.mountpoint.rstrip("/")
    found: list[Holder] = []
    views: dict[str, _NamespaceView] = {}
    loops = [(loop, backing) for loop, bdev, _, backing in loop_devices()
             if bdev == dev or (bdev == (-1, -1) and backing.startswith(base + "/"))]
    dev_field = f"{dev[0]:02x}:{dev[1]:02x}"  # as /proc/PID/maps writes it
    loop_rdevs = {os.makedev(LOOP_MAJOR, int(loop[len("/dev/loop"):])): loop for loop, _ in loops}
    for pid in pids():
        if daemon is not None and process_group_of(pid) == daemon:
            continue
        try:
            ns = os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            continue
        view = views.get(ns)
        if view is None:
            view = views[ns] = _NamespaceView(mount_table(pid), dev)
        seen: set[tuple[str, str]] = set()

        def add(path: str, how: str, pid: int = pid, seen: set[tuple[str, str]] = seen) -> None:
            if (path, how) not in seen:
                seen.add((path, how))
                found.append(Holder(path, how, pid, command_of(pid)))

        with contextlib.suppress(OSError):
            for link in ("cwd", "root"):
                inside = view.inside(os.readlink(f"/proc/{pid}/{link}"))
                if inside is not None and link == "cwd":
                    add(inside, "cwd")
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if not target.startswith("/"):
                continue
            inside = view.inside(target)
            if inside is not None:
                add(inside, "open")
            elif loop_rdevs and view.fstype(target) in ("devtmpfs", "tmpfs"):
                # A loop device over one of our files, opened (mkfs, fsck, dd...).
                with contextlib.suppress(OSError):
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                    loop = loop_rdevs.get(st.st_rdev)
                    if loop is not None:
                        add(_backing_inside(loop, loops, base), f"open through loop device {loop}")
        try:
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read()
        except OSError:
            continue
        if dev_field not in maps:
            continue
        for line in maps.splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[3] == dev_field:
                path = parts[5].strip()
                add(view.inside(path) or path, "mapped")
    mounted_on = {e.dev: e.mountpoint for e in mount_table()}
    for loop, _ in loops:
        how = f"backing loop device {loop}"
        where = mounted_on.get((LOOP_MAJOR, int(loop[len("/dev/loop"):])))
        if where is not None:
            how += f" (mounted on {where})"
        found.append(Holder(_backing_inside(loop, loops, base), how))
    return found


def _backing_inside(loop: str, loops: Iterable[tuple[str, str]], base: str) -> str:
    backing = dict(loops).get(loop, "")
    if backing.startswith(base + "/"):
        inside = backing[len(base):]
        # the backing file of a disk's block device stands for /dev/<disk> (vnvdimm.blockdev)
        return "/dev/" + inside.rsplit("/", 1)[-1] if inside.startswith("/.blockdev/") else inside
    return "/dev/" + backing.rsplit("/", 1)[-1] if "/dev/" in backing else backing


def describe(found: Iterable[Holder]) -> str:
    return "".join(f"\n  {h}" for h in found)


# ---------------------------------------------------------------- stopping a mount


class NotVnvdimm(RuntimeError):
    """`vnvdimm umount` of something else (a tmpfs, /proc...): nothing was changed."""


def owner_of(entry: MountEntry) -> int | None:
    """The uid a FUSE mount was made by (its user_id= option), None if it has none."""
    for option in entry.options:
        if option.startswith("user_id="):
            with contextlib.suppress(ValueError):
                return int(option.removeprefix("user_id="))
    return None


def check_is_vnvdimm(mountpoint: Path, entry: MountEntry, mode: str) -> None:
    """Refuse to touch a mount vnvdimm did not make, or (without --force) another user's."""
    if entry.fstype != VNVDIMM_FSTYPE:
        raise NotVnvdimm(f"{mountpoint} is not a vnvdimm mount (it is a {entry.fstype}); nothing was unmounted")
    record = read_record(mountpoint)
    if record and _is_daemon(record.get("pid")) and record.get("mountpoint") != str(mountpoint):
        raise NotVnvdimm(f"{mountpoint}: the runtime record of this mount names {record.get('mountpoint')}, not "
                         "this mount point; nothing was unmounted")
    owner = owner_of(entry)
    if owner is not None and owner != os.geteuid() and os.geteuid() != 0:
        raise NotVnvdimm(f"{mountpoint}: the vnvdimm mount of {user_name(owner)}, not yours: only they (or root) "
                         "can unmount it; nothing was unmounted")
    if owner is not None and owner != os.geteuid() and mode != "force":
        raise NotVnvdimm(f"{mountpoint}: the vnvdimm mount of {user_name(owner)}, not yours; stopping it "
                         f"stops their emulated platform: use `vnvdimm umount --force {mountpoint}` to stop it "
                         "anyway; nothing was unmounted")


def trusted_vnvdimm_dev(st_dev: int) -> bool:
    """Whether the file system with device number `st_dev` is a vnvdimm mount made by root or
    by the caller (FUSE's user_id=): only such a mount's files may be followed, written or
    bound by vnvdimm's tools, which are often root (another user's FUSE file system, or a
    directory that merely looks like a mount, would choose what they touch)."""
    dev = (os.major(st_dev), os.minor(st_dev))
    for entry in mount_table():
        if entry.dev == dev:  # every mount of one super block says the same
            return entry.fstype == VNVDIMM_FSTYPE and owner_of(entry) in (0, os.geteuid())
    return False


def check_trusted_tree(mnt: Path) -> None:
    """Refuse (NotVnvdimm) a MNT whose dev/ and sys/ are not both on one trusted vnvdimm mount
    (trusted_vnvdimm_dev) with MNT itself."""
    try:
        top = os.stat(mnt)
        for sub in ("dev", "sys"):
            st = os.lstat(mnt / sub)
            if not stat.S_ISDIR(st.st_mode) or st.st_dev != top.st_dev:
                raise NotVnvdimm(f"{mnt} is not a vnvdimm mount ({mnt / sub} is not on it)")
    except OSError as e:
        raise NotVnvdimm(f"{mnt} is not a vnvdimm mount ({e.strerror})") from None
    if not trusted_vnvdimm_dev(top.st_dev):
        raise NotVnvdimm(f"{mnt} is not a vnvdimm mount of root's or yours")


def user_name(uid: int) -> str:
    import pwd

    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


VNVDIMM_FSTYPE = "fuse.vnvdimm"
