"""fio's mmap engine on a device-dax device (/dev/daxR.M, through with-vnvdimm and its preload
library) against the same fio job on the bytes of the media file behind it, in the same run.

    python -m bench --only fio [--quick]

Each repetition runs the baseline job right before the device's (so the host's drift hits both
alike), after the device's memmap is idle: sequential write and read in 2 MiB blocks over the
whole device, random write and read in 4 KiB blocks for a fixed time. fio maps the file
(MAP_SHARED) and copies to and from the mapping: on the device every first touch of a page is
a FUSE request (read or write-back through the daemon), on the media file a page-cache fault.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from bench.common import WITH_VNVDIMM, BenchMount, Figure, median_minmax

JOBS = (  # (figure, fio rw, block size, time-based seconds or 0 for one pass over the device, target)
    ("sequential write, 2 MiB", "write", "2m", 0, ">= 0.05x"),
    ("sequential read, 2 MiB", "read", "2m", 0, ">= 0.2x"),
    ("random write, 4 KiB", "randwrite", "4k", 3, ">= 0.05x"),
    ("random read, 4 KiB", "randread", "4k", 3, ">= 0.2x"),
)


def _topology(size: str) -> str:
    return f"""\
template = "e820"
[memmap]
workers = 1
[[region]]
size = "{size}"
namespace = {{ mode = "devdax", map = "mem", align = "2M" }}
"""


def _fio(wrap: list[str], filename: Path, rw: str, bs: str, size: int, offset: int, seconds: int) -> float:
    """fio's mmap engine: one job, bandwidth in GB/s."""
    cmd = [*wrap, "fio", "--name=bench", "--ioengine=mmap", f"--filename={filename}", f"--rw={rw}", f"--bs={bs}",
           f"--size={size}", f"--offset={offset}", "--randrepeat=0", "--invalidate=0", "--output-format=json"]
    if seconds:
        cmd += ["--time_based", f"--runtime={seconds}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"fio {rw} on {filename} failed: {res.stderr or res.stdout}")
    job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
    direction = "read" if "read" in rw else "write"
    if job["error"]:
        raise RuntimeError(f"fio {rw} on {filename}: error {job['error']}")
    return float(job[direction]["bw_bytes"]) / 1e9


def fio_mmap(size_label: str, reps: int) -> list[Figure]:
    out = []
    with BenchMount(_topology(size_label)) as m:
        m.wait_all_idle()
        dev = m.root / "dev" / "dax0.0"
        size = os.stat(dev).st_size
        media = m.state / "region0.media"
        media_off = (int(m.sys("bus/nd/devices/dax0.1/resource").read_text(), 16)
                     - int(m.sys("bus/nd/devices/region0/resource").read_text(), 16))
        wrap = [str(WITH_VNVDIMM), str(m.root), "--"]
        # the same wrapper for both (its preload library is in both processes); inside it the
        # device is /dev/dax0.0, the media file keeps its host path
        for name, rw, bs, seconds, target in JOBS:
            base: list[float] = []
            ours: list[float] = []
            for _ in range(reps):
                base.append(_fio(wrap, media, rw, bs, size, media_off, seconds))
                ours.append(_fio(wrap, Path("/dev/dax0.0"), rw, bs, size, 0, seconds))
            med, lo, hi = median_minmax(ours)
            out.append(Figure(f"fio mmap on /dev/dax0.0 ({size_label}), {name}", med, "GB/s",
                              median_minmax(base)[0], "the same job on the media file", lo, hi, target))
    return out
