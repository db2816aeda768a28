"""python -m bench [--quick] [--check] [--json OUT] [--only NAME...] | --plot DIR [--quick]

Mounts its own platforms in temp dirs, measures every figure (median and spread over
repetitions) against a baseline taken in the same run, prints a table and writes JSON
(default bench/results/<time>.json). With --check, exits 1 listing the figures that missed
their target (a gate for those who want one; CI only prints).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench import figures, fio_bench
from bench.common import REPO, Figure, missed, table, untargeted

SUITES = ("mount", "attr", "devfile", "btt", "ndctl", "bind", "scale", "jobs", "fio")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke: small sizes, few repetitions (seconds)")
    ap.add_argument("--json", type=Path, help="where to write the results")
    ap.add_argument("--only", nargs="+", choices=SUITES, help="run only these suites")
    ap.add_argument("--check", action="store_true", help="exit 1 if a figure misses its target (listing them)")
    ap.add_argument("--plot", type=Path, metavar="DIR",
                    help="instead: measure the curves and write PNG charts to DIR (needs matplotlib)")
    args = ap.parse_args(argv)
    q = args.quick
    if args.plot is not None:
        from bench import plot

        try:
            return plot.main(args.plot, q)
        except plot.MissingMatplotlib as e:
            print(f"python -m bench: {e}", file=sys.stderr)
            return 2
    plan = {
        "mount": lambda: figures.mount_time(3 if q else 5),
        "attr": lambda: figures.attribute_latency(300 if q else 3000),
        "devfile": lambda: figures.device_files("512M" if q else "4G", 3 if q else 5),
        "btt": lambda: figures.btt_writes("256M" if q else "1G", 2000 if q else 20000, 3 if q else 5),
        "ndctl": lambda: figures.ndctl_list(3 if q else 7),
        "bind": lambda: figures.bind_latency(("1G", "4G") if q else ("1G", "16G", "64G"), 3 if q else 5),
        "scale": lambda: figures.scale(16 if q else 256, 2 if q else 3),
        "jobs": lambda: figures.many_jobs(16 if q else 256, 2 if q else 5),
        "fio": lambda: fio_bench.fio_mmap("256M" if q else "1G", 2 if q else 3),
    }
    results: list[Figure] = []
    started = time.perf_counter()
    for name in args.only or SUITES:
        t0 = time.perf_counter()
        results += plan[name]()
        print(f"[{name}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
    print(table(results))
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    doc = {"commit": commit, "quick": q, "seconds": time.perf_counter() - started,
           "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
           "figures": [f.to_dict() for f in results]}
    out = args.json or REPO / "bench" / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if q else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nresults: {out} ({doc['seconds']:.0f} s)")
    assert not untargeted(results), [f.name for f in untargeted(results)]
    if args.check and missed(results):
        print("\nfigures that missed their target:", file=sys.stderr)
        for f in missed(results):
            ratio = f" ({f.ratio:.2f}x)" if f.ratio is not None else ""
            print(f"  {f.name}: {f.value:.3g} {f.unit}{ratio}, target {f.target}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
