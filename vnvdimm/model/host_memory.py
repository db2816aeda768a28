"""The host's memory, as a `map = "mem"` memmap needs it.

On a real machine a pfn/dax device with its memmap in RAM (`mode = "ram"`) gets its struct
pages from devm_memremap_pages(): vmemmap_populate() allocates 64 bytes of RAM per 4 KiB page
and the probe fails with ENOMEM when it cannot. vnvdimm keeps those records in shared memory
(a memfd the workers fill in), so the memory they take is the host's: a memmap larger than
what the host can give would push it into reclaim and the OOM killer instead of failing the
enable. So the enable is refused as the kernel refuses it (ENOMEM) when the records would not
fit in what the host has available, less a margin left for everything else.
"""

from __future__ import annotations

from dataclasses import dataclass

MEMINFO = "/proc/meminfo"
#: The share of the host's memory a memmap may never take (everything else on the host, the
#: daemon itself, the page cache of the media files): 1/16 of MemTotal.
MARGIN_SHARE = 16


@dataclass(frozen=True)
class HostMemory:
    """MemTotal and MemAvailable of /proc/meminfo, in bytes."""

    total: int
    available: int

    @property
    def margin(self) -> int:
        return self.total // MARGIN_SHARE

    @property
    def usable(self) -> int:
        """What a new memmap may take: MemAvailable less the margin."""
        return max(0, self.available - self.margin)


def read_host_memory(path: str = MEMINFO) -> HostMemory:
    """The host's memory now; a /proc/meminfo that cannot be read limits nothing."""
    fields: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                name, _, rest = line.partition(":")
                words = rest.split()
                if words and words[0].isdigit():
                    fields[name] = int(words[0]) * (1024 if words[1:] == ["kB"] else 1)
    except OSError:
        return HostMemory(total=1 << 62, available=1 << 62)
    total = fields.get("MemTotal", 1 << 62)
    return HostMemory(total=total, available=fields.get("MemAvailable", fields.get("MemFree", total)))


def format_bytes(n: int) -> str:
    """1536 MiB -> "1.5 GiB": a log line's sizes, to one decimal."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"
