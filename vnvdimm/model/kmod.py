"""The kernel modules of the emulated platform as the kernel and libkmod show them: where each
is installed under /lib/modules/$(uname -r), what it depends on, whether it is out of tree.

With the nfit_test module, the libnvdimm, nfit and device-dax modules are the mocked builds of
tools/testing/nvdimm (`make M=tools/testing/nvdimm modules_install`): installed in `extra/`
(nfit_test and its nfit_test_iomap in `extra/test/`), tainted `O` once loaded, each linked
against nfit_test_iomap (the Kbuild wraps ioremap and friends for all of them). ndctl's
ndctl_test_init() checks exactly that before it trusts a platform. Without nfit_test they are
the distribution's modules in `kernel/...`, untainted. The dax core, kmem and dax_hmem are the
distribution's in both cases.

`dep_index()` writes libkmod's modules.dep.bin (the format of libkmod-index.c: a trie of
module names, each leaf holding its modules.dep line), which kmod_module_get_path() reads.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# module -> (production path, dependencies)
_PRODUCTION: dict[str, tuple[str, tuple[str, ...]]] = {
    "dax": ("kernel/drivers/dax/dax.ko", ()),
    "kmem": ("kernel/drivers/dax/kmem.ko", ("dax",)),
    "dax_hmem": ("kernel/drivers/dax/hmem/dax_hmem.ko", ("dax",)),
    "libnvdimm": ("kernel/drivers/nvdimm/libnvdimm.ko", ()),
    "nd_pmem": ("kernel/drivers/nvdimm/nd_pmem.ko", ("libnvdimm", "dax")),
    "nd_btt": ("kernel/drivers/nvdimm/nd_btt.ko", ("libnvdimm",)),
    "nd_e820": ("kernel/drivers/nvdimm/nd_e820.ko", ("libnvdimm",)),
    "nfit": ("kernel/drivers/acpi/nfit/nfit.ko", ("libnvdimm",)),
    "device_dax": ("kernel/drivers/dax/device_dax.ko", ("dax",)),
    "dax_pmem": ("kernel/drivers/dax/pmem/dax_pmem.ko", ("dax", "libnvdimm")),
}
# the modules tools/testing/nvdimm builds in place of the production ones
MOCKED = ("libnvdimm", "nd_pmem", "nd_btt", "nd_e820", "nfit", "device_dax", "dax_pmem")
IOMAP = "nfit_test_iomap"
TEST_MODULE = "nfit_test"


@dataclass(frozen=True)
class KernelModule:
    name: str
    path: str  # relative to /lib/modules/$(uname -r)
    depends: tuple[str, ...]
    out_of_tree: bool

    @property
    def taint(self) -> str:
        """/sys/module/NAME/taint: the module's taint flags ("O": out-of-tree)."""
        return "O" if self.out_of_tree else ""


def installed_modules(with_nfit_test: bool) -> dict[str, KernelModule]:
    """Every module the platform's kernel has installed, by name."""
    mods: dict[str, KernelModule] = {}
    for name, (path, deps) in _PRODUCTION.items():
        if with_nfit_test and name in MOCKED:
            mods[name] = KernelModule(name, f"extra/{name}.ko", (*deps, IOMAP), True)
        else:
            mods[name] = KernelModule(name, path, deps, False)
    if with_nfit_test:
        mods[IOMAP] = KernelModule(IOMAP, f"extra/test/{IOMAP}.ko", (), True)
        mods[TEST_MODULE] = KernelModule(TEST_MODULE, f"extra/test/{TEST_MODULE}.ko",
                                         ("nfit", "libnvdimm", IOMAP), True)
    return mods


def holders(mods: dict[str, KernelModule], live: set[str], name: str) -> list[str]:
    """The loaded modules that use `name` (/sys/module/NAME/holders/)."""
    return sorted(m.name for m in mods.values() if m.name in live and name in m.depends)


def _closure(mods: dict[str, KernelModule], name: str) -> list[str]:
    """The module's dependencies, transitively, nearest first (as depmod lists them)."""
    seen: list[str] = []
    todo = list(mods[name].depends)
    while todo:
        dep = todo.pop(0)
        if dep not in seen and dep in mods:
            seen.append(dep)
            todo.extend(mods[dep].depends)
    return seen


def module_file() -> bytes:
    """What a module's path holds: an empty x86-64 relocatable ELF object (a header only).
    libkmod opens it to load the module; the load itself never reaches a kernel (with-vnvdimm's
    preload library answers finit_module() from the platform), so there is no code in it."""
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, version 1
    # e_type ET_REL, e_machine EM_X86_64, e_version, entry/phoff/shoff 0, flags, e_ehsize 64
    return ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, 0, 0, 64, 0, 0, 0, 0, 0)


def dep_lines(mods: dict[str, KernelModule]) -> dict[str, str]:
    """name -> its modules.dep line ("path: dep-path dep-path")."""
    return {name: f"{m.path}: " + " ".join(mods[d].path for d in _closure(mods, name))
            for name, m in sorted(mods.items())}


def modules_dep(mods: dict[str, KernelModule]) -> str:
    return "".join(line.rstrip() + "\n" for line in dep_lines(mods).values())


# libkmod-index.c: header magic, version 2.1; node offsets carry flags in their top nibble
_INDEX_MAGIC = 0xB007F457
_INDEX_VERSION = 0x00020001
_NODE_VALUES = 0x40000000
_NODE_CHILDS = 0x20000000


class _Node:
    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.values: list[str] = []


def dep_index(mods: dict[str, KernelModule]) -> bytes:
    """modules.dep.bin: the trie libkmod's index_search() walks, one character per edge
    (prefix compression is optional in the format and left out), all numbers big-endian."""
    root = _Node()
    for name, line in dep_lines(mods).items():
        node = root
        for ch in name:
            node = node.children.setdefault(ch, _Node())
        node.values.append(line)
    out = bytearray(struct.pack(">III", _INDEX_MAGIC, _INDEX_VERSION, 0))

    def write(node: _Node) -> int:
        offsets = {ch: write(child) for ch, child in sorted(node.children.items())}
        body = bytearray()
        flags = 0
        if offsets:
            flags |= _NODE_CHILDS
            first, last = min(offsets), max(offsets)
            body += bytes([ord(first), ord(last)])
            for code in range(ord(first), ord(last) + 1):
                body += struct.pack(">I", offsets.get(chr(code), 0))
        if node.values:
            flags |= _NODE_VALUES
            body += struct.pack(">I", len(node.values))
            for value in node.values:
                body += struct.pack(">I", 0) + value.encode() + b"\0"
        offset = len(out)
        out.extend(body)
        return offset | flags

    struct.pack_into(">I", out, 8, write(root))
    return bytes(out)
