"""The topologies the tests mount or boot, built in one place for every test layer (model,
mount, ndctl, tools, reliability, bench-free).

``e820("64M fsdax dev", "64M devdax mem", "64M raw", "64M sector sector_size=4096")`` gives
the config text: one region per spec, 'SIZE MODE [MAP] [key=value...]' (fsdax/devdax get
``align = "2M"`` unless the spec sets one); ``workers``, ``ns_per_page`` and ``mode`` fill
the [memmap] table (None leaves a key out).

``nfit("128M 128M 128M 128M", "0,1: 64M fsdax mem name=first", "2,3")`` gives an nfit config:
the DIMM sizes, then one region per spec, 'DIMMS[: NAMESPACE; NAMESPACE...]' with each
namespace 'SIZE MODE [MAP] [key=value...]' as above (no align is added)."""

from __future__ import annotations


def _value(text: str) -> str:
    return text if text.isdigit() else f'"{text}"'


def _head(template: str, workers: int | None, ns_per_page: int | None, mode: str | None) -> list[str]:
    out = [f'template = "{template}"']
    memmap = [f"{key} = {_value(str(value))}" for key, value in
              (("workers", workers), ("ns_per_page", ns_per_page), ("mode", mode)) if value is not None]
    if memmap:
        out += ["[memmap]", *memmap]
    return out


def _namespace(words: list[str]) -> dict[str, str]:
    """'MODE [MAP] [key=value...]' as the fields of a namespace table."""
    nsmode, *rest = words
    fields = {"mode": nsmode}
    for word in rest:
        key, _, value = word.partition("=")
        if value:
            fields[key] = value
        else:
            fields["map"] = key
    return fields


def _table(fields: dict[str, str]) -> str:
    return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in fields.items()) + " }"


def e820(*regions: str, workers: int | None = 2, ns_per_page: int | None = None, mode: str | None = None) -> str:
    out = _head("e820", workers, ns_per_page, mode)
    for spec in regions:
        size, *words = spec.split()
        fields = _namespace(words)
        if fields["mode"] in ("fsdax", "devdax"):
            fields.setdefault("align", "2M")
        out += ["[[region]]", f'size = "{size}"', f"namespace = {_table(fields)}"]
    return "\n".join(out) + "\n"


def nfit(dimms: str, *regions: str, workers: int | None = 2, ns_per_page: int | None = None,
         mode: str | None = None) -> str:
    out = _head("nfit", workers, ns_per_page, mode)
    for size in dimms.split():
        out += ["[[dimm]]", f'size = "{size}"']
    for spec in regions:
        indexes, _, namespaces = spec.partition(":")
        out += ["[[region]]", f"dimms = [{', '.join(i.strip() for i in indexes.split(','))}]"]
        tables = [_table({"size": words[0], **_namespace(words[1:])})
                  for words in (ns.split() for ns in namespaces.split(";")) if words]
        if tables:
            out.append(f"namespaces = [ {', '.join(tables)} ]")
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


SMALL_NFIT = nfit("512M 512M 512M 512M", "0,1: 256M fsdax dev", "2,3")
