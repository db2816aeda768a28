"""`python -m bench --plot DIR [--quick]`: the benchmark's curves as PNG charts (matplotlib, an
optional extra: `pip install matplotlib`, or `pip install 'vnvdimm[plot]'`).

Three measurements, each a sweep taken in this run on this machine (the numbers go to
DIR/plot-data.json beside the charts):

* memmap-init.png: the engine's full memmap initialization time against the size of the
  device, one line per worker count (in-process MemmapEngine, map=mem records);
* first-read.png: the latency of the first 4 KiB read of a device file at random offsets
  while its memmap is being initialized (each read waits only for the block it touches),
  against the same reads once it is idle (a mounted 1 GiB fsdax device, slowed down so that
  the init lasts the whole sweep);
* throughput.png: reading a device file (/dev/pmem0 of a mount, map=mem devdax media) from
  end to end, against the request size.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

from bench.common import BenchMount
from bench.figures import _drop_fuse_cache, _stream
from bench.memmap_bench import GIB_PAGES, spec
from vnvdimm.memmap import MemmapEngine


class MissingMatplotlib(RuntimeError):
    pass


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingMatplotlib("--plot needs matplotlib: pip install matplotlib "
                                "(or pip install 'vnvdimm[plot]')") from None
    return plt


def memmap_init(sizes_gib: list[float], workers: list[int]) -> dict[str, list[list[float]]]:
    out: dict[str, list[list[float]]] = {}
    for w in workers:
        with MemmapEngine(workers=w) as eng:
            points = []
            for gib in sizes_gib:
                t0 = time.perf_counter()
                job = eng.create_job(spec(int(gib * GIB_PAGES)))
                job.wait()
                points.append([gib, time.perf_counter() - t0])
                job.release()
            out[str(w)] = points
    return out


FIRST_READ_TOML = """\
template = "e820"
[memmap]
workers = 2
ns_per_page = {ns}
[[region]]
size = "1G"
namespace = {{ mode = "fsdax", map = "mem", align = "2M" }}
"""


def first_read(samples: int) -> dict[str, list[float]]:
    """ms per first 4 KiB read at random offsets of /dev/pmem0: during init, then idle."""
    rng = random.Random(7)
    out: dict[str, list[float]] = {"during": [], "after": []}
    # slowed down so that the init outlasts the reads: each read waits only for its own block
    with BenchMount(FIRST_READ_TOML.format(ns=20000 if samples <= 50 else 50000)) as m:
        dev = m.root / "dev" / "pmem0"
        size = os.stat(dev).st_size
        offsets = [rng.randrange(size // 4096) * 4096 for _ in range(samples)]
        state = m.sys("bus/nd/devices/pfn0.1/memmap_state")
        fd = os.open(dev, os.O_RDONLY)
        try:
            for off in offsets:
                if state.read_text() != "active\n":
                    break
                t0 = time.perf_counter()
                os.pread(fd, 4096, off)
                out["during"].append((time.perf_counter() - t0) * 1e3)
            with open(state, "w") as f:
                f.write("sync\n")
            _drop_fuse_cache(dev)
            for off in offsets:
                t0 = time.perf_counter()
                os.pread(fd, 4096, off)
                out["after"].append((time.perf_counter() - t0) * 1e3)
        finally:
            os.close(fd)
    return out


THROUGHPUT_TOML = """\
template = "e820"
[memmap]
workers = 2
[[region]]
size = "{size}"
namespace = {{ mode = "fsdax", map = "mem", align = "2M" }}
"""


def throughput(size: str, requests: list[int]) -> list[list[float]]:
    points = []
    with BenchMount(THROUGHPUT_TOML.format(size=size)) as m:
        m.wait_all_idle()
        dev = m.root / "dev" / "pmem0"
        span = os.stat(dev).st_size // (1 << 20) * (1 << 20)
        for req in requests:
            _drop_fuse_cache(dev)
            points.append([req, _stream(dev, span, req, 1, False, b"")])
    return points


def measure(quick: bool) -> dict[str, Any]:
    ncpu = os.cpu_count() or 1
    return {
        "memmap_init": memmap_init([0.25, 0.5, 1, 2] if quick else [1, 2, 4, 8, 16],
                                   sorted({1, ncpu}) if quick else sorted({1, 2, ncpu})),
        "first_read": first_read(40 if quick else 200),
        "throughput": throughput("256M" if quick else "2G", [4096 << k for k in range(0, 9)]),
        "machine": {"cpus": ncpu},
    }


def draw(data: dict[str, Any], out: Path) -> list[Path]:
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for workers, points in sorted(data["memmap_init"].items(), key=lambda kv: int(kv[0])):
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", label=f"{workers} worker{'s' if workers != '1' else ''}")
    ax.set(xscale="log", yscale="log", xlabel="device size (GiB)", ylabel="full memmap init (s)",
           title="memmap initialization time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    written.append(_save(fig, plt, out / "memmap-init.png"))

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    fr = data["first_read"]
    labels = [f"during init ({len(fr['during'])})", f"idle ({len(fr['after'])})"]
    ax.boxplot([fr["during"] or [0.0], fr["after"] or [0.0]], showfliers=True)
    ax.set_xticks([1, 2], labels)
    ax.set(yscale="log", ylabel="first 4 KiB read (ms)", title="cold first read of /dev/pmem0")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    written.append(_save(fig, plt, out / "first-read.png"))

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    xs, ys = zip(*data["throughput"], strict=True)
    ax.plot([x / 1024 for x in xs], ys, marker="o")
    ax.set(xscale="log", xlabel="request size (KiB)", ylabel="GB/s", title="reading /dev/pmem0 (one stream)")
    ax.set_xticks([x / 1024 for x in xs], [f"{x // 1024:g}" for x in xs])
    ax.grid(True, which="both", alpha=0.3)
    written.append(_save(fig, plt, out / "throughput.png"))
    return written


def _save(fig: Any, plt: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(out: Path, quick: bool) -> int:
    _pyplot()  # before measuring for minutes: say now if it cannot draw
    data = measure(quick)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plot-data.json").write_text(json.dumps(data, indent=1) + "\n")
    for path in draw(data, out):
        print(path)
    return 0
