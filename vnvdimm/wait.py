"""`vnvdimm wait`: block until memmaps are idle, woken by poll() on `memmap_state`.

The ABI is the series': `memmap_state` reads ``active`` or ``idle``, and poll() on it wakes
with POLLPRI|POLLERR when it changes (sysfs_notify). So the waiter opens each state file,
reads it (which arms the notification, as with any sysfs attribute), poll()s, and re-reads the
files that woke. Without a terminal nothing else happens until a state changes or the timeout
expires; on a terminal the poll also times out a few times a second to redraw the progress
bars (rich), which read ``memmap/pages_done``.

Exit status: 0 when every memmap waited for is idle, 1 on timeout, 2 on a usage error
(not a mount, no such device), 130 on Ctrl-C.
"""

from __future__ import annotations

import errno
import os
import select
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vnvdimm.client import NotAMount, Root, read_attr, read_int
from vnvdimm.mounts import DEAD_ERRNOS, daemon_errno
from vnvdimm.status import human_eta, human_rate

POLL_EVENTS = select.POLLPRI | select.POLLERR
REDRAW_S = 0.1


@dataclass
class Target:
    """A memmap to wait for: the pfn/dax device that owns it, and what the user called it."""

    label: str
    device: str
    dev_dir: Path

    @property
    def state_path(self) -> Path:
        return self.dev_dir / "memmap_state"


class UnknownDevice(LookupError):
    pass


def resolve(root: Root, name: str) -> Target:
    """A device name as a user knows it: a device file (`pmem0`, `dax1.0`, `/dev/pmem0`), a
    namespace (`namespace0.0`: its holder), or a pfn/dax device itself (`pfn0.1`). Device files
    come first: `dax1.0` is the character device even where an nd device `dax1.0` exists too."""
    base = name[len("/dev/"):] if name.startswith("/dev/") else name
    if "/" in base or not base:
        raise UnknownDevice(f"{name}: not a device name")
    dax = root.sys / "bus" / "dax" / "devices" / base
    if os.path.lexists(dax):
        return Target(name, *_dev(Path(os.path.realpath(dax)).parent))
    block = root.sys / "block" / base
    if os.path.lexists(block):
        return Target(name, *_dev(Path(os.path.realpath(block)).parent.parent))
    nd = root.nd_devices / base
    if os.path.lexists(nd):
        path = Path(os.path.realpath(nd))
        if base.startswith("namespace"):
            holder = read_attr(path / "holder")
            if holder:
                path = path.parent / holder
        return Target(name, *_dev(path))
    raise UnknownDevice(f"{name}: no such device (not a pmem/dax device file, namespace, pfn or dax device)")


def _dev(path: Path) -> tuple[str, Path]:
    return path.name, path


def all_targets(root: Root) -> list[Target]:
    """Every pfn and dax device (seeds included: they read idle)."""
    try:
        names = sorted(os.listdir(root.nd_devices))
    except OSError:
        return []
    out = []
    for name in names:
        if name.startswith(("pfn", "dax")):
            path = Path(os.path.realpath(root.nd_devices / name))
            out.append(Target(name, name, path))
    return out


