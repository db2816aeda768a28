"""The daemon: state dir, memmap engine, model, FUSE loop; and the mount bookkeeping that
`vnvdimm umount` and a crashed daemon's successor rely on."""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vnvdimm.fuse import fusermount
from vnvdimm.topology import safe_dir
from vnvdimm.topology.config import ConfigError, TopologyConfig
from vnvdimm.topology.modules import PlatformModules
from vnvdimm.topology.platform import Platform, StateDir, boot, provision

if TYPE_CHECKING:
    from vnvdimm.model.system import System

log = logging.getLogger("vnvdimm")


class MountError(RuntimeError):
    """Why a mount cannot happen, in words for the user."""


# ---------------------------------------------------------------- mount bookkeeping


def runtime_dir() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    base = xdg or ("/run" if os.geteuid() == 0 else f"/tmp/vnvdimm-{os.getuid()}")
    path = Path(base) / "vnvdimm"
    # Private, as the state dir: /tmp/vnvdimm-UID is a name anyone can take first, and a
    # link planted in it would choose which file a mount record overwrites.
    for directory in (path,) if xdg or os.geteuid() == 0 else (path.parent, path):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            safe_dir.check_entry(os.lstat(directory), directory)
        except safe_dir.UnsafeStateDir as e:
            raise MountError(str(e)) from None
    return path


def mount_record(mountpoint: Path) -> Path:
    key = hashlib.sha256(str(mountpoint).encode()).hexdigest()[:16]
    return runtime_dir() / f"mount-{key}.json"


def fuse_mounts() -> dict[str, str]:
    """Mount points of FUSE file systems in this mount namespace -> fs type."""
    out = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2].startswith("fuse"):
                out[parts[1].replace("\\040", " ")] = parts[2]
    return out


def is_dead_mount(path: Path) -> bool:
    try:
        # statfs, not stat: the kernel answers stat() from its attribute cache even when the
        # daemon is gone; statfs always asks the daemon.
        os.statvfs(path)
    except OSError as e:
        # ENOTCONN: "Transport endpoint is not connected"; ECONNABORTED: the same, seen by a
        # request that was in flight while the daemon was dying (a mount right after a kill).
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def lazy_unmount(path: Path) -> None:
    if shutil.which("fusermount3"):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False, capture_output=True)
    if str(path) in fuse_mounts():
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def check_mountpoint(mountpoint: Path, allow_other: bool = False) -> None:
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: load the fuse module (modprobe fuse) or run with --device /dev/fuse")
    try:
        fusermount.check_can_mount(allow_other)
    except fusermount.FusermountError as e:
        raise MountError(str(e)) from None
    if is_dead_mount(mountpoint):
        print(f"vnvdimm: {mountpoint}: cleaning up the mount of a daemon that died", file=sys.stderr)
        lazy_unmount(mountpoint)
    if not os.path.lexists(mountpoint):
        raise MountError(f"{mountpoint}: no such directory: create it first (mkdir -p {mountpoint})")
    if not mountpoint.is_dir():
        raise MountError(f"{mountpoint}: not a directory: mount on a directory")
    if str(mountpoint) in fuse_mounts() or os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint}: already a mount point (busy); unmount it first")
    with contextlib.suppress(OSError), os.scandir(mountpoint) as entries:
        if any(True for _ in entries):
            print(f"vnvdimm: warning: {mountpoint} is not empty; its files are hidden while mounted",
                  file=sys.stderr)


class StateLock:
    """An flock on the state dir: one daemon per state dir; released by the kernel on death."""

    def __init__(self, state: StateDir) -> None:
        self.path = state.path / "lock"
        self.fd = -1

    def acquire(self) -> None:
        self.fd = safe_dir.open_private(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise MountError(f"{self.path.parent}: state dir in use by vnvdimm pid {holder}") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def update_pid(self) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)


# ---------------------------------------------------------------- the daemon


@dataclass
class MountOptions:
    mountpoint: Path
    state_dir: Path
    config: TopologyConfig | None
    foreground: bool = False
    allow_other: bool = False
    verbose: int = 0
    workers: int | None = None


def prepare(opts: MountOptions) -> tuple[StateDir, Platform, StateLock]:
    """Everything that can fail with a clear message, before daemonizing."""
    check_mountpoint(opts.mountpoint, opts.allow_other)
    state = StateDir(opts.state_dir)
    state.ensure()
    lock = StateLock(state)
    lock.acquire()
    platform, provision_config = state.open(opts.config)
    if provision_config is not None:
        provision(platform, state, provision_config)
    return state, platform, lock


def open_log(state: StateDir) -> int:
    """The daemon's log, appended to (0600: it names files and devices of the user)."""
    return safe_dir.open_private(state.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)


