"""Stopping a mount by `vnvdimm umount`'s rules, without losing data: a busy mount (a device
file open, mapped or backing a loop device: see mounts.holders) is refused, `--lazy` detaches
it and lets the daemon serve the open files until they are closed, `--force` says what it
breaks and stops the daemon at once. Used by `vnvdimm umount`, the test bed, the tests and the
benchmarks (stop_mount)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from vnvdimm import safe_files
from vnvdimm.mounts import (
    FORCE_SIGNAL,
    Holder,
    MountEntry,
    NotVnvdimm,
    check_is_vnvdimm,
    clean_stale_records,
    daemon_pid,
    describe,
    holders,
    is_dead_mount,
    is_mounted,
    lazy_unmount,
    mount_entry,
    owner_of,
    process_alive,
    read_record,
    user_name,
    wait_exit,
)


class UmountRefused(RuntimeError):
    """The mount is busy (the message names the devices and processes); nothing was changed."""

    def __init__(self, message: str, found: list[Holder]) -> None:
        super().__init__(message)
        self.holders = found


MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
MAX_SWAPS = 40  # looks at a mount point's parent before its changing is refused (as safe_files' walk)


class _Target:
    """What stop() unmounts. As root, the mount on `mountpoint.name` in the parent directory
    as it was when stop() looked (held by a descriptor; unmounted through /proc/self/fd with
    UMOUNT_NOFOLLOW): whoever can rename a directory on the path cannot make the unmount land
    on another mount by swapping it for a link meanwhile (fusermount3 and umount(8) look the
    path up again). Others unmount through fusermount3, which only lets them unmount their
    own mounts."""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.parent_fd: int | None = None

    def find(self) -> MountEntry | None:
        """The mount at the path (mount_entry()) and, as root, its parent directory held: the
        very directory the path names while the mount is looked up (looked at again, a few
        times, while something renames or swaps it; then RuntimeError)."""
        for _ in range(MAX_SWAPS):
            self.close()
            if os.geteuid() == 0:
                with contextlib.suppress(OSError):
                    self.parent_fd = os.open(self.mountpoint.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            if self.parent_fd is None:
                return mount_entry(self.mountpoint)
            # where the directory held is, before and after the mount table is read
            if self._where() == str(self.mountpoint.parent):
                entry = mount_entry(self.mountpoint)
                if self._where() == str(self.mountpoint.parent):
                    return entry
            time.sleep(0.001)
        self.close()
        raise RuntimeError(f"{self.mountpoint.parent} keeps changing while vnvdimm looks at it (something renames it "
                           "or swaps it for a link); nothing was unmounted")

    def _where(self) -> str:
        return os.readlink(f"/proc/self/fd/{self.parent_fd}")

    def unmount(self, lazy: bool) -> str:
        """"" when done, else why not (in fusermount3's words)."""
        if self.parent_fd is None:
            if lazy:
                lazy_unmount(self.mountpoint)
                return ""
            res = subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True, text=True,
                                 timeout=60)
            return "" if res.returncode == 0 else res.stderr.strip().removeprefix("fusermount3: ") or "unmount failed"
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        path = os.fsencode(f"/proc/self/fd/{self.parent_fd}/{self.mountpoint.name}")
        if libc.umount2(path, (MNT_DETACH if lazy else 0) | UMOUNT_NOFOLLOW) == 0:
            return ""
        return f"failed to unmount {self.mountpoint}: {os.strerror(ctypes.get_errno())}"

    def close(self) -> None:
        if self.parent_fd is not None:
            os.close(self.parent_fd)
            self.parent_fd = None


def umount(mountpoint: Path, mode: str = "normal", timeout: float = 10.0, out: TextIO | None = None) -> int:
    """`vnvdimm umount [--lazy|--force] MNT`. Exit status: 0 gone (or, with --lazy, detached),
    1 refused or failed (a message on `out` says why)."""
    out = out or sys.stderr
    with contextlib.suppress(OSError, safe_files.UnsafeStateDir):
        clean_stale_records()
    entry = mount_entry(mountpoint)
    try:
        if entry is not None:
            check_is_vnvdimm(mountpoint, entry, mode)
            owner = owner_of(entry)
            if owner is not None and owner != os.geteuid():
                print(f"vnvdimm: {mountpoint}: --force: stopping the vnvdimm mount of {user_name(owner)}",
                      file=out, flush=True)
        message = stop(mountpoint, mode, timeout)
    except NotVnvdimm as e:
        print(f"vnvdimm: {e}", file=out)
        return 1
    except UmountRefused as e:
        print(f"vnvdimm: {e}", file=out)
        return 1
    except RuntimeError as e:
        print(f"vnvdimm: {mountpoint}: {e}", file=out)
        return 1
    if message:
        print(f"vnvdimm: {message}", file=out)
    return 0


