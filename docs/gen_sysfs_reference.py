#!/usr/bin/env python3
"""Generate docs/sysfs-reference.md from real mounts: every file, directory and link that
vnvdimm serves under /sys (and /dev), with its mode and whether it is kernel ABI, the 2018
memmap series' ABI, or a vnvdimm extension.

    python docs/gen_sysfs_reference.py            # print it
    python docs/gen_sysfs_reference.py --write    # rewrite docs/sysfs-reference.md
    python docs/gen_sysfs_reference.py --check    # exit 1 (with a diff) if it is stale

It mounts two small platforms (needs root and /dev/fuse, like vnvdimm itself): e820 with one
namespace in each mode, and nfit with DIMMs, labelled namespaces and a label seed.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vnvdimm.testbed import Testbed  # noqa: E402

OUT = REPO / "docs" / "sysfs-reference.md"

E820 = {
    "template": "e820",
    "memmap": {"workers": 1},
    "region": [
        {"size": "64M", "namespace": {"mode": "fsdax", "map": "dev"}},
        {"size": "64M", "namespace": {"mode": "devdax", "map": "mem"}},
        {"size": "64M", "namespace": {"mode": "sector"}},
        {"size": "64M", "namespace": {"mode": "raw"}},
    ],
    "hmem": [{"size": "64M"}],
}
NFIT = {
    "template": "nfit",
    "memmap": {"workers": 1},
    "dimm": [{"size": "128M"}, {"size": "128M"}],
    "region": [{"dimms": [0, 1], "namespaces": [{"size": "64M", "mode": "fsdax", "map": "mem", "name": "db"},
                                                 {"size": "64M", "mode": "raw"}]}],
}
NFIT_TEST = {"template": "nfit_test", "memmap": {"workers": 1}}

# Path component patterns -> their generic names (most specific first).
GENERIC = [
    (re.compile(r"^ndbus\d+$"), "ndbusN"),
    (re.compile(r"^ndctl\d+$"), "ndctlN"),
    (re.compile(r"^nmem\d+$"), "nmemN"),
    (re.compile(r"^region\d+$"), "regionN"),
    (re.compile(r"^namespace\d+\.\d+$"), "namespaceN.M"),
    (re.compile(r"^pfn\d+\.\d+$"), "pfnN.M"),
    (re.compile(r"^btt\d+\.\d+$"), "bttN.M"),
    (re.compile(r"^dax\d+\.\d+$"), "daxN.M"),
    (re.compile(r"^pmem\d+(\.\d+)?s$"), "pmemNs"),
    (re.compile(r"^pmem\d+(\.\d+)?$"), "pmemN"),
    (re.compile(r"^mapping\d+$"), "mappingN"),
    (re.compile(r"^node\d+$"), "nodeN"),
    (re.compile(r"^test_dimm\d+$"), "test_dimmN"),
    (re.compile(r"^nfit_test\.\d+$"), "nfit_test.N"),
    (re.compile(r"^hmem\.\d+$"), "hmem.N"),
    (re.compile(r"^\d+:\d+$"), "MAJ:MIN"),
]

# What each vnvdimm extension and each series attribute is (the kernel ABI is documented in
# the kernel's Documentation/ABI/testing/sysfs-bus-nvdimm, sysfs-bus-dax and sysfs-block).
NOTES = {
    "memmap_state": "`active` while any page of the device's memmap is not initialized, else `idle`; "
                    "write `sync` to wait until idle; poll() wakes with POLLPRI|POLLERR on change",
    "memmap": "extension group: memmap progress and controls",
    "memmap/pages_done": "pages initialized so far",
    "memmap/pages_total": "pages to initialize (the namespace's, less the reserve)",
    "memmap/elapsed_us": "microseconds since enable (frozen when done)",
    "memmap/pages_per_sec": "average rate since enable",
    "memmap/workers": "size of the worker pool (shared by all devices)",
    "memmap/ns_per_page": "floor on the time of one page init (slow-platform emulation), settable",
    "memmap/pause_at": "per mille of pages_total at which background init pauses; 1000 = never",
    "memmap/start_pfn": "pfn of the namespace's first page (index base of the binary views)",
    "memmap/kpageflags": "binary: u64 per page, /proc/kpageflags format; KPF_NOPAGE until initialized",
    "memmap/kpagecount": "binary: u64 per page, /proc/kpagecount format",
    "memmap/records": "binary: the 64-byte struct page records",
    "ndbusN/vnvdimm": "extension group of the bus: platform controls",
    "vnvdimm/inject_error": "write `namespaceR.N BLOCK COUNT`: media errors (see docs/tools.md)",
    "vnvdimm/uninject_error": "write `namespaceR.N BLOCK COUNT`: take injected errors back (bad blocks stay)",
    "vnvdimm/clear_error": "write `namespaceR.N BLOCK COUNT`: clear media errors (as ndctl clear-errors)",
    "vnvdimm/memmap_pause_at": "per mille: pause mark of every pfn/dax device (lower of this and its own)",
    "badblocks": "bad 512-byte sectors: `first count` lines (region: from its start; disk: from its data)",
    "wait_probe": "read: blocks until pending probes are done",
    "bind": "write a device name: bind it to this driver",
    "unbind": "write a device name: unbind it",
    "holder": "the pfn/dax/btt device claiming the namespace",
    "mode": "namespace: raw/memory/dax/safe; pfn/dax: none/ram/pmem (map mem/dev)",
    "resource": "physical address (root only)",
    "init_namespaces": "enabled/total namespaces",
    "namespace_seed": "the next namespace to configure (labelled regions)",
    "pfn_seed": "the idle pfn device to configure next",
    "dax_seed": "the idle nd dax device to configure next",
    "btt_seed": "the idle btt device to configure next",
    "initstate": "`live`: the module is \"loaded\" (so daxctl's kmod does not try to load it)",
    "vnvdimm/modules": "extension: the modules the platform can load and remove (nfit_test)",
    "vnvdimm/modprobe": "extension: write `load NAME` or `remove NAME` (what the modprobe shim does)",
    "taint": "the module's taint flags: `O` (out of tree) for the modules tools/testing/nvdimm builds, "
             "on a platform with nfit_test; empty for the others",
    "holders": "links to the loaded modules that use this one",
    "refcnt": "how many loaded modules hold this one",
    "dax/write_cache": "1 where the region has a CPU cache to flush (persistence is not cpu_cache); write 0/1",
    "soft_offline_page": "write a physical address: EIO for a page of an enabled pfn/dax device (ZONE_DEVICE), "
                         "ENXIO for any other",
    "dirty_shutdown": "the SMART shutdown count read when the bus registered the DIMM (Intel SMART only)",
    "fail_cmd": "nfit_test: bitmask of ND_CMD_* numbers that fail on this DIMM",
    "fail_cmd_code": "nfit_test: the return code those commands fail with",
    "lock_dimm": "nfit_test: write anything to lock the DIMM's security state",
    "dax_region/create": "dynamic region: write 1 for a new zero-sized instance; read: the youngest",
    "dax_region/seed": "dynamic region: the instance to configure next",
    "dax_region/delete": "dynamic region: write the name of an unbound, zero-sized instance to remove it",
    "dax_region/available_size": "dynamic region: capacity no instance holds",
    "memmap/ranges": "the memmap jobs of the instance: one per range (mappingN)",
    "mapping": "dynamic instance: write START-END (hex) to add exactly that range",
    "security": "disabled/unlocked/locked/overwrite; write `update OLD NEW`, `disable K`, `freeze`, `erase K`, "
                "`overwrite K`, `master_update OLD NEW`, `master_erase K` (key serials; see docs/limits.md)",
    "frozen": "1 once the DIMM's security state is frozen",
}


def classify(rel: str) -> str:
    parts = rel.split("/")
    if "memmap" in parts[:-1] or "vnvdimm" in parts[:-1] or (parts[-1] in ("memmap", "vnvdimm") and len(parts) > 2):
        return "vnvdimm"
    if parts[-1] == "memmap_state":
        return "series"
    return "kernel"


def generic(path: str) -> str:
    out = []
    for part in path.split("/"):
        for pattern, name in GENERIC:
            if pattern.match(part):
                part = name
                break
        out.append(part)
    return "/".join(out)


PLATFORMS = {"platform/e820_pmem": "e820", "LNXSYSTM:00/LNXSYBUS:00/ACPI0012:00": "nfit",
             "platform/nfit_test.N": "nfit_test"}
BUS = "/sys/devices/<platform>"


def walk(root: Path) -> dict[str, tuple[str, int]]:
    """generic path -> (kind, mode) for everything under root/sys and root/dev; the bus's
    platform device path (e820: platform/e820_pmem, nfit: LNXSYSTM:00/.../ACPI0012:00) is
    written <platform>."""
    found: dict[str, tuple[str, int]] = {}
    for top in ("sys", "dev"):
        for dirpath, dirnames, filenames in os.walk(root / top, followlinks=False):
            rel_dir = os.path.relpath(dirpath, root)
            for name in sorted(dirnames + filenames):
                full = os.path.join(dirpath, name)
                st = os.lstat(full)
                if stat.S_ISLNK(st.st_mode):
                    kind = "link"
                elif stat.S_ISDIR(st.st_mode):
                    kind = "dir"
                elif stat.S_ISCHR(st.st_mode):
                    kind = "char"
                elif top == "dev":
                    kind = "file"
                else:
                    kind = "attr"
                path = "/" + generic(os.path.join(rel_dir, name))
                for platform in PLATFORMS:
                    for full_prefix in (f"/sys/devices/{platform}",):
                        if path == full_prefix or path.startswith(full_prefix + "/"):
                            path = BUS + path[len(full_prefix):]
                    if platform.startswith(path[len("/sys/devices/"):] + "/") and path != BUS:
                        path = ""  # the directories above the bus device: <platform> covers them
                if not path:
                    continue
                if top == "sys" and kind == "attr" and st.st_size != 4096:
                    kind = "binary"
                found.setdefault(path, (kind, stat.S_IMODE(st.st_mode)))
    return found


def note_for(path: str) -> str:
    parts = path.split("/")
    for key in ("/".join(parts[-2:]), parts[-1]):
        if key in NOTES:
            return NOTES[key]
    return ""


SECTIONS = [
    ("Bus", f"{BUS}/ndbusN/", lambda p: not re.search(r"/(regionN|nmemN|ndctlN)", p)),
    ("Control device", f"{BUS}/ndbusN/ndctlN/", None),
    ("DIMMs (nfit)", f"{BUS}/ndbusN/nmemN/", None),
    ("Regions", f"{BUS}/ndbusN/regionN/", lambda p: not re.search(r"/(namespaceN\.M|pfnN\.M|daxN\.M|bttN\.M)", p)),
    ("Namespaces", f"{BUS}/ndbusN/regionN/namespaceN.M/", lambda p: "/block/" not in p),
    ("pfn devices (fsdax)", f"{BUS}/ndbusN/regionN/pfnN.M/", lambda p: "/block/" not in p),
    ("nd dax devices (devdax)", f"{BUS}/ndbusN/regionN/daxN.M/", lambda p: "daxN.M/daxN.M" not in p),
    ("device-dax instances", f"{BUS}/ndbusN/regionN/daxN.M/daxN.M/", None),
    ("btt devices (sector)", f"{BUS}/ndbusN/regionN/bttN.M/", lambda p: "/block/" not in p),
    ("Block devices (pmemN, under a raw namespace or a pfn device)", f"{BUS}/ndbusN/regionN/pfnN.M/block/pmemN/",
     None),
    ("Block devices under a btt (pmemNs)", f"{BUS}/ndbusN/regionN/bttN.M/block/pmemNs/", None),
    ("Block devices under a raw namespace", f"{BUS}/ndbusN/regionN/namespaceN.M/block/pmemN/", None),
    ("Soft-reserved memory (dax_hmem): the region", "/sys/devices/platform/hmem.N/",
     lambda p: not re.search(r"/daxN\.M/", p)),
    ("Soft-reserved memory: device-dax instances", "/sys/devices/platform/hmem.N/daxN.M/", None),
    ("Buses and drivers", "/sys/bus/", None),
    ("Classes, device numbers, block", "/sys/class/", None),
    ("", "/sys/dev/", None),
    ("", "/sys/block/", None),
    ("Modules", "/sys/module/", None),
    ("System", "/sys/devices/system/", None),
    ("Device files", "/dev/", None),
]


def render(entries: dict[str, tuple[str, int]], where: dict[str, set[str]]) -> str:
    lines = [
        "# sysfs reference",
        "",
        "Generated by `python docs/gen_sysfs_reference.py --write` from real mounts (e820 with a",
        "namespace in each mode, nfit with DIMMs and labelled namespaces, nfit_test's two buses);",
        "`tests/tools/test_docs.py`",
        "fails when it no longer matches what vnvdimm serves. Generic names: `ndbusN`, `regionN`,",
        "`namespaceN.M`, `pfnN.M`, `daxN.M`, `bttN.M`, `nmemN`, `pmemN`, `MAJ:MIN`...",
        "",
        "ABI: **kernel** = as drivers/nvdimm, drivers/dax and the block layer serve it (see the kernel's",
        "`Documentation/ABI/testing/sysfs-bus-nvdimm`, `sysfs-bus-dax`, `sysfs-block`); **series** = the",
        "2018 async memmap-init series (`memmap_state`); **vnvdimm** = an extension of vnvdimm, absent",
        "from any kernel. Kinds: attr (text attribute, st_size 4096), binary, dir, link, char (a host",
        "character device node), file (an emulated device file). `<platform>` is the bus's platform",
        "device: `platform/e820_pmem` (e820), `LNXSYSTM:00/LNXSYBUS:00/ACPI0012:00` (nfit) or",
        "`platform/nfit_test.N` (nfit_test, where the module's `nfit_test_dimm/test_dimmN` sit too); entries",
        "that only one of them has say so in the notes. Device directories hold a block device",
        "(`block/pmemN`) where the kernel's do; its entries are listed once, under the pfn device.",
        "",
    ]

    def note(p: str) -> str:
        text = note_for(p)
        only = where.get(p, set())
        if len(only) == 1 and "hmem" not in p:  # [[hmem]] is any platform's; mounted here with e820
            text = f"({next(iter(only))} only) {text}".strip()
        return text.replace("|", "\\|")

    done: set[str] = set()
    for title, prefix, keep in SECTIONS:
        rows = [p for p in sorted(entries) if p.startswith(prefix) and p not in done
                and (keep is None or keep(p[len(prefix) - 1:]))]
        if not rows:
            continue
        if title:
            lines += [f"## {title}", ""]
        lines += [f"Under `{prefix}`:", "", "| path | kind | mode | ABI | notes |", "|---|---|---|---|---|"]
        for p in rows:
            kind, mode = entries[p]
            rel = p[len(prefix):]
            abi = classify(p) if kind in ("attr", "binary", "dir") else ""
            if abi == "kernel" and kind == "dir":
                abi = ""
            lines.append(f"| `{rel}` | {kind} | {mode:04o} | {abi} | {note(p)} |")
            done.add(p)
        lines.append("")
    # Directories that only lead to the ones above need no row of their own.
    rest = [p for p in sorted(entries) if p not in done and (entries[p][0] != "dir" or classify(p) == "vnvdimm")]
    if rest:
        lines += ["## Elsewhere", "", "| path | kind | mode | ABI | notes |", "|---|---|---|---|---|"]
        for p in rest:
            kind, mode = entries[p]
            abi = classify(p) if kind in ("attr", "binary") else ""
            lines.append(f"| `{p}` | {kind} | {mode:04o} | {abi} | {note(p)} |")
        lines.append("")
    return "\n".join(lines)


def generate() -> str:
    entries: dict[str, tuple[str, int]] = {}
    where: dict[str, set[str]] = {}
    for name, topology in (("e820", E820), ("nfit", NFIT), ("nfit_test", NFIT_TEST)):
        with Testbed(topology) as tb:
            tb.wait_memmap(timeout=60)
            for path, value in walk(tb.root).items():
                entries.setdefault(path, value)
                where.setdefault(path, set()).add(name)
    return render(entries, where)


def main(argv: list[str]) -> int:
    text = generate()
    if "--write" in argv:
        OUT.write_text(text)
        print(f"wrote {OUT}", file=sys.stderr)
        return 0
    if "--check" in argv:
        current = OUT.read_text() if OUT.exists() else ""
        if current == text:
            return 0
        sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                   str(OUT), "generated"))
        print(f"\n{OUT} is stale: run python docs/gen_sysfs_reference.py --write", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
