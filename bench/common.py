"""Shared benchmark plumbing: statistics, mounts in temp dirs that are always cleaned up,
the trivial-FUSE baseline, and the result table."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vnvdimm.mounts import describe, is_mounted
from vnvdimm.umount import stop_mount

REPO = Path(__file__).resolve().parent.parent
WITH_VNVDIMM = REPO / "mountscripts" / "with-vnvdimm"
VNVDIMM = [sys.executable, "-m", "vnvdimm.cli"]


@dataclass
class Figure:
    """One measured figure, its baseline from the same run, and the target on the ratio."""

    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    lo: float | None = None
    hi: float | None = None
    target: str = ""  # "<= 1.5x" / ">= 0.2x" (on the ratio), "<= 0.5 s" (on the value), "reference"
    met: bool | None = None
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.met is None and self.target:
            self.met = evaluate(self.target, self.value, self.ratio)

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0):
            return None
        return self.value / self.baseline  # type: ignore[operator]

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


def median_minmax(samples: list[float]) -> tuple[float, float, float]:
    return statistics.median(samples), min(samples), max(samples)


def percentile(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def check(value: float, op: str, bound: float) -> bool:
    return value <= bound if op == "<=" else value >= bound


def evaluate(target: str, value: float, ratio: float | None) -> bool | None:
    """Whether a figure meets its target: "OP Nx" bounds the ratio to the same-run baseline,
    "OP N UNIT" the value itself; "reference" (a baseline shown for context) has none."""
    if target == "reference":
        return None
    op, bound, *_unit = target.split()
    if bound.endswith("x"):
        return None if ratio is None else check(ratio, op, float(bound[:-1]))
    return check(value, op, float(bound))


def missed(figures: list[Figure]) -> list[Figure]:
    """The figures that have a target and miss it."""
    return [f for f in figures if f.met is False]


def untargeted(figures: list[Figure]) -> list[Figure]:
    """Figures without a target (every figure needs one, or "reference")."""
    return [f for f in figures if not f.target]


def spread(samples: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of repeated measurements."""
    return median_minmax(samples)


# ---------------------------------------------------------------- mounts


class BenchMount:
    """A vnvdimm mount in a temp dir: `with BenchMount(toml) as m:` ... always unmounted."""

    def __init__(self, config_text: str | None, workers: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="vnvdimm-bench-"))
        self.root = self.tmp / "mnt"
        self.state = self.tmp / "state"
        self.root.mkdir()
        self.config: Path | None = None
        if config_text is not None:
            self.config = self.tmp / "topology.toml"
            self.config.write_text(config_text)
        self.workers = workers
        self.env = None if env is None else {**os.environ, **env}  # the daemon's environment
        self.mount_seconds = 0.0

    def mount(self) -> float:
        args = [*VNVDIMM, "mount", str(self.root), "--state-dir", str(self.state)]
        if self.config is not None:
            args += ["--config", str(self.config)]
        if self.workers is not None:
            args += ["--workers", str(self.workers)]
        t0 = time.perf_counter()
        res = subprocess.run(args, capture_output=True, text=True, timeout=600, env=self.env)
        self.mount_seconds = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(f"vnvdimm mount failed: {res.stderr}")
        return self.mount_seconds

    def daemon_pid(self) -> int:
        return int((self.state / "lock").read_text().split()[0])

    def daemon_cpu_seconds(self) -> float:
        """User + system CPU time the daemon process (all its threads) has used so far."""
        fields = Path(f"/proc/{self.daemon_pid()}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def umount(self) -> None:
        pid = None
        with contextlib.suppress(OSError, ValueError):
            pid = self.daemon_pid()
        busy = stop_mount(self.root, pid)
        if busy:
            raise RuntimeError(f"{self.root}: still in use after the benchmark:" + describe(busy))

    def __enter__(self) -> BenchMount:
        self.mount()
        return self

    def __exit__(self, *exc: object) -> None:
        self.umount()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def sys(self, rel: str) -> Path:
        return self.root / "sys" / rel.lstrip("/")

    def wait_all_idle(self, timeout: float = 600) -> float:
        """Seconds until every memmap_state under the mount reads idle."""
        t0 = time.perf_counter()
        states = list((self.root / "sys" / "bus" / "nd" / "devices").glob("*/memmap_state"))
        while True:
            if all(p.read_text() == "idle\n" for p in states):
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError("memmap still active")
            time.sleep(0.005)


@contextlib.contextmanager
def trivial_fs(root: Path, pinned: bool = False) -> Iterator[float]:
    """Mount bench/trivialfs.py at `root` (with pinned thread states if asked); yields the
    seconds from spawn to answering."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "trivialfs.py"), str(root),
                             *(["--pinned"] if pinned else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not is_mounted(root):
            if proc.poll() is not None:
                raise RuntimeError("trivialfs did not mount")
            time.sleep(0.001)
        os.stat(root / "x")
        yield time.perf_counter() - t0
    finally:
        subprocess.run(["fusermount3", "-u", str(root)], capture_output=True)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def repeat(n: int, fn: Callable[[], float]) -> list[float]:
    return [fn() for _ in range(n)]


# ---------------------------------------------------------------- reporting


def table(figures: list[Figure]) -> str:
    rows = [("figure", "value", "baseline", "ratio", "target", "met")]
    for f in figures:
        rng = f" ({f.lo:.3g}–{f.hi:.3g})" if f.lo is not None and f.hi is not None else ""
        base = f"{f.baseline:.3g} {f.unit} {f.baseline_name}".strip() if f.baseline is not None else "–"
        ratio = f"{f.ratio:.2f}x" if f.ratio is not None else "–"
        met = {True: "yes", False: "NO", None: "–"}[f.met]
        rows.append((f.name, f"{f.value:.3g} {f.unit}{rng}", base, ratio, f.target or "–", met))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    notes = [f"- {f.name}: {f.note}" for f in figures if f.note]
    return "\n".join(lines + (["", *notes] if notes else []))