def stop(mountpoint: Path, mode: str = "normal", timeout: float = 10.0) -> str:
    """Unmount `mountpoint` and see its daemon exit. `mode`: "normal" refuses a busy mount
    (UmountRefused, nothing changed), "lazy" detaches it and leaves the daemon serving the
    open files until they are closed, "force" stops the daemon whatever is open. Returns a
    note for the user ("" when there is nothing to say); raises RuntimeError when the daemon
    had to be killed or could not be stopped."""
    target = _Target(mountpoint)
    try:
        return _stop(target, mode, timeout)
    finally:
        target.close()


def _stop(target: _Target, mode: str, timeout: float) -> str:
    mountpoint = target.mountpoint
    entry = target.find()
    pid = daemon_pid(mountpoint)
    if entry is None:
        if pid is not None and mode == "force":
            return _force(target, pid, [], timeout)
        if pid is not None:
            return f"{mountpoint}: already detached; daemon {pid} serves its open files until they are closed"
        raise RuntimeError("not mounted")
    found = holders(mountpoint, entry, daemon=pid)
    busy = [h for h in found if h.device]
    if pid is None:
        return _without_daemon(target, mode, busy)
    if mode == "force":
        return _force(target, pid, busy, timeout)
    if mode == "lazy":
        target.unmount(lazy=True)
        if is_mounted(mountpoint):
            raise RuntimeError("the lazy unmount failed")
        if busy:
            return (f"{mountpoint}: detached; daemon {pid} serves these until they are closed, then exits:"
                    + describe(busy))
        return "" if wait_exit(pid, timeout) else f"{mountpoint}: detached; daemon {pid} is still exiting"
    if busy:
        raise UmountRefused(f"{mountpoint}: busy, device files in use (close them, or use --lazy to detach "
                            f"and let them finish, or --force to break them):" + describe(busy), busy)
    why = target.unmount(lazy=False)
    if why:
        others = holders(mountpoint, daemon=pid)
        raise UmountRefused(f"{mountpoint}: {why}" + describe(others), others)
    if wait_exit(pid, timeout):
        return ""
    serving = read_record(mountpoint).get("serving")
    if serving:
        # Opened between our look and the unmount (in another mount namespace): no kill.
        raise RuntimeError(f"unmounted, but device files were opened meanwhile; daemon {pid} serves them "
                           f"until they are closed: {', '.join(map(str, serving))}")  # type: ignore[call-overload]
    _kill(pid)
    raise RuntimeError(f"daemon {pid} did not exit in {timeout:.0f} s (no device file was open); killed it")


def _without_daemon(target: _Target, mode: str, busy: list[Holder]) -> str:
    """No record of a running daemon (it died, or was started with another runtime dir): the
    same refusal, then the kernel's own busy check; a dead mount is removed lazily."""
    mountpoint = target.mountpoint
    if busy and mode == "normal":
        raise UmountRefused(f"{mountpoint}: busy, device files in use (close them, or use --lazy or --force):"
                            + describe(busy), busy)
    if mode == "normal":
        why = target.unmount(lazy=False)
        if not why:
            return ""
        if not is_dead_mount(mountpoint):
            others = holders(mountpoint)
            raise UmountRefused(f"{mountpoint}: {why}" + describe(others), others)
    target.unmount(lazy=True)
    return ""


def _force(target: _Target, pid: int, busy: list[Holder], timeout: float) -> str:
    mountpoint = target.mountpoint
    note = ""
    if busy:
        note = f"{mountpoint}: --force: stopping the daemon under these (their I/O fails from now on):" + describe(busy)
        print(f"vnvdimm: {note}", file=sys.stderr, flush=True)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, FORCE_SIGNAL)
    if not wait_exit(pid, timeout):
        _kill(pid)
        raise RuntimeError(f"daemon {pid} did not stop in {timeout:.0f} s; killed it")
    if is_mounted(mountpoint):
        target.unmount(lazy=True)
    return ""


def _kill(pid: int) -> None:
    """SIGKILL the daemon and its workers (its process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_exit(pid, 5)


def stop_mount(mountpoint: Path, pid: int | None, timeout: float = 10.0, force: bool = False) -> list[Holder]:
    """Teardown for test beds and test fixtures, by the same rules as `vnvdimm umount`: a
    mount without open device files goes, and its daemon exits (a daemon that does not is
    killed: it held nothing); a busy one is detached (the daemon serves the open files until
    they are closed, nothing is killed) and its holders are returned for the caller to report.
    `force`: as `vnvdimm umount --force` (for callers that killed the holders themselves)."""
    if pid is not None and pid > 0 and not is_mounted(mountpoint) and not process_alive(pid):
        return []
    try:
        stop(mountpoint, "force" if force else "normal", timeout)
    except UmountRefused as e:
        if any(h.device for h in e.holders):
            lazy_unmount(mountpoint)
            return e.holders
        lazy_unmount(mountpoint)  # only attribute files or a working directory: nothing to lose
    except RuntimeError:
        pass
    if is_mounted(mountpoint):
        lazy_unmount(mountpoint)
    if pid is not None and pid > 0 and not wait_exit(pid, timeout):
        serving = read_record(mountpoint).get("serving")
        if serving:
            return [Holder(str(s), "open (seen by the daemon)") for s in serving]  # type: ignore[attr-defined]
        _kill(pid)
    return []
