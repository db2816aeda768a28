"""The topologies the tests mount or boot, built in one place for every test layer (model,
mount, ndctl, tools, reliability, bench-free).

``e820("64M fsdax dev", "64M devdax mem", "64M raw", "64M sector sector_size=4096")`` gives
the config text: one region per spec, 'SIZE MODE [MAP] [key=value...]' (fsdax/devdax get
``align = "2M"`` unless the spec sets one); ``workers``, ``ns_per_page`` and ``mode`` fill
the [memmap] table (None leaves a key out)."""

from __future__ import annotations


def _value(text: str) -> str:
    return text if text.isdigit() else f'"{text}"'


def e820(*regions: str, workers: int | None = 2, ns_per_page: int | None = None, mode: str | None = None) -> str:
    out = ['template = "e820"']
    memmap = [f"{key} = {_value(str(value))}" for key, value in
              (("workers", workers), ("ns_per_page", ns_per_page), ("mode", mode)) if value is not None]
    if memmap:
        out += ["[memmap]", *memmap]
    for spec in regions:
        size, nsmode, *rest = spec.split()
        fields = {"mode": nsmode}
        for word in rest:
            key, _, value = word.partition("=")
            if value:
                fields[key] = value
            else:
                fields["map"] = key
        if nsmode in ("fsdax", "devdax"):
            fields.setdefault("align", "2M")
        ns = ", ".join(f"{k} = {_value(v)}" for k, v in fields.items())
        out += ["[[region]]", f'size = "{size}"', f"namespace = {{ {ns} }}"]
    return "\n".join(out) + "\n"


# Two 256 MiB regions: namespace0.0 fsdax map=dev (pfn0.1) and namespace1.0 devdax map=mem
# (dax1.1): the mnt fixture's platform.
SMALL_E820 = e820("256M fsdax dev", "256M devdax mem")
# The same whose memmaps take 20 us a page: about 0.7 s each with both workers, long enough
# to watch.
SLOW_E820 = e820("256M fsdax dev", "256M devdax mem", ns_per_page=20000)


def four_modes(workers: int | None = None) -> str:
    """One 64 MiB region per namespace mode: fsdax map=dev, devdax map=mem, raw, sector 4K."""
    return e820("64M fsdax dev", "64M devdax mem", "64M raw", "64M sector sector_size=4096", workers=workers)


SMALL_NFIT = """\
template = "nfit"
[memmap]
workers = 2
[[dimm]]
size = "512M"
[[dimm]]
size = "512M"
[[dimm]]
size = "512M"
[[dimm]]
size = "512M"
[[region]]
dimms = [0, 1]
namespaces = [ { size = "256M", mode = "fsdax", map = "dev" } ]
[[region]]
dimms = [2, 3]
"""