class StateWatch:
    """Open `memmap_state` files, their last value, and a poll object on them."""

    def __init__(self) -> None:
        self.poller = select.poll()
        self.fds: dict[int, Target] = {}
        self.by_device: dict[str, int] = {}
        self.state: dict[str, str] = {}

    def add(self, target: Target) -> None:
        if target.device in self.by_device or target.device in self.state:
            return
        try:
            fd = os.open(target.state_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.state[target.device] = "idle"  # no memmap (raw, sector) or gone: nothing to wait for
            return
        self.fds[fd] = target
        self.by_device[target.device] = fd
        self.poller.register(fd, POLL_EVENTS)
        self._read(fd)

    def _read(self, fd: int) -> None:
        target = self.fds[fd]
        try:
            value = os.pread(fd, 64, 0).decode(errors="replace").strip()
        except OSError:
            value = "idle"  # the device went away (disabled): its memmap is gone with it
        self.state[target.device] = value or "idle"
        if self.state[target.device] != "active":
            self.poller.unregister(fd)
            del self.fds[fd]
            del self.by_device[target.device]
            os.close(fd)

    def active(self) -> list[str]:
        return [dev for dev, value in self.state.items() if value == "active"]

    def poll(self, timeout_s: float | None) -> None:
        """Wait for a state change (or the timeout), then re-read the files that woke."""
        if not self.fds:
            return
        ms = None if timeout_s is None else max(0, int(timeout_s * 1000 + 0.999))
        try:
            events = self.poller.poll(ms)
        except InterruptedError:
            return
        for fd, _ev in events:
            if fd in self.fds:
                self._read(fd)

    def close(self) -> None:
        for fd in list(self.fds):
            os.close(fd)
        self.fds.clear()
        self.by_device.clear()


def wait_idle(root: Root, targets: list[Target] | None, timeout: float | None,
              on_tick: Callable[[StateWatch], None] | None = None, tick: float | None = None) -> bool:
    """True once every target (None: every pfn/dax device, re-listed at each wake) is idle;
    False when `timeout` seconds passed first. `on_tick` runs after each wake and at least
    every `tick` seconds (for progress bars); without it the only wake-ups are state changes."""
    deadline = None if timeout is None else time.monotonic() + timeout
    watch = StateWatch()
    try:
        while True:
            for target in targets if targets is not None else all_targets(root):
                watch.add(target)
            if on_tick is not None:
                on_tick(watch)
            if not watch.active():
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            wait_for = remaining if tick is None else (tick if remaining is None else min(tick, remaining))
            watch.poll(wait_for)
    finally:
        watch.close()


# ---------------------------------------------------------------- progress (rich)


class ProgressView:
    """One rich progress bar per memmap being waited for, on stderr."""

    def __init__(self, root: Root, targets: Iterable[Target] | None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn

        self.root = root
        self.console = Console(file=sys.stderr, highlight=False)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            MofNCompleteColumn(),
            TextColumn("pages  {task.fields[rate]}  ETA {task.fields[eta]}"),
            console=self.console, auto_refresh=False, transient=False,
        )
        self.tasks: dict[str, Any] = {}
        self.labels = {t.device: t.label for t in targets or ()}

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.refresh()
        self.progress.stop()

    def update(self, watch: StateWatch) -> None:
        for device, value in watch.state.items():
            fd = watch.by_device.get(device)
            target = watch.fds.get(fd) if fd is not None else None
            if device not in self.tasks:
                if value != "active" or target is None:
                    continue  # never show devices that were idle from the start
                label = self.labels.get(device, device)
                desc = f"{label} ({device})" if label != device else device
                self.tasks[device] = (self.progress.add_task(desc, total=None, rate="", eta="-:--"), target)
            task_id, tgt = self.tasks[device]
            mm = tgt.dev_dir / "memmap"
            total = read_int(mm / "pages_total") or None
            done = read_int(mm / "pages_done") or 0
            rate = read_int(mm / "pages_per_sec") or 0
            if value != "active" and total:
                done = total
            eta = human_eta((total - done) / rate if total and rate and value == "active" else None)
            self.progress.update(task_id, total=total, completed=done, rate=human_rate(rate), eta=eta)
        self.progress.refresh()


# ---------------------------------------------------------------- the command


def run(mountpoint: str, devices: list[str], timeout: float | None, quiet: bool = False) -> int:
    try:
        root = Root.of(mountpoint)
        targets = [resolve(root, name) for name in devices] if devices else None
    except (NotAMount, UnknownDevice) as e:
        print(f"vnvdimm: {e}", file=sys.stderr)
        return 2
    show = not quiet and sys.stderr.isatty()
    try:
        if show:
            with ProgressView(root, targets) as view:
                ok = wait_idle(root, targets, timeout, on_tick=view.update, tick=REDRAW_S)
        else:
            ok = wait_idle(root, targets, timeout)
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        if e.errno in (*DEAD_ERRNOS, errno.ENOENT):
            print(f"vnvdimm: {mountpoint}: the mount is gone", file=sys.stderr)
            return 2
        raise
    if ok:
        if daemon_errno(root.nd_devices) is not None:  # idle because the platform went away: not a success
            print(f"vnvdimm: {mountpoint}: the mount is gone", file=sys.stderr)
            return 2
        return 0
    busy = []
    for target in targets if targets is not None else all_targets(root):
        if read_attr(target.state_path) == "active":
            done = read_int(target.dev_dir / "memmap" / "pages_done")
            total = read_int(target.dev_dir / "memmap" / "pages_total")
            busy.append(f"{target.device} ({done}/{total} pages)")
    print(f"vnvdimm: wait: timed out after {timeout:g} s; still active: {', '.join(busy) or 'none'}",
          file=sys.stderr)
    return 1