def setup_logging(state: StateDir, verbose: int, foreground: bool) -> None:
    level = logging.WARNING - 10 * min(verbose, 2) if verbose else logging.INFO
    handlers: list[logging.Handler] = [logging.StreamHandler(os.fdopen(open_log(state), "a", buffering=1))]
    if foreground:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=level, handlers=handlers, force=True,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s")
    logging.getLogger("mfusepy").setLevel(logging.WARNING if verbose < 2 else logging.DEBUG)


def run(opts: MountOptions, state: StateDir, platform: Platform, lock: StateLock, ready_fd: int | None) -> int:
    """The daemon proper: returns when the file system is unmounted."""
    from vnvdimm.fuse.ops import VnvdimmOperations, raise_readahead, serve
    from vnvdimm.memmap import MemmapEngine
    from vnvdimm.sysfs.tree import Tree

    lock.update_pid()
    setup_logging(state, opts.verbose, opts.foreground)
    workers = opts.workers if opts.workers is not None else platform.memmap.workers
    # Termination signals are taken by a thread of ours, not by libfuse's handlers: blocked
    # readers must be woken (their jobs cancelled) before the loop may stop its threads. So
    # they are blocked before the first thread exists (the engine's start threads, and every
    # thread inherits the mask of its creator): a process signal is delivered to any thread
    # that does not block it, and libfuse's handler run there stopped the loop with every
    # blocked reader still waiting, leaving the mount hung. (Forked workers inherit the mask
    # too: they exit when the daemon tells them or dies, not on SIGTERM.)
    signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATING_SIGNALS)
    engine = MemmapEngine(workers=workers)
    engine.start()  # fork the workers now, before any thread exists
    # `kill -USR1 <daemon>` writes the stack of every thread into the log: what a hung call
    # waits on. (After the fork: the workers keep the default action.)
    stacks = os.fdopen(open_log(state), "a")  # for the life of the daemon
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    record = mount_record(opts.mountpoint)
    machine = boot(platform, state, engine, platform.memmap)
    system = machine.system
    system.modules = PlatformModules(platform, state, system)
    try:
        tree = Tree(system)
        teardown = Teardown(system, opts.mountpoint)
        threading.Thread(target=teardown.on_signals, name="vnvdimm-signals", daemon=True).start()

        def ready() -> None:
            # The loop answers once init ran; make sure a lookup goes through, then tell the parent.
            for _ in range(200):
                try:
                    os.stat(opts.mountpoint / "sys" / "bus" / "nd")
                    break
                except OSError:
                    time.sleep(0.01)
            raise_readahead(str(opts.mountpoint))
            fd = safe_dir.open_private(record, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"pid": os.getpid(), "state_dir": str(state.path),
                                    "mountpoint": str(opts.mountpoint)}))
            log.info("mounted %s (state %s)", opts.mountpoint, state.path)
            if ready_fd is not None:
                with contextlib.suppress(OSError):
                    os.write(ready_fd, b"ok\n")
                    os.close(ready_fd)

        def on_ready() -> None:
            ready()
            teardown.watch_mount()

        ops = VnvdimmOperations(tree, on_ready=on_ready)
        serve(ops, str(opts.mountpoint), allow_other=opts.allow_other, debug=opts.verbose >= 3)
        log.info("unmounted %s", opts.mountpoint)
        return 0
    finally:
        machine.close()
        with contextlib.suppress(FileNotFoundError):
            record.unlink()


TERMINATING_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


class Teardown:
    """Stopping the daemon cleanly whatever the trigger (SIGTERM/SIGINT/SIGHUP, `umount`,
    `fusermount3 -u [-z]`): first every job is cancelled and every device closed, so readers
    blocked on a cold device get an error instead of waiting, then the mount goes away and
    the FUSE loop ends once the kernel drops the connection."""

    def __init__(self, system: System, mountpoint: Path) -> None:
        self.system = system
        self.mountpoint = mountpoint
        self._done = threading.Event()

    def quiesce(self, why: str) -> None:
        if self._done.is_set():
            return
        self._done.set()
        log.info("stopping: %s", why)
        # Every memmap job is cancelled at once (closing the engine), then the devices go.
        # Cancelling job after job (each device's unbind) waited, for each job, until every
        # worker had left it, and a worker in the middle of a run of another job only
        # answered at the end of that run (or when killed, 0.8 s later).
        if self.system.engine is not None:
            self.system.engine.close()
        self.system.shutdown()

    def on_signals(self) -> None:
        signum = signal.sigwait(TERMINATING_SIGNALS)
        self.quiesce(f"signal {signal.Signals(signum).name}")
        lazy_unmount(self.mountpoint)

    def watch_mount(self) -> None:
        """Wake on every mount-table change (poll on /proc/self/mounts) until ours is gone."""
        import select

        with open("/proc/self/mounts", "rb") as f:
            p = select.poll()
            p.register(f, select.POLLERR | select.POLLPRI)
            while not self._done.is_set():
                f.seek(0)
                mounted = any(line.split()[1].decode(errors="replace") == str(self.mountpoint)
                              for line in f.read().splitlines() if len(line.split()) > 1)
                if not mounted:
                    self.quiesce("unmounted")
                    return
                p.poll(1000)


