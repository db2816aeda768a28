"""First mounts of nfit platforms with many namespaces: provisioning must cost time linear in
their number, and every namespace must come back after a remount.

Each count N is an nfit config of 16 MiB raw namespaces, as many per DIMM as a label area holds
(509), one region per DIMM. The figure per count is the seconds `vnvdimm mount --config` takes
until the mount answers (media, label areas and record made, every namespace created through
the model's own stores); the baseline is the same figure at the count before, measured in the
same run: twice the namespaces should take at most 2.5x the time (linear: 2x, less with the
mount's fixed cost; quadratic: 4x).
The remount (no config: everything read back from the label areas) is shown beside it, and the
namespaces that sysfs shows after it must be all N.

    python -m bench.provision_bench [--quick] [--check] [--counts 512,1024,2048,4096]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench.common import BenchMount, Figure, median_minmax, missed, table
from vnvdimm.topology.config import MAX_NAMESPACES_PER_DIMM


def nfit_config(count: int) -> str:
    """`count` raw 16 MiB namespaces, MAX_NAMESPACES_PER_DIMM per one-DIMM region."""
    per = MAX_NAMESPACES_PER_DIMM
    dimms = -(-count // per)
    out = ['template = "nfit"', "[memmap]", "workers = 1"]
    out += [f'[[dimm]]\nsize = "{per * 16 + 16}M"'] * dimms
    left = count
    for d in range(dimms):
        here = min(per, left)
        left -= here
        out += ["[[region]]", f"dimms = [{d}]", "namespaces = [" + ", ".join(['{ size = "16M" }'] * here) + "]"]
    return "\n".join(out) + "\n"


def namespaces_shown(m: BenchMount) -> int:
    """Namespaces with a size, as `ndctl list` would find them in sysfs."""
    devices = m.sys("bus/nd/devices")
    return sum(1 for ns in devices.glob("namespace*") if (ns / "size").read_text().strip() != "0")


def measure(count: int, reps: int) -> dict[str, float]:
    """Median first mount and remount over `reps` fresh state dirs; the fewest namespaces back."""
    firsts, remounts, back = [], [], count
    for _ in range(reps):
        with BenchMount(nfit_config(count)) as m:
            firsts.append(m.mount_seconds)
            m.umount()
            m.config = None
            t0 = time.perf_counter()
            m.mount()
            remounts.append(time.perf_counter() - t0)
            back = min(back, namespaces_shown(m))
    first, lo, hi = median_minmax(firsts)
    return {"first": first, "lo": lo, "hi": hi, "remount": statistics.median(remounts), "back": back}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="counts 128 and 512")
    ap.add_argument("--counts", default="", help="comma-separated namespace counts (default 512,1024,2048,4096)")
    ap.add_argument("--reps", type=int, default=0, help="repetitions (default: 3, quick: 1)")
    ap.add_argument("--check", action="store_true", help="exit 1 if a figure misses its target (listing them)")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")] if args.counts else [128, 512] if args.quick else [
        512, 1024, 2048, 4096]
    reps = args.reps or (1 if args.quick else 3)
    results = {n: measure(n, reps) for n in counts}
    figures: list[Figure] = []
    previous: int | None = None
    for n, r in results.items():
        note = f"{r['first'] / n * 1e3:.2f} ms a namespace; remount {r['remount']:.1f} s"
        if previous is None:
            figures.append(Figure(f"first mount, {n} namespaces", r["first"], "s", lo=r["lo"], hi=r["hi"],
                                  target="reference", note=note))
        else:
            # n/previous times the namespaces: linear growth is that ratio (less, with the
            # mount's fixed cost), quadratic its square
            grow = n / previous
            figures.append(Figure(f"first mount, {n} namespaces", r["first"], "s", lo=r["lo"], hi=r["hi"],
                                  baseline=results[previous]["first"],
                                  baseline_name=f"at {previous}", target=f"<= {grow * 1.25:g}x", note=note))
        figures.append(Figure(f"namespaces back after a remount, {n}", r["back"], "", target=f">= {n}"))
        previous = n
    print(table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps([f.to_dict() for f in figures], indent=1))
    if args.check and missed(figures):
        print("missed: " + ", ".join(f.name for f in missed(figures)), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
