"""The daemon: state dir, memmap engine, model, FUSE loop; and the mount bookkeeping that
`vnvdimm umount` and a crashed daemon's successor rely on."""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import hashlib
import json
import logging
import os
import signal
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from vnvdimm import safe_files
from vnvdimm.fuse import fusermount
from vnvdimm.logfile import RotatingLog, max_bytes_from_environment
from vnvdimm.loopdisks import LoopDisks
from vnvdimm.model.host_memory import read_host_memory
from vnvdimm.mounts import (
    DETACH_SIGNALS,
    FORCE_SIGNAL,
    clean_stale_records,
    daemon_pid,
    is_dead_mount,
    is_mounted,
    lazy_unmount,
    mount_record,
    read_record_file,
    runtime_dir,
    runtime_records,
    watch_unmount,
)
from vnvdimm.proctitle import set_title
from vnvdimm.topology.boot import boot, power_off, sync_media
from vnvdimm.topology.config import ConfigError, TopologyConfig, host_memory_warnings
from vnvdimm.topology.modules import PlatformModules
from vnvdimm.topology.provision import provision
from vnvdimm.topology.record import Platform
from vnvdimm.topology.statedir import StateDir

if TYPE_CHECKING:
    from vnvdimm.fuse.ops import VnvdimmOperations
    from vnvdimm.fuse.sysfs_ops import SysfsConnections
    from vnvdimm.model.system import System

log = logging.getLogger("vnvdimm")


class MountError(RuntimeError):
    """Why a mount cannot happen, in words for the user."""


# ---------------------------------------------------------------- mount bookkeeping


def ioctl_socket(mountpoint: Path) -> Path:
    """The unix socket on which the daemon of `mountpoint` answers ioctls (short: sun_path
    has 108 bytes; private: the runtime dir is the user's)."""
    key = hashlib.sha256(str(mountpoint).encode()).hexdigest()[:16]
    return runtime_dir() / f"ioctl-{key}.sock"


def check_mountpoint(mountpoint: Path, allow_other: bool = False) -> tuple[int, Path]:
    """Refuse a mount point vnvdimm cannot or must not mount on, with what to do. Returns the
    descriptor of the directory that was checked (its every ancestor owned by root or the user
    and writable by nobody else, see safe_files), on which the mount must land, and its path
    (links on the way resolved)."""
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
    try:
        is_dir = os.path.islink(mountpoint) or stat.S_ISDIR(os.stat(mountpoint).st_mode)
    except OSError as e:  # a dead FUSE mount the cleanup did not reach: ENOTCONN
        raise MountError(f"{mountpoint}: cannot look at the mount point: {e.strerror}") from None
    if not is_dir:
        raise MountError(f"{mountpoint}: not a directory: mount on a directory")
    try:
        anchor, real = safe_files.open_checked_dir(safe_files.canonical(mountpoint), "mount point")
    except safe_files.UnsafeStateDir as e:
        raise MountError(str(e)) from None
    except OSError as e:
        raise MountError(f"{mountpoint}: cannot open the mount point: {e.strerror}") from None
    try:
        _check_free(real)
    except BaseException:
        os.close(anchor)
        raise
    return anchor, real


def _check_free(mountpoint: Path) -> None:
    if is_mounted(mountpoint):
        raise MountError(f"{mountpoint}: already a mount point (busy); unmount it first")
    try:
        earlier = daemon_pid(mountpoint)
    except safe_files.UnsafeStateDir as e:
        raise MountError(str(e)) from None
    if earlier is not None:
        # Detached lazily, still serving open files: a new mount here would be taken down by
        # that daemon's exit (libfuse unmounts its mount point by path when its loop ends).
        raise MountError(f"{mountpoint}: the daemon of an earlier mount here (pid {earlier}) still serves files "
                         "that were open when it was unmounted; close them (or `vnvdimm umount --force "
                         f"{mountpoint}`) first")
    with contextlib.suppress(OSError), os.scandir(mountpoint) as entries:
        if any(True for _ in entries):
            print(f"vnvdimm: warning: {mountpoint} is not empty; its files are hidden while mounted",
                  file=sys.stderr)