def mount(opts: MountOptions) -> int:
    try:
        state, platform, lock = prepare(opts)
    except (MountError, ConfigError) as e:
        print(f"vnvdimm: {e}", file=sys.stderr)
        return 1
    if opts.foreground:
        try:
            return run(opts, state, platform, lock, None)
        except (fusermount.FusermountError, ConfigError, MountError) as e:
            print(f"vnvdimm: mount of {opts.mountpoint} failed: {e}", file=sys.stderr)
            return 1

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(rfd)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        # What libfuse and the C runtime print goes to the log, not nowhere.
        try:
            log_fd = open_log(state)
            os.dup2(log_fd, 2)
            os.close(log_fd)
        except OSError:
            os.dup2(devnull, 2)
        os.close(devnull)
        code = 1
        try:
            code = run(opts, state, platform, lock, wfd)
        except fusermount.FusermountError as e:  # the mount was refused: fusermount3's words
            log.error("mount refused: %s", e)
            with contextlib.suppress(OSError):
                os.write(wfd, f"error: {e}\n".encode())
        except (ConfigError, MountError) as e:  # a message for the user (media missing, ...)
            log.error("%s", e)
            with contextlib.suppress(OSError):
                os.write(wfd, f"error: {e}\n".encode())
        except BaseException as e:  # reported through the pipe and the log
            log.exception("daemon failed")
            with contextlib.suppress(OSError):
                os.write(wfd, f"error: {type(e).__name__}: {e}\n".encode())
        finally:
            os._exit(code)
    os.close(wfd)
    answer, status = _wait_ready(rfd, pid)
    if answer.startswith("ok"):
        return 0
    message = answer.strip().removeprefix("error: ") or f"the daemon exited with status {status}"
    print(f"vnvdimm: mount of {opts.mountpoint} failed: {message} (details in {state.path / 'vnvdimm.log'})",
          file=sys.stderr)
    return 1


def _wait_ready(rfd: int, pid: int) -> tuple[str, int | None]:
    """The daemon's first line on the pipe, or its exit status if it died first. (Its worker
    processes inherit the pipe, so EOF cannot be the signal.)"""
    import select

    buf = b""
    try:
        while b"\n" not in buf:
            ready, _, _ = select.select([rfd], [], [], 0.1)
            if ready:
                chunk = os.read(rfd, 4096)
                if not chunk:
                    break
                buf += chunk
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return buf.decode(errors="replace"), os.waitstatus_to_exitcode(status)
    finally:
        os.close(rfd)
    return buf.decode(errors="replace"), None


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its parent to reap it has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def stop_mount(mountpoint: Path, pid: int | None, timeout: float = 10.0) -> None:
    """Make sure a mount and its daemon are gone, whatever state they are in: `umount`, then a
    lazy detach if it is still there, then SIGKILL of the daemon's process group (its workers)
    if it has not exited within `timeout`. For test beds and test fixtures."""
    if str(mountpoint) in fuse_mounts():
        subprocess.run([sys.executable, "-m", "vnvdimm.cli", "umount", str(mountpoint)],
                       capture_output=True, timeout=60)
    if str(mountpoint) in fuse_mounts():
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, timeout=30)
    if pid is None or pid <= 0:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process_alive(pid):
        time.sleep(0.02)
    if process_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def umount(mountpoint: Path, timeout: float = 10.0) -> int:
    try:
        record = mount_record(mountpoint)
    except MountError as e:
        print(f"vnvdimm: {e}", file=sys.stderr)
        return 1
    pid = None
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
        pid = int(json.loads(record.read_text())["pid"])
    if str(mountpoint) not in fuse_mounts():
        print(f"vnvdimm: {mountpoint}: not mounted", file=sys.stderr)
        return 1
    res = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
    if res.returncode != 0:
        # Busy (open files, readers blocked on a cold device): detach it. The daemon sees its
        # mount go, cancels every memmap job and closes every device, so blocked readers get
        # an error, their files close, and the kernel releases the connection.
        res = subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, text=True)
    if res.returncode != 0:
        print(f"vnvdimm: {mountpoint}: {res.stderr.strip() or 'unmount failed'}", file=sys.stderr)
        return 1
    if pid is not None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process_alive(pid):
            time.sleep(0.01)
        if process_alive(pid):
            print(f"vnvdimm: daemon {pid} did not exit in {timeout:.0f} s; killing it", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return 0
