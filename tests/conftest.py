"""Shared fixtures: real FUSE mounts in temp dirs that are always unmounted; a watchdog that
ends a test whose requests through a mount hang (dumping the daemon's stacks, then killing
it: the blocked callers get ENOTCONN); and a leak check after every test (mounts, daemons,
memfds, loop devices, child processes, users' keys)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mount_kit import LIVE_MOUNTS, TEST_USERS, VNVDIMM, Mount, alive, children, fuse_mounts_under, memfds
from topologies import SMALL_E820, SMALL_NFIT

from vnvdimm.mounts import lazy_unmount, loop_devices, process_group_of, vnvdimm_processes
from vnvdimm.preload import library_path

# Every command the tests run through with-vnvdimm gets the preload library of this checkout,
# whether or not `vnvdimm` is on PATH.
os.environ.setdefault("VNVDIMM_PRELOAD", str(library_path()))

REPO = Path(__file__).resolve().parent.parent
# with-vnvdimm's loop block devices come from `vnvdimm blockdevs`: the vnvdimm under test,
# whether or not its venv is on the PATH.
os.environ.setdefault("VNVDIMM", " ".join(VNVDIMM))


@pytest.fixture
def make_mount(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """make_mount(config_text=None, *extra_args, state_dir=None, mount=True) -> Mount."""
    made: list[Mount] = []

    def factory(config_text: str | None = SMALL_E820, *extra_args: str, state_dir: Path | None = None,
                mount: bool = True) -> Mount:
        n = len(made)
        root = tmp_path / f"mnt{n}"
        root.mkdir()
        config = None
        if config_text is not None:
            config = tmp_path / f"topology{n}.toml"
            config.write_text(config_text)
        m = Mount(root, state_dir or tmp_path / f"state{n}", config, list(extra_args))
        made.append(m)
        if mount:
            res = m.mount()
            assert res.returncode == 0, f"mount failed: {res.stderr}"
        return m

    try:
        yield factory
    finally:
        errors = []
        for m in made:
            try:
                m.umount()
            except AssertionError as e:
                errors.append(str(e))
        assert not errors, "\n".join(errors)


@pytest.fixture
def mnt(make_mount: Callable[..., Mount]) -> Mount:
    """The small e820 topology (fsdax map=dev + devdax map=mem, 256 MiB each), mounted."""
    return make_mount()


@pytest.fixture
def nfit_mnt(make_mount: Callable[..., Mount]) -> Mount:
    return make_mount(SMALL_NFIT)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if it left vnvdimm daemons or FUSE mounts of its own behind. Only this
    session's (under its basetemp): other test runs may be mounting at the same time, and
    unmounting theirs would break them."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    base = factory.getbasetemp().resolve()
    leftovers = fuse_mounts_under(base)
    daemons = vnvdimm_processes(base, "daemon")
    if leftovers or daemons:
        for m in leftovers:
            lazy_unmount(m)
        print(f"\nvnvdimm tests left behind: mounts {leftovers}, daemons {daemons}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ---------------------------------------------------------------- the watchdog

WATCHDOG_S = os.environ.get("VNVDIMM_TEST_WATCHDOG")  # seconds; default: the test's timeout - 20 s


class Watchdog:
    """A thread outside the test's own calls (pytest-timeout's signal cannot end a call
    blocked in a FUSE request: the kernel waits for the daemon's answer). Past `bound`
    seconds it dumps the stacks of every live mount's daemon (SIGUSR1: the daemon writes
    them to vnvdimm.log), kills the daemon and its workers (the kernel then answers every
    request of the mount with ENOTCONN, which releases the blocked caller) and keeps what
    it saw for the test's report."""

    def __init__(self, bound: float, name: str) -> None:
        self.bound = bound
        self.name = name
        self.report: list[str] = []
        self.killed: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watchdog {name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._stop.wait(self.bound):
            return
        self.report.append(f"watchdog: {self.name} still running after {self.bound:g} s")
        for m in list(LIVE_MOUNTS):
            pid = m.pid
            if pid is None or not alive(pid):
                continue
            stacks = daemon_stacks(m)
            workers = children(pid)
            for victim in (pid, *workers):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGKILL)
            self.killed.append(pid)
            self.report.append(f"mount {m.root}: daemon {pid} (workers {workers}) killed after dumping its "
                               f"stacks:\n{stacks[-6000:]}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def daemon_stacks(m: Mount) -> str:
    """The thread stacks of the mount's daemon (SIGUSR1 makes it write them to vnvdimm.log)."""
    pid = m.pid
    if pid is None or not alive(pid):
        return ""
    log = m.state_dir / "vnvdimm.log"
    size = log.stat().st_size if log.exists() else 0
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (log.stat().st_size if log.exists() else 0) == size:
        time.sleep(0.05)
    time.sleep(0.2)  # (the dump is written thread by thread)
    return log.read_bytes()[size:].decode(errors="replace") if log.exists() else ""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A test that fails while mounts of its own are up reports what their daemons were doing
    at that moment: a request that never returned shows there, not in the test's traceback."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if call.when == "call" and report.failed:
        for m in list(LIVE_MOUNTS):
            if stacks := daemon_stacks(m):
                report.sections.append((f"daemon {m.pid} stacks ({m.root})", stacks[-8000:]))


@pytest.fixture(autouse=True)
def watchdog(request: pytest.FixtureRequest) -> Iterator[Watchdog]:
    """Bounds the test (``@pytest.mark.watchdog(seconds)``, else VNVDIMM_TEST_WATCHDOG, else 20 s
    before the test's pytest-timeout): see Watchdog. A test it had to end fails with the
    daemon's stacks."""
    marker = request.node.get_closest_marker("watchdog")
    if marker:
        bound = float(marker.args[0])
    elif WATCHDOG_S:
        bound = float(WATCHDOG_S)
    else:
        timeout = request.node.get_closest_marker("timeout")
        limit = float(timeout.args[0]) if timeout else float(request.config.getini("timeout") or 300)
        bound = max(limit - 20, limit / 2)
    dog = Watchdog(bound, request.node.nodeid)
    yield dog
    dog.stop()
    if dog.report:
        pytest.fail("\n".join(dog.report), pytrace=False)


# ---------------------------------------------------------------- leak checks


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def _daemons_under(base: Path) -> list[int]:
    """Live vnvdimm daemons (and workers, with-vnvdimm and its helpers) whose command line
    names a path under base."""
    return vnvdimm_processes(base)


def _loop_devices_under(base: Path) -> list[str]:
    """Loop devices whose backing file is under base."""
    return sorted(loop for loop, _, _, backing in loop_devices() if backing.startswith(str(base)))


def _key_counts() -> dict[int, int]:
    """Keys per uid (/proc/key-users)."""
    out = {}
    with contextlib.suppress(OSError), open("/proc/key-users") as f:
        for line in f:
            uid, rest = line.split(":", 1)
            out[int(uid)] = int(rest.split()[0])
    return out


# A uid's first login makes the kernel create its user keyrings (_uid.N and _uid_ses.N), which
# it keeps for as long as the user namespace lives: no test can remove them, so they are not
# counted as left behind.
PER_UID_KEYRINGS = 2


def _test_users() -> list[str]:
    """Users the tests created that still exist."""
    with open("/etc/passwd") as f:
        existing = {line.split(":", 1)[0] for line in f}
    return sorted(f"user {n}" for n in TEST_USERS if n in existing)


def _leak_state(base: Path, own: Path | None) -> dict[str, object]:
    return {
        "FUSE mounts": sorted(fuse_mounts_under(base)),
        "vnvdimm daemons and workers": _daemons_under(base),
        "memfds of this process": sorted(memfds([os.getpid()])),
        # (only the test's own: a wider-scoped mount may attach loop devices on first use)
        "loop devices": _loop_devices_under(own) if own is not None else [],
        "child processes": sorted(p for p in _descendants(os.getpid())),
        "test users": _test_users(),
    }


# How long the leak check waits for leftover processes to exit (they were told to: their
# mount is gone), and for anything else to go.
PROCESS_EXIT_BOUND_S = 60.0
OTHER_LEAK_BOUND_S = 5.0
EXITING_KINDS = {"vnvdimm daemons and workers", "child processes"}


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The test (with its own fixtures' teardown) leaves no new mount, daemon, memfd, loop
    device, child process or key-holding user. Mounts and daemons of wider-scoped fixtures
    exist before and after alike; memfds are checked in this process (the engine's unit
    tests run it here; a daemon's go with its process, checked above)."""
    base = tmp_path_factory.getbasetemp().resolve()
    own = request.getfixturevalue("tmp_path").resolve() if "tmp_path" in request.fixturenames else None
    before = _leak_state(base, own)
    keys_before = _key_counts()
    yield

    def new_keys() -> list[str]:
        now = _key_counts()
        grown = {name: now[uid] - keys_before.get(uid, 0) for name, uid in TEST_USERS.items() if uid in now}
        return [f"{name}: {n} new keys" for name, n in grown.items() if n > PER_UID_KEYRINGS]

    # Processes being reaped, a lazy unmount finishing, keys being dropped. A daemon whose
    # mount is gone is on its way out (it tears down its workers and its engine first), so
    # leftover processes alone are waited for until they exit, within a bound made for a
    # loaded machine; anything else (a mount still there) gets a few seconds.
    started = time.monotonic()
    while True:
        after = _leak_state(base, own)
        leaked = {k: sorted(set(after[k]) - set(before[k])) for k in after  # type: ignore[call-overload]
                  if set(after[k]) - set(before[k])}  # type: ignore[call-overload]
        if "vnvdimm daemons and workers" in leaked:
            # A worker started during the test for a daemon that was there before it (a
            # wider-scoped mount replacing a worker the test killed) is that mount's, not a leak:
            # workers are in their daemon's process group.
            older = set(before["vnvdimm daemons and workers"])  # type: ignore[arg-type]
            own = [p for p in leaked["vnvdimm daemons and workers"] if process_group_of(p) not in older]
            if own:
                leaked["vnvdimm daemons and workers"] = own
            else:
                del leaked["vnvdimm daemons and workers"]
        if keys := new_keys():
            leaked["keys of test users"] = keys
        if not leaked:
            return
        bound = PROCESS_EXIT_BOUND_S if set(leaked) <= EXITING_KINDS else OTHER_LEAK_BOUND_S
        if time.monotonic() - started > bound:
            break
        time.sleep(0.1)
    for pid in leaked.get("vnvdimm daemons and workers", []) + leaked.get("child processes", []):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for m in leaked.get("FUSE mounts", []):
        lazy_unmount(m)
    pytest.fail(f"{request.node.nodeid} left behind: {leaked}", pytrace=False)