class StateLock:
    """An flock on the state dir: one daemon per state dir; released by the kernel on death."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.path = state.path / "lock"
        self.fd = -1

    def acquire(self) -> None:
        self.fd = self.state.open_file(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            where = mounted_at(self.state.path, holder)
            raise MountError(f"{self.path.parent}: state dir in use by vnvdimm pid {holder}"
                             + (f", mounted on {where}" if where else "")
                             + f"; unmount it first (vnvdimm umount {where or 'MNT'}), or mount with another "
                               "--state-dir") from None
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
    mountpoint_fd: int | None = None  # the mount point's directory, as checked (set by prepare)
    source: str | None = None  # the mount's source in the mount table (the config file)


def mounted_at(state_dir: Path, pid: str) -> str:
    """Where the daemon `pid` serving `state_dir` is mounted, from its runtime record ("" if
    no record of ours says)."""
    with contextlib.suppress(OSError, safe_files.UnsafeStateDir):
        for record in runtime_records():
            doc = read_record_file(record)
            if str(doc.get("pid")) == pid and doc.get("state_dir") == str(state_dir):
                return str(doc.get("mountpoint", ""))
    return ""


def prepare(opts: MountOptions) -> tuple[StateDir, Platform, StateLock]:
    """Everything that can fail with a clear message, before daemonizing. Keeps the mount
    point's checked directory open in `opts.mountpoint_fd` (the mount must land on it)."""
    with contextlib.suppress(OSError, safe_files.UnsafeStateDir):
        clean_stale_records()
    opts.mountpoint_fd, opts.mountpoint = check_mountpoint(opts.mountpoint, opts.allow_other)
    state = StateDir(opts.state_dir)
    state.ensure()
    lock = StateLock(state)
    lock.acquire()
    platform, provision_config = state.open(opts.config)
    if opts.config is not None:
        for warning in host_memory_warnings(opts.config, read_host_memory()):
            print(f"vnvdimm: warning: {warning}", file=sys.stderr)
    if provision_config is not None:
        provision(platform, state, provision_config)
    return state, platform, lock


def open_log(state: StateDir) -> int:
    """The daemon's log, appended to (0600: it names files and devices of the user)."""
    return state.open_file(state.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)


def setup_logging(state: StateDir, verbose: int, foreground: bool) -> None:
    level = logging.WARNING - 10 * min(verbose, 2) if verbose else logging.INFO
    # the log and its generations are opened and renamed relative to the state dir's
    # descriptor, as every file of it (a swapped ancestor changes nothing: see StateDir)
    log_dir = state.log_path.parent
    handlers: list[logging.Handler] = [
        RotatingLog(state.log_path.name,
                    lambda name: state.open_file(log_dir / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT),
                    lambda old, new: os.replace(old, new, src_dir_fd=state.fd, dst_dir_fd=state.fd),
                    max_bytes_from_environment())]
    if foreground:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=level, handlers=handlers, force=True,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s")
    logging.getLogger("mfusepy").setLevel(logging.WARNING if verbose < 2 else logging.DEBUG)


