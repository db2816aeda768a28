"""16 threads for VNVDIMM_STRESS_SECONDS (default 8; the full length is
VNVDIMM_STRESS_SECONDS=30) on a small topology, mixing attribute reads (whole and byte by
byte), stores, device reads and writes, bind/unbind of the pfn and dax devices, `echo sync`,
listings and ndctl: no call takes longer than a bound (a watchdog times every call), every
attribute value read parses and belongs to its allowed set, and device data always equals a
shadow copy kept by the test (writes are serialized per device, reads share)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from reliability_kit import DAX, PFN, SMALL, STRESS_SECONDS, alive, children, e820, kill_group

THREADS = 16
CALL_BOUND_S = 15.0  # no single call may take longer (a block takes ~10 ms here)
NS_PER_PAGE = 20_000  # a memmap takes ~0.2 s: every rebind leaves cold blocks behind
NS0 = "sys/bus/nd/devices/namespace0.0"
NS1 = "sys/bus/nd/devices/namespace1.0"
R0 = "sys/bus/nd/devices/region0"
BUS = "sys/devices/platform/e820_pmem/ndbus0"
DAXDEV = "sys/bus/dax/devices/dax1.0"
GONE = {errno.ENOENT, errno.ENXIO}  # a device (file) that is being unbound or rebound
# What may be missing (or refuse to show) while its device is unbound.
VANISHING = ("dax1.0", "pfn0.1/size", "block/pmem0")


class RWLock:
    """Shared readers, exclusive writers (writers do not starve: a waiting writer blocks new readers)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextlib.contextmanager
    def read(self):  # type: ignore[no-untyped-def]
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._waiting_writers)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self):  # type: ignore[no-untyped-def]
        with self._cond:
            self._waiting_writers += 1
            self._cond.wait_for(lambda: not self._writer and not self._readers)
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class Device:
    path: str
    shadow: bytearray
    lock: RWLock = field(default_factory=RWLock)


class Stress:
    def __init__(self, m, seconds: float) -> None:  # type: ignore[no-untyped-def]
        self.m = m
        self.deadline = time.monotonic() + seconds
        self.stop = threading.Event()
        self.inflight: dict[int, tuple[str, float]] = {}
        self.failures: list[str] = []
        self.counts: dict[str, int] = {}
        self.worst: dict[str, float] = {}
        self.bytes_verified = 0
        self.short_writes = 0
        self.cleanups: list[Callable[[], None]] = []
        self.lock = threading.Lock()
        self.sizes: dict[str, int] = {}

    # -- bookkeeping
    def call(self, kind: str, what: str, fn: Callable[[], object]) -> object:
        me = threading.get_ident()
        t0 = time.monotonic()
        self.inflight[me] = (f"{kind} {what}", t0)
        try:
            return fn()
        finally:
            took = time.monotonic() - t0
            del self.inflight[me]
            with self.lock:
                self.counts[kind] = self.counts.get(kind, 0) + 1
                self.worst[kind] = max(self.worst.get(kind, 0.0), took)

    def fail(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)
        self.stop.set()

    def running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.deadline

    def loop(self, name: str, body: Callable[[random.Random], None], seed: int) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(seed)
            try:
                while self.running():
                    body(rng)
            except BaseException:
                self.fail(f"{name}: {traceback.format_exc()}")

        return run


# ---------------------------------------------------------------- attribute values


