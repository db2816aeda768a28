"""A test bed for code that uses persistent memory: umockdev's idea, for libnvdimm.

A :class:`Testbed` mounts an emulated platform (a topology given as a dict, TOML text or a
TOML file) in a temporary directory, runs commands and Python callables in a private mount
namespace where ``/sys`` and ``/dev`` are the emulated ones (so ndctl, daxctl, your scripts
and your services see the emulated pmem and nothing else changes), drives the platform (modes,
memmap speed, a pause at a chosen point of the memmap init, media errors) and tears
everything down: the mount, the daemon and its workers, the temporary files. Always, also
when the test fails; a test bed still running at interpreter exit is stopped then.

    from vnvdimm.testbed import Testbed

    with Testbed({"memmap": {"ns_per_page": 20000},
                  "region": [{"size": "256M", "namespace": {"mode": "fsdax"}}]}) as tb:
        tb.pause_memmap("pmem0", at=0.5)
        print(tb.ndctl("list", "-N"))
        assert tb.call(lambda: open("/sys/block/pmem0/device/memmap_state").read()) == "active\\n"

It runs as root, or as an ordinary user where the system lets users mount FUSE file systems
(/dev/fuse readable and writable by them, fusermount3 setuid root: a stock Debian or Ubuntu)
and make user namespaces; :func:`unsupported_reason` says why not where it cannot run. The
pytest plugin (:mod:`vnvdimm.pytest_plugin`) wraps it in fixtures.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import json
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vnvdimm import blockdev, client
from vnvdimm import wait as wait_mod
from vnvdimm.fuse import fusermount
from vnvdimm.mounts import Holder, describe, is_mounted
from vnvdimm.preload import PreloadMissing, library_path
from vnvdimm.safe_files import write_atomically
from vnvdimm.scripts import WITH_VNVDIMM
from vnvdimm.topology.config import MODES, ConfigError, parse_config
from vnvdimm.topology.record import Platform
from vnvdimm.topology.statedir import StateDir
from vnvdimm.umount import stop_mount


def with_preload(env: dict[str, str] | None) -> dict[str, str]:
    """The environment for with-vnvdimm, naming this installation's preload library (so the
    commands see device nodes and reach the ioctls even when `vnvdimm` is not on PATH)."""
    out = dict(os.environ if env is None else env)
    if "VNVDIMM_PRELOAD" not in out:
        with contextlib.suppress(PreloadMissing):
            out["VNVDIMM_PRELOAD"] = str(library_path())
    return out

#: The platform a test bed mounts when given none: small and quick to initialize.
DEFAULT_TOPOLOGY: dict[str, Any] = {
    "template": "e820",
    "memmap": {"workers": 2},
    "region": [
        {"size": "256M", "namespace": {"mode": "fsdax", "map": "dev", "align": "2M"}},
        {"size": "256M", "namespace": {"mode": "devdax", "map": "mem", "align": "2M"}},
    ],
}



class TestbedError(RuntimeError):
    """A test bed operation failed (the message says what the platform answered)."""

    __test__ = False  # not a pytest test class


class RemoteError(RuntimeError):
    """An exception raised by a callable run with :meth:`Testbed.call` that could not be
    sent back as itself; its message is the child's traceback."""


# ---------------------------------------------------------------- TOML (the config schema only)


