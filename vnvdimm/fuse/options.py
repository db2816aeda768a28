"""The mount's options: the kernel's side (given to fusermount3), libfuse's side (the loop
and the kernel's caches), the largest request, and the readahead window of device files."""

from __future__ import annotations

import logging
import os
from typing import Any

from vnvdimm.sysfs.kernfs import PAGE_SIZE

log = logging.getLogger("vnvdimm.fuse")

# The kernel's side of the mount (given to fusermount3). `dev` lets the standard character
# nodes (/dev/null...) work; only root may have it: an ordinary user's mount is nodev, and
# with-vnvdimm binds the host's nodes over them instead.
KERNEL_MOUNT_OPTIONS = ("fsname=vnvdimm", "subtype=vnvdimm", "default_permissions")
# libfuse's side (the loop and its caches).
# Names and attributes are cached by the kernel for an hour: every change of the tree is
# invalidated explicitly (VnvdimmOperations._invalidate), the timeout only bounds how long a
# missed one could last. A missing name is never cached (negative_timeout 0: a device that
# appears is seen at once; there is no node to invalidate for a name that does not exist).
CACHE_TIMEOUT_S = 3600.0
MAX_LOOP_THREADS = 1024
MOUNT_OPTIONS: dict[str, Any] = {
    "attr_timeout": CACHE_TIMEOUT_S,
    "entry_timeout": CACHE_TIMEOUT_S,
    "negative_timeout": 0,
    # Every request that waits (a read of a cold range, `echo sync`, wait_probe) holds one
    # loop thread until it returns; libfuse's default of 10 threads let ten such waiters
    # stall every other request of the mount, sysfs reads included.
    "max_threads": MAX_LOOP_THREADS,
    # libfuse 3.14's fuse_main_real() hands its max_idle_threads to fuse_loop_cfg_set_idle_threads()
    # even when the option was not given; the unset value (UINT_MAX) is refused there with
    # "Ignoring invalid max threads value 4294967295 > max (100000)" on stderr (our log) at
    # every mount. Given explicitly and equal to max_threads it means what the unset value
    # does: an idle thread never leaves (one more idle thread than threads cannot exist), so
    # every loop thread keeps its pinned Python thread state (pin_thread_state()).
    "max_idle_threads": MAX_LOOP_THREADS,
}


def _pipe_max_bytes() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20  # the kernel's default


# The largest request (read or write) the kernel sends. libfuse splices a request into a pipe
# and a reply out of one only while the whole message fits that pipe: a request needs its
# data plus a page of headers, a reply its data plus a page for each buffer and one more.
# Pipes above fs.pipe-max-size (1 MiB by default) need CAP_SYS_RESOURCE in the initial user
# namespace; without it libfuse's attempt to grow its pipe fails once per thread and every
# later request of that thread is copied through memory instead: for a 1 MiB read, a fresh
# 1 MiB buffer (256 page faults), a pread into it and a write of it to /dev/fuse. Six pages
# below the pipe size: a reply of up to three media extents still fits (libfuse counts a
# page for the header, one per buffer and one spare). 256 pages is the kernel's own cap.
REQUEST_BYTES = min(256, _pipe_max_bytes() // PAGE_SIZE - 6) * PAGE_SIZE
# Readahead in windows of whole requests; the kernel's default window is 128 KiB.
READ_AHEAD_KB = REQUEST_BYTES >> 10


def raise_readahead(mountpoint: str) -> None:
    """Let buffered reads of device files reach the daemon as requests of REQUEST_BYTES
    instead of 128 KiB ones, through the mount's backing_dev_info (root only; harmless if refused)."""
    dev = os.stat(mountpoint).st_dev
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(f"{READ_AHEAD_KB}\n")
    except OSError as e:
        log.info("cannot raise %s: %s", path, e.strerror)