def allowed_values(s: Stress) -> dict[str, Callable[[bytes], bool]]:
    m = s.m
    pfn_size = s.sizes["pfn"]
    dax_size = s.sizes["dax"]
    totals = {PFN: s.sizes["pfn_pages"], DAX: s.sizes["dax_pages"]}

    def exact(value: str) -> Callable[[bytes], bool]:
        return lambda b: b == value.encode()

    def one_of(*values: str) -> Callable[[bytes], bool]:
        return lambda b: b.decode() in values

    def pattern(rx: str) -> Callable[[bytes], bool]:
        return lambda b: re.fullmatch(rx, b.decode(), re.S) is not None

    def count(dev: str) -> Callable[[bytes], bool]:
        return lambda b: b.endswith(b"\n") and 0 <= int(b) <= totals[dev]

    def number(b: bytes) -> bool:
        return b.endswith(b"\n") and int(b) >= 0

    def stable(rel: str) -> Callable[[bytes], bool]:
        """Whatever it reads before the stress, it reads all along."""
        return exact(read_attr(m, rel, False).decode())

    def uevent(b: bytes) -> bool:
        return all(re.fullmatch(r"[A-Z_]+=[^\n]*", line) for line in b.decode().splitlines())

    checks = {
        f"{PFN}/memmap_state": one_of("active\n", "idle\n"),
        f"{DAX}/memmap_state": one_of("active\n", "idle\n"),
        "sys/bus/nd/devices/pfn0.0/memmap_state": exact("idle\n"),
        f"{PFN}/memmap/pages_done": count(PFN),
        f"{DAX}/memmap/pages_done": count(DAX),
        f"{PFN}/memmap/pages_total": one_of(f"{totals[PFN]}\n", "0\n"),
        f"{DAX}/memmap/pages_total": one_of(f"{totals[DAX]}\n", "0\n"),
        f"{PFN}/memmap/pages_per_sec": number,
        f"{DAX}/memmap/elapsed_us": number,
        f"{PFN}/memmap/ns_per_page": one_of("0\n", f"{NS_PER_PAGE}\n"),
        f"{PFN}/mode": exact("pmem\n"),
        f"{DAX}/mode": exact("ram\n"),
        f"{PFN}/namespace": exact("namespace0.0\n"),
        f"{DAX}/namespace": exact("namespace1.0\n"),
        f"{PFN}/align": exact("2097152\n"),
        f"{PFN}/size": exact(f"{pfn_size}\n"),
        f"{PFN}/uuid": pattern(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\n"),
        f"{PFN}/supported_alignments": exact("4096 2097152 1073741824 \n"),
        f"{PFN}/uevent": uevent,
        f"{NS0}/mode": exact("memory\n"),
        f"{NS1}/mode": exact("dax\n"),
        f"{NS0}/holder": exact("pfn0.1\n"),
        f"{NS1}/holder": exact("dax1.1\n"),
        f"{NS0}/holder_class": stable(f"{NS0}/holder_class"),
        f"{NS1}/holder_class": stable(f"{NS1}/holder_class"),
        f"{PFN}/numa_node": stable(f"{PFN}/numa_node"),
        f"{R0}/namespace_seed": stable(f"{R0}/namespace_seed"),
        f"{R0}/align": stable(f"{R0}/align"),
        f"{NS0}/size": exact(f"{64 << 20}\n"),
        f"{NS0}/force_raw": exact("0\n"),
        f"{R0}/size": exact(f"{64 << 20}\n"),
        f"{R0}/pfn_seed": pattern(r"pfn0\.\d+\n"),
        f"{R0}/dax_seed": pattern(r"dax0\.\d+\n"),
        f"{R0}/btt_seed": pattern(r"btt0\.\d+\n"),
        f"{R0}/init_namespaces": exact("1/1\n"),
        f"{R0}/read_only": exact("0\n"),
        f"{BUS}/wait_probe": exact("1\n"),
        f"{BUS}/provider": exact("e820\n"),
        f"{DAXDEV}/size": exact(f"{dax_size}\n"),
        f"{DAXDEV}/align": exact("2097152\n"),
        "sys/block/pmem0/size": exact(f"{pfn_size // 512}\n"),
        "sys/module/nd_pmem/initstate": exact("live\n"),
    }
    return checks


def read_attr(m, rel: str, bytewise: bool) -> bytes:  # type: ignore[no-untyped-def]
    fd = os.open(m.path(rel), os.O_RDONLY)
    try:
        if not bytewise:
            return os.read(fd, 4096)
        out = b""
        while chunk := os.read(fd, 1):  # one show(), served from the open file's buffer
            out += chunk
        return out
    finally:
        os.close(fd)


def write_attr(m, rel: str, data: bytes) -> int:  # type: ignore[no-untyped-def]
    fd = os.open(m.path(rel), os.O_WRONLY)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the threads


def attr_reader(s: Stress, checks: dict[str, Callable[[bytes], bool]]) -> Callable[[random.Random], None]:
    names = sorted(checks)

    def body(rng: random.Random) -> None:
        rel = rng.choice(names)
        bytewise = rng.random() < 0.2
        try:
            value = s.call("attr-read", rel, lambda: read_attr(s.m, rel, bytewise))
        except OSError as e:
            if e.errno in GONE and any(v in rel for v in VANISHING):
                return
            s.fail(f"read {rel}: errno {e.errno}")
            return
        assert isinstance(value, bytes)
        ok = False
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            ok = checks[rel](value)
        if not ok:
            s.fail(f"read {rel}{' byte by byte' if bytewise else ''}: unexpected value {value!r}")

    return body


def attr_storer(s: Stress) -> Callable[[random.Random], None]:
    # Stores that leave the topology as it is: (attribute, value, errno allowed, success allowed).
    stores = [
        (f"{PFN}/memmap/ns_per_page", b"0\n", (), True),
        (f"{DAX}/memmap/ns_per_page", f"{NS_PER_PAGE}\n".encode(), (), True),
        (f"{PFN}/uevent", b"change\n", (), True),
        (f"{R0}/read_only", b"0\n", (), True),
        (f"{NS1}/force_raw", b"0\n", (), True),
        (f"{PFN}/mode", b"pmem\0", (errno.EBUSY,), True),  # EBUSY while enabled, same value else
        (f"{PFN}/align", b"2097152\n\0", (errno.EBUSY,), True),
        (f"{NS0}/holder_class", b"pfn\0", (errno.EBUSY,), False),  # claimed: always busy
        (f"{PFN}/memmap_state", b"bogus\n", (errno.EINVAL,), False),
        ("sys/bus/nd/drivers/nd_pmem/bind", b"region0\0", (errno.ENODEV,), False),
        ("sys/bus/nd/drivers/nd_region/unbind", b"pfn0.1\0", (errno.ENODEV,), False),
    ]

    def body(rng: random.Random) -> None:
        rel, data, errs, success_ok = rng.choice(stores)
        try:
            n = s.call("attr-store", rel, lambda: write_attr(s.m, rel, data))
        except OSError as e:
            if e.errno not in errs:
                s.fail(f"store {rel} <- {data!r}: errno {e.errno}")
            return
        if not success_ok or n != len(data):
            s.fail(f"store {rel} <- {data!r}: returned {n}")

    return body


def device_io(s: Stress, devices: list[Device], writer: bool) -> Callable[[random.Random], None]:
    def body(rng: random.Random) -> None:
        dev = rng.choice(devices)
        size = len(dev.shadow)
        n = rng.choice((1, 512, 4096, 4099, 65536, rng.randrange(1, 300_000)))
        off = rng.randrange(0, size - n)
        direct = rng.random() < 0.2
        if direct:
            off, n = off // 4096 * 4096, max(4096, n // 4096 * 4096)
        if writer and rng.random() < 0.5:
            data = rng.randbytes(n)
            with dev.lock.write():
                try:
                    done = s.call("dev-write", dev.path, lambda: pwrite(s.m, dev.path, data, off, direct))
                except OSError as e:
                    if e.errno not in GONE:
                        s.fail(f"write {dev.path}@{off}+{n}: errno {e.errno}")
                    return
                assert isinstance(done, int)
                if done != n:
                    # A write spanning several FUSE requests (a partial first page that is not
                    # cached ends a request) is cut short when the device goes away between
                    # them: what returned was written, the rest was not.
                    with s.lock:
                        s.short_writes += 1
                    if not 0 < done < n:
                        s.fail(f"write {dev.path}@{off}+{n}: returned {done}")
                dev.shadow[off: off + done] = data[:done]
            return
        with dev.lock.read():
            try:
                got = s.call("dev-read", dev.path, lambda: pread(s.m, dev.path, n, off, direct))
            except OSError as e:
                if e.errno not in GONE:
                    s.fail(f"read {dev.path}@{off}+{n}: errno {e.errno}")
                return
            if got != dev.shadow[off: off + n]:
                first = next(i for i in range(n) if got[i: i + 1] != dev.shadow[off + i: off + i + 1])
                s.fail(f"read {dev.path}@{off}+{n}{' O_DIRECT' if direct else ''}: differs from the shadow "
                       f"at +{first}")
            with s.lock:
                s.bytes_verified += n

    return body


def _open(m, rel: str, flags: int) -> int:  # type: ignore[no-untyped-def]
    return os.open(m.path(rel), flags)


def fd_holder(s: Stress, devices: list[Device]) -> Callable[[random.Random], None]:
    """Reads and writes through descriptors kept open across unbind/bind of their device
    (writes then fail with ENXIO; reads may be served from the page cache): whatever a read
    returns equals the shadow."""
    fds: dict[str, int] = {}

    def close_all() -> None:
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        fds.clear()

    s.cleanups.append(close_all)

    def body(rng: random.Random) -> None:
        dev = rng.choice(devices)
        if dev.path not in fds or rng.random() < 0.02:
            with contextlib.suppress(KeyError, OSError):
                os.close(fds.pop(dev.path))
            try:
                fds[dev.path] = s.call("dev-open", dev.path, lambda: _open(s.m, dev.path, os.O_RDWR))
            except OSError as e:
                if e.errno not in GONE:
                    s.fail(f"open {dev.path}: errno {e.errno}")
                time.sleep(0.01)
                return
        fd = fds[dev.path]
        n = rng.choice((1, 4096, 9000))
        off = rng.randrange(0, len(dev.shadow) - n)
        if rng.random() < 0.4:
            data = rng.randbytes(n)
            with dev.lock.write():
                try:
                    done = s.call("dev-write", dev.path, lambda: os.pwrite(fd, data, off))
                except OSError as e:
                    if e.errno not in GONE:
                        s.fail(f"write {dev.path}@{off}+{n} (held fd): errno {e.errno}")
                    return
                assert isinstance(done, int) and 0 < done <= n
                dev.shadow[off: off + done] = data[:done]
            return
        with dev.lock.read():
            try:
                got = s.call("dev-read", dev.path, lambda: os.pread(fd, n, off))
            except OSError as e:
                if e.errno not in GONE:
                    s.fail(f"read {dev.path}@{off}+{n} (held fd): errno {e.errno}")
                return
            if got != dev.shadow[off: off + len(got)] or not got:
                s.fail(f"read {dev.path}@{off}+{n} (held fd): differs from the shadow")
            with s.lock:
                s.bytes_verified += len(got)

    return body


def pread(m, rel: str, n: int, off: int, direct: bool) -> bytes:  # type: ignore[no-untyped-def]
    fd = _open(m, rel, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        if direct:
            import mmap

            buf = mmap.mmap(-1, n)  # page aligned, as O_DIRECT wants
            got = os.preadv(fd, [buf], off)
            return bytes(buf[:got])
        out = b""
        while len(out) < n:
            chunk = os.pread(fd, n - len(out), off + len(out))
            if not chunk:
                break
            out += chunk
        return out
    finally:
        os.close(fd)


def pwrite(m, rel: str, data: bytes, off: int, direct: bool) -> int:  # type: ignore[no-untyped-def]
    fd = _open(m, rel, os.O_RDWR | (os.O_DIRECT if direct else 0))
    try:
        if direct:
            import mmap

            buf = mmap.mmap(-1, len(data))
            buf[:] = data
            return os.pwritev(fd, [buf], off)
        return os.pwrite(fd, data, off)
    finally:
        os.close(fd)


def rebinder(s: Stress, dev: str, driver: str) -> Callable[[random.Random], None]:
    def body(rng: random.Random) -> None:
        unbind = f"sys/bus/nd/drivers/{driver}/unbind"
        bind = f"sys/bus/nd/drivers/{driver}/bind"
        data = f"{dev}\0".encode()
        assert s.call("unbind", dev, lambda: write_attr(s.m, unbind, data)) == len(data)
        time.sleep(rng.uniform(0, 0.05))
        assert s.call("bind", dev, lambda: write_attr(s.m, bind, data)) == len(data)
        time.sleep(rng.uniform(0.05, 0.3))

    return body


def syncer(s: Stress) -> Callable[[random.Random], None]:
    def body(rng: random.Random) -> None:
        rel = rng.choice([PFN, DAX])
        try:
            n = s.call("sync", rel, lambda: write_attr(s.m, f"{rel}/memmap_state", b"sync\0"))
        except OSError as e:
            s.fail(f"sync {rel}: errno {e.errno}")
            return
        if n != 5:
            s.fail(f"sync {rel}: returned {n}")
        time.sleep(rng.uniform(0, 0.05))

    return body


def lister(s: Stress) -> Callable[[random.Random], None]:
    def body(rng: random.Random) -> None:
        names = s.call("listdir", "devices", lambda: os.listdir(s.m.path("sys/bus/nd/devices")))
        assert isinstance(names, list)
        required = {"region0", "region1", "namespace0.0", "namespace1.0", "pfn0.1", "dax1.1", "ndbus0"}
        if not required <= set(names):
            s.fail(f"listing misses {required - set(names)}")
        for name in rng.sample(names, min(4, len(names))):
            try:
                target = s.call("readlink", name, lambda n=name: os.readlink(s.m.path(f"sys/bus/nd/devices/{n}")))
            except OSError as e:
                if e.errno != errno.ENOENT:
                    s.fail(f"readlink {name}: errno {e.errno}")
                continue
            assert isinstance(target, str)
            if not re.fullmatch(r"(\.\./)+devices/platform/e820_pmem/ndbus0(/[a-z0-9.]+)*", target):
                s.fail(f"link {name} -> {target!r}")

    return body


def ndctl(s: Stress) -> Callable[[random.Random], None]:
    # Without block devices: as root, a with-vnvdimm session turns /dev/pmemN into a block
    # node for every process (see docs/limits.md), and the kernel then fails the I/O of the
    # descriptors the other threads hold on the file with EIO; this test is about those.
    plain = {**os.environ, "VNVDIMM_BLOCKDEVS": "0"}

    def body(rng: random.Random) -> None:
        res = s.call("ndctl", "list -RNi", lambda: s.m.run("ndctl", "list", "-RNi", timeout=CALL_BOUND_S * 2,
                                                           env=plain))
        if res.returncode != 0:  # type: ignore[attr-defined]
            s.fail(f"ndctl list: rc {res.returncode}: {res.stderr}")  # type: ignore[attr-defined]
            return
        doc = json.loads(res.stdout)  # type: ignore[attr-defined]
        regions = doc if isinstance(doc, list) else doc.get("regions", [])
        if sorted(r["dev"] for r in regions) != ["region0", "region1"]:
            s.fail(f"ndctl list: regions {regions}")
        time.sleep(rng.uniform(0.2, 0.5))

    return body


def test_sixteen_threads(make_mount, figures) -> None:  # type: ignore[no-untyped-def]
    m = make_mount(e820(*SMALL, ns_per_page=NS_PER_PAGE))
    for dev in (PFN, DAX):
        m.write(f"{dev}/memmap_state", b"sync")
    s = Stress(m, STRESS_SECONDS)
    s.sizes = {"pfn": int(m.read(f"{PFN}/size")), "dax": int(m.read(f"{DAXDEV}/size")),
               "pfn_pages": int(m.read(f"{PFN}/memmap/pages_total")),
               "dax_pages": int(m.read(f"{DAX}/memmap/pages_total"))}
    devices = [Device("dev/pmem0", bytearray(m.path("dev/pmem0").read_bytes())),
               Device("dev/dax1.0", bytearray(m.path("dev/dax1.0").read_bytes()))]
    checks = allowed_values(s)
    bodies = [
        *[("attr-reader", attr_reader(s, checks))] * 4,
        *[("attr-storer", attr_storer(s))] * 2,
        *[("dev-writer", device_io(s, devices, writer=True))] * 2,
        ("dev-reader", device_io(s, devices, writer=False)),
        ("dev-fd-holder", fd_holder(s, devices)),
        ("rebind-pfn", rebinder(s, "pfn0.1", "nd_pmem")),
        ("rebind-dax", rebinder(s, "dax1.1", "dax_pmem")),
        *[("sync", syncer(s))] * 2,
        ("lister", lister(s)),
        ("ndctl", ndctl(s)),
    ]
    assert len(bodies) == THREADS
    threads = [threading.Thread(target=s.loop(name, body, seed=i), name=f"{name}-{i}", daemon=True)
               for i, (name, body) in enumerate(bodies)]
    for t in threads:
        t.start()
    stuck: list[str] = []
    # The watchdog: every call in flight must return within CALL_BOUND_S.
    while any(t.is_alive() for t in threads):
        now = time.monotonic()
        stuck = [f"{what} ({now - t0:.1f} s)" for what, t0 in list(s.inflight.values()) if now - t0 > CALL_BOUND_S]
        if stuck:
            break
        time.sleep(0.1)
    if stuck:
        s.stop.set()
        daemon_alive = alive(m.pid)
        if daemon_alive:
            with contextlib.suppress(OSError):
                os.kill(m.pid, 10)  # SIGUSR1: the daemon writes its thread stacks into its log
            time.sleep(0.5)
        log = (m.state_dir / "vnvdimm.log").read_text()[-6000:]
        kill_group(m.pid)  # unblock the stuck threads so the test can end
        for t in threads:
            t.join(10)
        raise AssertionError(f"calls stuck for more than {CALL_BOUND_S} s: {stuck}\n--- daemon log:\n{log}")
    for t in threads:
        t.join()
    for cleanup in s.cleanups:
        cleanup()
    assert not s.failures, "\n".join(s.failures[:10])
    assert alive(m.pid) and len(children(m.pid)) == 2

    # Quiet now: the devices hold exactly the shadow, end to end.
    for dev in (PFN, DAX):
        m.write(f"{dev}/memmap_state", b"sync")
    for dev in devices:
        assert m.path(dev.path).read_bytes() == dev.shadow, f"{dev.path} differs from the shadow"
        s.bytes_verified += len(dev.shadow)
    figures.add(threads=THREADS, seconds=STRESS_SECONDS, calls=sum(s.counts.values()),
                writes=s.counts.get("dev-write", 0) + s.counts.get("attr-store", 0),
                bytes_verified=s.bytes_verified, rebinds=s.counts.get("bind", 0), short_writes=s.short_writes)
    figures.note(worst_call_ms={k: round(v * 1e3, 1) for k, v in s.worst.items()}, calls=s.counts)
    for kind in ("dev-write", "dev-read", "bind", "unbind", "sync", "attr-read", "attr-store"):
        assert s.counts.get(kind, 0) > 0, f"no {kind} call ran: {s.counts}"


def test_sigusr1_dumps_the_daemon_threads(make_mount) -> None:  # type: ignore[no-untyped-def]
    """What the watchdog above relies on to report a hang: SIGUSR1 makes the daemon write the
    stack of every thread into its log, and it keeps serving."""
    m = make_mount(e820(*SMALL))
    os.kill(m.pid, 10)
    log = m.state_dir / "vnvdimm.log"
    deadline = time.monotonic() + 5
    while "_dispatch_loop" not in log.read_text():
        assert time.monotonic() < deadline, "no thread dump in the log"
        time.sleep(0.05)
    assert alive(m.pid) and len(children(m.pid)) == 2
    assert m.read(f"{PFN}/mode") == "pmem\n"