def to_toml(doc: dict[str, Any]) -> str:
    """Serialize a topology dict (tables, arrays of tables, inline tables, scalars) as TOML."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {scalar(x)}" for k, x in v.items()) + " }"
        raise TypeError(f"cannot write {v!r} as TOML")

    def is_table_array(v: Any) -> bool:
        return isinstance(v, list | tuple) and bool(v) and all(isinstance(x, dict) for x in v)

    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    arrays: list[tuple[str, list[dict[str, Any]]]] = []
    for key, value in doc.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif is_table_array(value) and key in ("region", "dimm"):
            arrays.append((key, list(value)))
        else:
            lines.append(f"{key} = {scalar(value)}")
    for key, table in tables:
        lines.append(f"[{key}]")
        lines.extend(f"{k} = {scalar(v)}" for k, v in table.items())
    for key, items in arrays:
        for item in items:
            lines.append(f"[[{key}]]")
            lines.extend(f"{k} = {scalar(v)}" for k, v in item.items())
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- mount namespace (for callables)

_CLONE_NEWNS, _CLONE_NEWUSER = 0x00020000, 0x10000000
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _mount(source: str | None, target: str, flags: int) -> None:
    src = source.encode() if source is not None else None
    if _libc.mount(src, target.encode(), None, ctypes.c_ulong(flags), None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {source} on {target}: {os.strerror(e)}")


def enter_namespace(root: Path) -> None:
    """In the calling process: a private mount namespace with root/sys over /sys and root/dev
    over /dev (the host's /dev/pts and /dev/shm bound into it), as with-vnvdimm sets it up.
    An ordinary user first gets a user namespace in which they are root (and, their mount
    being nodev, the host's standard character devices bound over the emulated ones)."""
    rootless = os.geteuid() != 0
    if rootless:
        uid, gid = os.geteuid(), os.getegid()
        _unshare(_CLONE_NEWUSER | _CLONE_NEWNS, "unshare(CLONE_NEWUSER|CLONE_NEWNS)")
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    else:
        _unshare(_CLONE_NEWNS, "unshare(CLONE_NEWNS)")
    _mount(None, "/", _MS_REC | _MS_PRIVATE)
    _mount("/dev/pts", str(root / "dev" / "pts"), _MS_BIND)
    _mount("/dev/shm", str(root / "dev" / "shm"), _MS_BIND)
    if rootless:
        for node in HOST_CHAR_NODES:
            if os.path.exists(f"/dev/{node}") and os.path.lexists(root / "dev" / node):
                _mount(f"/dev/{node}", str(root / "dev" / node), _MS_BIND)
    session_open = False
    if os.geteuid() == 0:
        # /dev/pmem* as block devices while this process lives (vnvdimm.blockdev): its
        # session ends with it.
        with contextlib.suppress(OSError):
            _SESSIONS.append(os.open(root / blockdev.SESSION.lstrip("/"), os.O_RDONLY | os.O_CLOEXEC))
            session_open = True
    _mount(str(root / "dev"), "/dev", _MS_BIND | _MS_REC)
    _mount(str(root / "sys"), "/sys", _MS_BIND)
    if session_open:
        _mount(str(root / "proc" / "partitions"), "/proc/partitions", _MS_BIND)


_SESSIONS: list[int] = []  # the block-device session of a process in the namespace


HOST_CHAR_NODES = ("null", "zero", "full", "random", "urandom", "tty", "ptmx")


def _unshare(flags: int, what: str) -> None:
    if _libc.unshare(flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def unsupported_reason() -> str | None:
    """Why a test bed cannot run for this user on this machine, or None if it can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (modprobe fuse, or run the container with --device /dev/fuse)"
    try:
        fusermount.check_can_mount(allow_other=False)
    except fusermount.FusermountError as e:
        return str(e)
    if os.geteuid() == 0:
        return None
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            if int(f.read()) == 0:
                return "user namespaces are disabled (user.max_user_namespaces = 0): run as root"
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/sys/kernel/unprivileged_userns_clone") as f:
            if f.read().strip() == "0":
                return ("unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0): "
                        "run as root")
    except OSError:
        pass
    return None


# ---------------------------------------------------------------- the test bed

_LIVE: weakref.WeakSet[Testbed] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for tb in list(_LIVE):
        with contextlib.suppress(Exception):
            tb.stop()


class Testbed:
    """An emulated pmem platform for one test. See the module docstring."""

    __test__ = False  # not a pytest test class

    def __init__(self, topology: dict[str, Any] | str | os.PathLike[str] | None = None, *,
                 base_dir: str | os.PathLike[str] | None = None, workers: int | None = None,
                 ns_per_page: int | None = None, memmap_paused: bool = False, verbose: int = 0) -> None:
        """`topology`: a dict in the config file's schema, TOML text, or the path of a TOML
        file; None: :data:`DEFAULT_TOPOLOGY`. `workers` and `ns_per_page` override the
        topology's [memmap] settings. `memmap_paused`: every memmap is held at 0 pages from
        its start (``[memmap] pause_at = 0``) until :meth:`pause_memmap` moves it to a
        fraction or :meth:`resume_memmap` lets it finish. `base_dir`: where the temporary
        directory goes."""
        if topology is None:
            self.topology: dict[str, Any] | None = json.loads(json.dumps(DEFAULT_TOPOLOGY))
            self._toml = None
        elif isinstance(topology, dict):
            self.topology = json.loads(json.dumps(topology))
            self._toml = None
        elif isinstance(topology, str) and ("=" in topology or "[" in topology):
            self.topology, self._toml = None, topology
        else:
            self.topology, self._toml = None, Path(topology).read_text()
        if self.topology is not None:
            memmap = self.topology.setdefault("memmap", {})
            if workers is not None:
                memmap["workers"] = workers
            if ns_per_page is not None:
                memmap["ns_per_page"] = ns_per_page
            if memmap_paused:
                memmap["pause_at"] = 0
        elif workers is not None or ns_per_page is not None or memmap_paused:
            raise TestbedError("workers=, ns_per_page= and memmap_paused= need the topology as a dict (or set them "
                               "in the TOML's [memmap]: workers, ns_per_page, pause_at = 0)")
        self._base_dir = base_dir
        self.verbose = verbose
        self.dir: Path | None = None
        self.pid: int | None = None
        self._own_dir = False

    # -- building --------------------------------------------------------------------------------
    def add_region(self, size: str | int = "256M", mode: str = "fsdax", *, map: str | None = None,
                   align: str | int = "2M", numa_node: int = 0) -> Testbed:
        """Add an e820 region with one namespace in `mode`. On a started test bed this is a
        reboot with one more region plugged in: the platform is unmounted and mounted again
        with the new region after the others (their media, modes and data are kept; memmaps
        start over). Device files must be closed first (TestbedError otherwise)."""
        if self.topology is None:
            raise TestbedError("add_region() needs the topology as a dict")
        if self.topology.get("template", "e820") != "e820":
            raise TestbedError("add_region() adds e820 regions; describe nfit regions in the topology")
        if mode not in MODES:
            raise TestbedError(f"mode must be one of {', '.join(MODES)}")
        ns: dict[str, Any] = {"mode": mode, "align": align}
        if map is not None:
            ns["map"] = map
        self.topology.setdefault("template", "e820")
        self.topology.setdefault("region", []).append({"size": size, "numa_node": numa_node, "namespace": ns})
        if self.started:
            self._reboot()
        return self

    def _reboot(self) -> None:
        """Unmount and mount again with the current topology, keeping the state dir's media.
        The platform record (what the firmware tables say) is rewritten from the topology;
        regions already there keep their place, so their media still fit."""
        assert self.dir is not None
        busy = self._unmount()
        if busy:
            raise TestbedError(f"{self.root}: cannot reboot with device files in use; detached, the daemon serves "
                               "them until they are closed:" + describe(busy))
        try:
            platform = Platform.from_config(parse_config(tomllib.loads(self.toml), "the test bed's topology"))
        except ConfigError as e:
            raise TestbedError(str(e)) from None
        write_atomically(StateDir(self.state_dir).platform_path, platform.to_json().encode())
        self._mount()

    @property
    def toml(self) -> str:
        return self._toml if self._toml is not None else to_toml(self.topology or {})

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self.pid is not None

    @property
    def root(self) -> Path:
        if self.dir is None:
            raise TestbedError("the test bed is not started")
        return self.dir / "mnt"

    @property
    def sys(self) -> Path:
        """The emulated /sys, seen from this (the host's) namespace."""
        return self.root / "sys"

    @property
    def dev(self) -> Path:
        """The emulated /dev, seen from this namespace."""
        return self.root / "dev"

    @property
    def state_dir(self) -> Path:
        assert self.dir is not None
        return self.dir / "state"

    @property
    def log(self) -> str:
        """The daemon's log (every refused store is there, with its reason)."""
        try:
            return (self.state_dir / "vnvdimm.log").read_text()
        except OSError:
            return ""

    def start(self) -> Testbed:
        if self.started:
            return self
        reason = unsupported_reason()
        if reason is not None:
            raise TestbedError(f"a vnvdimm test bed cannot run here: {reason}")
        self.dir = Path(tempfile.mkdtemp(prefix="vnvdimm-testbed-", dir=self._base_dir))
        self._own_dir = True
        self.root.mkdir()
        _LIVE.add(self)
        try:
            self._mount()
        except BaseException:
            self._cleanup_dir()
            raise
        return self

    def _mount(self) -> None:
        assert self.dir is not None
        config = self.dir / "topology.toml"
        config.write_text(self.toml)
        cmd = [sys.executable, "-m", "vnvdimm.cli", "mount", str(self.root), "--config", str(config),
               "--state-dir", str(self.state_dir), *(["-v"] * self.verbose)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            self.pid = None
            raise TestbedError(f"vnvdimm mount failed: {res.stderr.strip()}")
        self.pid = -1
        with contextlib.suppress(OSError, ValueError, IndexError):
            self.pid = int((self.state_dir / "lock").read_text().split()[0])

    def _unmount(self) -> list[Holder]:
        busy = stop_mount(self.root, self.pid)
        self.pid = None
        return busy

    def stop(self) -> None:
        """Unmount, make sure the daemon and its workers are gone, remove the files. Idempotent.

        By `vnvdimm umount`'s rules: if device files are still in use (a process of the test
        still has one open or mapped, a loop device is still attached to one), nothing is
        killed: the mount is detached, its daemon serves those files until they are closed,
        the temporary directory (with the media) is kept, and TestbedError names them."""
        if self.dir is None:
            return
        busy: list[Holder] = []
        root = self.root
        try:
            busy = self._unmount()
        finally:
            self.pid = None
            _LIVE.discard(self)
            if busy:
                kept, self.dir = self.dir, None
            else:
                self._cleanup_dir()
        if busy:
            raise TestbedError(f"{root}: device files still in use at teardown; detached, the daemon serves "
                               f"them until they are closed (files kept in {kept}):" + describe(busy))

    def _mounted(self) -> bool:
        return is_mounted(self.root)

    def _cleanup_dir(self) -> None:
        if self.dir is not None and self._own_dir and not self._mounted():
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def __enter__(self) -> Testbed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- access ----------------------------------------------------------------------------------
    def path(self, path: str) -> Path:
        """A path of the emulated system ("/sys/...", "/dev/...") as seen from this namespace."""
        return self.root / path.lstrip("/")

    def read(self, path: str) -> str:
        return self.path(path).read_text()

    def write(self, path: str, value: str | bytes) -> None:
        """One write(2) of `value`, as `echo` or ndctl do (a store is one write)."""
        data = value.encode() if isinstance(value, str) else value
        fd = os.open(self.path(path), os.O_WRONLY)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def _ns_cmd(self, cmd: str | Sequence[str]) -> list[str]:
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else [str(c) for c in cmd]
        # with-vnvdimm runs `vnvdimm blockdevs` (loop block devices): this very vnvdimm.
        vnvdimm = os.environ.get("VNVDIMM") or f"{sys.executable} -m vnvdimm.cli"
        return ["env", f"VNVDIMM={vnvdimm}", str(WITH_VNVDIMM), str(self.root), "--", *argv]

    def run(self, cmd: str | Sequence[str], *, check: bool = False, timeout: float = 60,
            input: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command (a list, or a shell command line) where /sys and /dev are the
        emulated ones; its output is captured as text."""
        return subprocess.run(self._ns_cmd(cmd), capture_output=True, text=True, timeout=timeout, check=check,
                              input=input, env=with_preload(env))

    def spawn(self, cmd: str | Sequence[str], **popen_args: Any) -> subprocess.Popen[Any]:
        """Start a command in the emulated namespace and return at once (a service, a waiter).
        The test bed does not track it: wait for it or kill it in the test."""
        popen_args["env"] = with_preload(popen_args.get("env"))
        return subprocess.Popen(self._ns_cmd(cmd), **popen_args)

    def ndctl(self, *args: str) -> Any:
        """Run the real ndctl; its JSON output parsed (None when it prints nothing)."""
        return self._tool("ndctl", args)

    def daxctl(self, *args: str) -> Any:
        return self._tool("daxctl", args)

    def _tool(self, tool: str, args: Sequence[str]) -> Any:
        res = self.run([tool, *args])
        if res.returncode != 0:
            raise TestbedError(f"{tool} {' '.join(args)}: exit {res.returncode}: {res.stderr.strip()}")
        out = res.stdout.strip()
        return json.loads(out) if out.startswith(("{", "[")) else (out or None)

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 60, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in a forked child inside the emulated namespace and return
        its result (pickled back); an exception it raises is raised here."""
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            code = 0
            try:
                os.close(rfd)
                try:
                    enter_namespace(self.root)
                    payload = pickle.dumps(("ok", fn(*args, **kwargs)))
                except BaseException as e:
                    tb = traceback.format_exc()
                    try:
                        payload = pickle.dumps(("err", e, tb))
                    except Exception:
                        payload = pickle.dumps(("err", RemoteError(tb), tb))
                view = memoryview(payload)
                while view:
                    view = view[os.write(wfd, view):]
            except BaseException:
                code = 1
            finally:
                for session in _SESSIONS:  # answered once the loop devices are let go
                    with contextlib.suppress(OSError):
                        blockdev.end_session(session)
                os._exit(code)
        os.close(wfd)
        chunks = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([rfd], [], [], left)[0]:
                    os.kill(pid, signal.SIGKILL)
                    raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not return in {timeout} s")
                chunk = os.read(rfd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(rfd)
            os.waitpid(pid, 0)
        if not chunks:
            raise RemoteError(f"{getattr(fn, '__name__', fn)}: the child died without an answer")
        answer = pickle.loads(b"".join(chunks))
        if answer[0] == "ok":
            return answer[1]
        raise answer[1]

    # -- the platform ----------------------------------------------------------------------------
    def status(self) -> client.Status:
        """What `vnvdimm status --json` shows, as objects."""
        return client.read_status(client.Root.of(self.root))

    def _device_dir(self, device: str) -> Path:
        try:
            return wait_mod.resolve(client.Root.of(self.root), device).dev_dir
        except wait_mod.UnknownDevice as e:
            raise TestbedError(str(e)) from None

    def memmap(self, device: str) -> client.Memmap:
        """The memmap of a device (pmem0, dax1.0, namespace0.0, pfn0.1...)."""
        mm = client.read_memmap(self._device_dir(device))
        if mm is None:
            raise TestbedError(f"{device} has no memmap (raw or sector mode?)")
        return mm

    def _memmap_devices(self, device: str | None) -> list[Path]:
        if device is not None:
            return [self._device_dir(device)]
        root = client.Root.of(self.root)
        return [t.dev_dir for t in wait_mod.all_targets(root)]

    def set_mode(self, namespace: str, mode: str, *, map: str | None = None, align: str | int | None = None,
                 sector_size: int | None = None) -> Any:
        """Reconfigure a namespace as ndctl create-namespace -e NAMESPACE -m MODE -f does (with
        the real ndctl); returns ndctl's JSON for it."""
        if mode not in MODES:
            raise TestbedError(f"mode must be one of {', '.join(MODES)}")
        args = ["create-namespace", "-e", namespace, "-m", mode, "-f"]
        if map is not None:
            args += ["-M", map]
        if align is not None:
            args += ["-a", str(align)]
        if sector_size is not None:
            args += ["-l", str(sector_size)]
        return self.ndctl(*args)

    def disable(self, namespace: str) -> None:
        self.ndctl("disable-namespace", namespace)

    def enable(self, namespace: str) -> None:
        self.ndctl("enable-namespace", namespace)

    def slow_memmap(self, ns_per_page: int, device: str | None = None) -> None:
        """Make every page initialization take at least `ns_per_page` ns (the device's
        memmap/ns_per_page: the running init from its next run on, and later ones)."""
        for d in self._memmap_devices(device):
            self.write(str(d.relative_to(self.root)) + "/memmap/ns_per_page", f"{int(ns_per_page)}\n")

    def pause_memmap(self, device: str | None = None, at: float = 0.5, *, wait: bool = False,
                     timeout: float = 60) -> None:
        """Hold background memmap initialization once `device` (None: any pfn/dax device,
        including ones created later) has `at` (0..1) of its pages done: memmap/pause_at, or
        the bus's vnvdimm/memmap_pause_at. The worker pool is shared, so other devices'
        background init holds too; reads of a device still initialize what they touch.
        A device stops at the mark, past it by less than one align block (2 MiB: 512 pages),
        provided the mark is ahead of it when set: a bed made with ``memmap_paused=True``
        starts with every memmap held at 0, so it can be moved to any fraction. On such a
        bed, a mark for one device lifts the start hold (the others run until that device is
        at its mark). `wait`: return only once the device(s) reached the mark (TestbedError
        after `timeout` s). :meth:`resume_memmap` lifts it."""
        if not 0 <= at <= 1:
            raise TestbedError("at is a fraction between 0 and 1")
        mark = round(at * 1000)
        value = f"{mark}\n"
        if device is None:
            for bus in self._bus_dirs():
                self.write(str(bus.relative_to(self.root)) + "/vnvdimm/memmap_pause_at", value)
        else:
            d = self._device_dir(device)
            self.write(str(d.relative_to(self.root)) + "/memmap/pause_at", value)
            for bus in self._bus_dirs():  # a lower bus-level mark would hold the device before its own
                attr = bus / "vnvdimm" / "memmap_pause_at"
                if int(attr.read_text()) < mark:
                    self.write(str(attr.relative_to(self.root)), "1000\n")
        if wait:
            self._wait_for_mark(self._memmap_devices(device), mark, timeout)

    def _wait_for_mark(self, devices: list[Path], mark: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for d in devices:
            while True:
                mm = client.read_memmap(d)
                if mm is None or mm.state != "active" or mm.pages_done * 1000 >= mark * mm.pages_total:
                    break
                if time.monotonic() > deadline:
                    raise TestbedError(f"{d.name}: memmap at {mm.pages_done}/{mm.pages_total} pages after "
                                       f"{timeout:g} s, short of its pause mark ({mark / 1000:g})")
                time.sleep(0.01)

    def resume_memmap(self, device: str | None = None) -> None:
        """Lift the pause of `device`, or every pause (None)."""
        if device is None:
            for bus in self._bus_dirs():
                self.write(str(bus.relative_to(self.root)) + "/vnvdimm/memmap_pause_at", "1000\n")
        for d in self._memmap_devices(device):
            self.write(str(d.relative_to(self.root)) + "/memmap/pause_at", "1000\n")

    def _bus_dirs(self) -> list[Path]:
        devices = self.sys / "bus" / "nd" / "devices"
        return [Path(os.path.realpath(devices / n)) for n in sorted(os.listdir(devices)) if n.startswith("ndbus")]

    def wait_memmap(self, *devices: str, timeout: float | None = 60) -> bool:
        """Until the named (default: all) memmaps are idle, by poll(); False on timeout."""
        root = client.Root.of(self.root)
        targets = [wait_mod.resolve(root, d) for d in devices] if devices else None
        return wait_mod.wait_idle(root, targets, timeout)

    def inject_error(self, namespace: str, block: int, count: int = 1) -> None:
        """Media errors at `block` (512-byte blocks, counted as ndctl inject-error does)."""
        from vnvdimm import inject

        try:
            inject.request(client.Root.of(self.root), namespace, block, count)
        except inject.InjectError as e:
            raise TestbedError(str(e)) from None

    def clear_error(self, namespace: str, block: int, count: int = 1) -> None:
        """Clear media errors (as ndctl clear-errors: the platform and the kernel forget them)."""
        from vnvdimm import inject

        try:
            inject.request(client.Root.of(self.root), namespace, block, count, clear=True)
        except inject.InjectError as e:
            raise TestbedError(str(e)) from None

    def badblocks(self, namespace: str) -> list[dict[str, int]]:
        """The namespace's bad blocks: [{"block": B, "count": N}, ...]."""
        from vnvdimm import inject

        return inject.namespace_badblocks(client.Root.of(self.root), namespace)