def run(opts: MountOptions, state: StateDir, platform: Platform, lock: StateLock, ready_fd: int | None) -> int:
    """The daemon proper: returns when the file system is unmounted."""
    from vnvdimm.fuse.libfuse import serve
    from vnvdimm.fuse.ops import VnvdimmOperations
    from vnvdimm.fuse.options import raise_readahead
    from vnvdimm.fuse.sysfs_ops import SysfsConnections
    from vnvdimm.ioctl.server import IoctlServer
    from vnvdimm.memmap import MemmapEngine
    from vnvdimm.sysfs.tree import Tree

    lock.update_pid()
    # ps shows `vnvdimm daemon MNT` and `vnvdimm worker N MNT` (set before the workers fork).
    set_title("vnvdimm", "daemon", str(opts.mountpoint))
    setup_logging(state, opts.verbose, opts.foreground)
    workers = opts.workers if opts.workers is not None else platform.memmap.workers
    # Stop requests are taken by a thread of ours, not by libfuse's handlers: blocked readers
    # must be woken (their jobs cancelled) before the loop may stop its threads, and open
    # device files decide between detaching and stopping. So the signals are blocked before
    # the first thread exists (the engine's start threads, and every thread inherits the mask
    # of its creator): a process signal is delivered to any thread that does not block it.
    # (Forked workers inherit the mask too: they exit when the daemon tells them or dies.)
    # SIGPIPE too: each /sys connection's loop (libfuse's fuse_main_real) takes its disposition
    # for its own handler and leaves SIG_DFL behind when it ends, and one write to a peer that
    # went away would then kill the daemon without a word. Blocked, a write gets EPIPE.
    signal.pthread_sigmask(signal.SIG_BLOCK, {*STOP_SIGNALS, signal.SIGPIPE})
    signal.signal(WAKE_SIGNAL, lambda signum, frame: None)
    engine = MemmapEngine(workers=workers, title=str(opts.mountpoint))
    engine.start()  # fork the workers now, before any thread exists
    # `kill -USR1 <daemon>` writes the stack of every thread into the log: what a hung call
    # waits on. (After the fork: the workers keep the default action.)
    stacks = os.fdopen(open_log(state), "a")  # for the life of the daemon
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    record = mount_record(opts.mountpoint)
    machine = boot(platform, state, engine, platform.memmap)
    system = machine.system
    system.modules = PlatformModules(platform, state, system)
    teardown: Teardown | None = None
    loop_disks: LoopDisks | None = None
    ioctls = IoctlServer(system, ioctl_socket(opts.mountpoint))
    try:
        ioctls.start()
        tree = Tree(system)
        if LoopDisks.available():
            # root's mount carries device nodes: the disks can be block devices (vnvdimm.blockdev)
            loop_disks = LoopDisks(tree, opts.mountpoint)
            tree.block_devices = loop_disks

        def ready() -> None:
            # The loop answers once init ran; make sure a lookup goes through, then tell the parent.
            for _ in range(200):
                try:
                    os.stat(opts.mountpoint / "sys" / "bus" / "nd")
                    break
                except OSError:
                    time.sleep(0.01)
            # only files of this mount have ioctls (the daemon reads the node from the descriptor)
            ioctls.mount_dev = os.stat(opts.mountpoint).st_dev
            raise_readahead(str(opts.mountpoint))
            assert teardown is not None
            teardown.write_record()
            log.info("mounted %s (state %s)", opts.mountpoint, state.path)
            if ready_fd is not None:
                with contextlib.suppress(OSError):
                    os.write(ready_fd, b"ok\n")
                    os.close(ready_fd)

        def on_ready() -> None:
            ready()
            assert teardown is not None
            teardown.watch_mount()

        ops = VnvdimmOperations(tree, on_ready=on_ready, ioctl_socket=str(ioctls.path))
        sysfs_connections = SysfsConnections(tree, WAKE_SIGNAL)
        ioctls.on_attach = lambda a: sysfs_connections.attach(a.fd, a.target, a.pid, a.uid, a.gid)
        ioctls.on_values_changed = tree.values_changed
        teardown = Teardown(system, opts.mountpoint, ops, state, record, stacks)
        teardown.sysfs_connections = sysfs_connections
        ops.on_device_release = teardown.device_released
        threading.Thread(target=teardown.on_signals, name="vnvdimm-signals", daemon=True).start()
        serve(ops, str(opts.mountpoint), allow_other=opts.allow_other, debug=opts.verbose >= 3,
              anchor_fd=opts.mountpoint_fd, source=opts.source)
        log.info("unmounted %s", opts.mountpoint)
        return 0
    finally:
        if teardown is not None:
            teardown.loop_done.set()
            teardown.quiesce()
        if loop_disks is not None:
            loop_disks.close()
        ioctls.close()
        machine.close()
        with contextlib.suppress(FileNotFoundError):
            record.unlink()


#: Interrupts the FUSE loop's main thread (a handler that does nothing) so that it sees the
#: loop was told to end: libfuse's main thread sleeps until a loop thread reports the end of
#: the connection, which never comes while files are still open on a detached mount.
WAKE_SIGNAL = signal.SIGURG
STOP_SIGNALS = {*DETACH_SIGNALS, FORCE_SIGNAL}
#: After a stop, the loop ends once every thread has left our handlers (quiesced: promptly).
#: Should one not, the daemon still exits after this long (stacks in the log), its media synced.
LOOP_EXIT_GRACE_S = 3.0


