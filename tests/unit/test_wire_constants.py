"""The ioctl wire protocol is written twice: in the preload library (C, the client every
tool loads) and in vnvdimm/ioctl/wire.py (the daemon's side and the Python client). The C
compiler reads the library's own definitions here (its source included whole, as
test_preload_parsing.py does), so a change to one side that the other does not follow fails
this test instead of only the end-to-end ones."""

from __future__ import annotations

import struct
import subprocess

import pytest
from preload_program import compile_program

from vnvdimm.ioctl import wire

# The C struct fields in order, as wire.py packs them (REQUEST, OP).
REQUEST_FIELDS = ("magic", "version", "request", "regions", "window", "readable")
REGION_FIELDS = ("size", "access", "pad")
OP_FIELDS = ("op", "region", "offset", "length")

PROGRAM = r"""
#include "SOURCE"
#include <stddef.h>
#include <stdio.h>

#define FIELD(type, name) printf(#type "." #name " %zu %zu\n", offsetof(struct type, name), \
                                 sizeof(((struct type *)0)->name))

int main(void)
{
    printf("WIRE_MAGIC %llu\n", (unsigned long long)WIRE_MAGIC);
    printf("WIRE_VERSION %llu\n", (unsigned long long)WIRE_VERSION);
    printf("OP_WRITE %llu\n", (unsigned long long)OP_WRITE);
    printf("OP_DONE %llu\n", (unsigned long long)OP_DONE);
    printf("OP_READ %llu\n", (unsigned long long)OP_READ);
    printf("REGION_READ %llu\n", (unsigned long long)REGION_READ);
    printf("REGION_WRITE %llu\n", (unsigned long long)REGION_WRITE);
    printf("MAX_REGIONS %llu\n", (unsigned long long)MAX_REGIONS);
    printf("MAX_PUSH %llu\n", (unsigned long long)MAX_PUSH);
    printf("sizeof.wire_request %zu\n", sizeof(struct wire_request));
    printf("sizeof.wire_op %zu\n", sizeof(struct wire_op));
    printf("sizeof.wire_region %zu\n", sizeof(struct wire_region));
    FIELD(wire_request, magic); FIELD(wire_request, version); FIELD(wire_request, request);
    FIELD(wire_request, regions); FIELD(wire_request, window); FIELD(wire_request, readable);
    FIELD(wire_region, size); FIELD(wire_region, access); FIELD(wire_region, pad);
    FIELD(wire_op, op); FIELD(wire_op, region); FIELD(wire_op, offset); FIELD(wire_op, length);
    return 0;
}
"""


@pytest.fixture(scope="module")
def c_side(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[int]]:
    """What the compiled library defines: name -> its numbers."""
    program = compile_program(tmp_path_factory.mktemp("wire"), PROGRAM)
    res = subprocess.run([str(program)], capture_output=True, text=True, timeout=60, check=True)
    return {name: [int(v) for v in values] for name, *values in (line.split() for line in res.stdout.splitlines())}


def python_layout(fmt: struct.Struct, fields: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(offset, size) of each field of a little-endian struct.Struct without padding codes."""
    codes = fmt.format.lstrip("<")
    assert len(codes) == len(fields), (fmt.format, fields)
    out, offset = {}, 0
    for name, code in zip(fields, codes, strict=True):
        size = struct.calcsize("<" + code)
        out[name] = (offset, size)
        offset += size
    return out


def test_the_numbers_on_the_wire_are_the_same_on_both_sides(c_side: dict[str, list[int]]) -> None:
    assert c_side["WIRE_MAGIC"] == [wire.MAGIC]
    assert c_side["WIRE_VERSION"] == [wire.VERSION]
    assert c_side["OP_WRITE"] == [wire.OP_WRITE]
    assert c_side["OP_DONE"] == [wire.OP_DONE]
    assert c_side["OP_READ"] == [wire.OP_READ]
    assert (c_side["REGION_READ"], c_side["REGION_WRITE"]) == ([wire.REGION_READ], [wire.REGION_WRITE])
    assert c_side["MAX_REGIONS"] == [wire.MAX_REGIONS + 1]  # the C count includes the argument


def test_the_headers_have_the_same_layout_on_both_sides(c_side: dict[str, list[int]]) -> None:
    headers = (("wire_request", wire.REQUEST, REQUEST_FIELDS), ("wire_region", wire.REGION, REGION_FIELDS),
               ("wire_op", wire.OP, OP_FIELDS))
    for c_name, fmt, fields in headers:
        assert c_side[f"sizeof.{c_name}"] == [fmt.size], c_name
        for name, (offset, size) in python_layout(fmt, fields).items():
            assert c_side[f"{c_name}.{name}"] == [offset, size], f"{c_name}.{name}"
    assert wire.STATUS.size == 4  # the client answers a WRITE with a uint32_t status


def test_the_daemon_takes_every_window_the_library_sends(c_side: dict[str, list[int]]) -> None:
    """The library caps an argument's window at MAX_PUSH; the daemon refuses a window past
    MAX_TRANSFER as a protocol error, so the cap must fit under it."""
    assert c_side["MAX_PUSH"][0] <= wire.MAX_TRANSFER