class Teardown:
    """Stopping the daemon whatever the trigger, without losing data and without a request
    left waiting.

    Detach (`umount`, `umount -l`, `fusermount3 -u [-z]`, SIGTERM/SIGINT/SIGHUP): the mount
    leaves the tree; while device files are still open (a process, a mapping, a loop device),
    the daemon keeps serving them, and stops when the last one is closed. Stop (that moment,
    or at once for `umount --force` = SIGQUIT): every memmap job is cancelled and every device
    closed, so requests in flight return (an error for readers of blocks not initialized), the
    media are synced, and the FUSE loop is told to end and its main thread woken: the loop
    then ends as soon as its threads have left our handlers, whether files are open or not.
    """

    def __init__(self, system: System, mountpoint: Path, ops: VnvdimmOperations, state: StateDir,
                 record: Path, stacks: TextIO) -> None:
        self.system = system
        self.mountpoint = mountpoint
        self.ops = ops
        self.state = state
        self.record = record
        self.stacks = stacks
        self.main_thread = threading.get_ident()  # the thread that runs the FUSE loop
        self.loop_done = threading.Event()
        self._lock = threading.Lock()
        self._detached = False
        self._stopping = False
        self._quiesce_lock = threading.Lock()
        self._quiesced = False
        self.sysfs_connections: SysfsConnections | None = None

    def write_record(self, serving: list[str] | None = None) -> None:
        doc: dict[str, object] = {"pid": os.getpid(), "state_dir": str(self.state.path),
                                  "mountpoint": str(self.mountpoint)}
        if serving:
            doc["serving"] = serving
        tmp = self.record.with_suffix(".tmp")
        with os.fdopen(safe_files.open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w") as f:
            f.write(json.dumps(doc))
        tmp.replace(self.record)

    def on_signals(self) -> None:
        while True:
            signum = signal.sigwait(STOP_SIGNALS)
            name = signal.Signals(signum).name
            if signum == FORCE_SIGNAL:
                self.stop(f"signal {name} (umount --force)")
                return
            self.detach(f"signal {name}")

    def detach(self, why: str) -> None:
        """Leave the tree; stop now if no device file is open, else when the last one closes."""
        with self._lock:
            if self._stopping:
                return
            self._detached = True
        if is_mounted(self.mountpoint):
            lazy_unmount(self.mountpoint)
        busy = self.ops.open_devices()
        if not busy:
            self.stop(why)
            return
        serving = [f"{path} (pid {pid})" for path, pid in busy]
        log.warning("%s: detached; serving %d open device file(s) until they are closed: %s", why, len(busy),
                    ", ".join(serving))
        with contextlib.suppress(OSError):
            self.write_record(serving)
        self.device_released()  # the last one may have gone while we looked

    def device_released(self) -> None:
        """Called from a loop thread: it must not wait for the loop to end."""
        with self._lock:
            due = self._detached and not self._stopping and not self.ops.open_devices()
        if due:
            threading.Thread(target=self.stop, args=("the last open device file was closed",),
                             name="vnvdimm-stop", daemon=True).start()

    def stop(self, why: str) -> None:
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        busy = self.ops.open_devices()
        if busy:
            log.warning("stopping: %s; breaking open device files (their I/O fails from now on): %s", why,
                        ", ".join(f"{path} (pid {pid})" for path, pid in busy))
        else:
            log.info("stopping: %s", why)
        self.quiesce()
        if self.sysfs_connections is not None:
            self.sysfs_connections.end_all()
        if is_mounted(self.mountpoint):
            lazy_unmount(self.mountpoint)
        self.end_loop()

    def quiesce(self) -> None:
        """Cancel every memmap job and close every device (requests in flight return), then
        sync the media. Once, whoever asks first (a stop, or the loop's end)."""
        with self._quiesce_lock:
            if self._quiesced:
                return
            self._quiesced = True
            power_off(self.system)

    def end_loop(self) -> None:
        """Tell libfuse's loop to end and wake its main thread until it has (a signal sent
        just before it goes to sleep would be lost, so it is repeated)."""
        deadline = time.monotonic() + LOOP_EXIT_GRACE_S
        while not self.loop_done.is_set():
            if not self.ops.exit_loop():
                return  # the loop is over (libfuse destroyed its handle)
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(self.main_thread, WAKE_SIGNAL)
            if self.loop_done.wait(0.1):
                return
            if time.monotonic() > deadline:
                log.error("the FUSE loop did not end %.0f s after the stop; stacks of every thread follow; exiting",
                          LOOP_EXIT_GRACE_S)
                faulthandler.dump_traceback(file=self.stacks, all_threads=True)
                self.stacks.flush()
                sync_media(self.system)
                with contextlib.suppress(OSError):
                    self.record.unlink()
                logging.shutdown()
                os._exit(1)

    def watch_mount(self) -> None:
        """Detach once our mount leaves the mount table (`umount`, `fusermount3 -u [-z]`)."""
        if watch_unmount(self.mountpoint, lambda: self._detached or self._stopping):
            self.detach("unmounted")


def mount(opts: MountOptions) -> int:
    try:
        state, platform, lock = prepare(opts)
    except (MountError, ConfigError) as e:
        print(f"vnvdimm: {e}", file=sys.stderr)
        if opts.mountpoint_fd is not None:
            os.close(opts.mountpoint_fd)
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
