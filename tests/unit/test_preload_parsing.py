"""The preload library's own judgement, compiled into a test program (its source included
whole): the attribute it accepts, and how much of an ioctl's argument it lets go (the
kernel's sizes, u32 arithmetic included: drivers/nvdimm/bus.c, __nd_ioctl())."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from preload_program import compile_program

PROGRAM = r"""
#include "SOURCE"
#include <stdio.h>

static void window(int dimm, unsigned cmd, const void *arg)
{
    printf("%llu\n", (unsigned long long)nd_window(dimm, cmd, arg));
}

int main(int argc, char **argv)
{
    struct node node;
    unsigned char buf[512] = { 0 };
    uint32_t u;

    if (argc > 1 && strcmp(argv[1], "parse") == 0) {
        int ok = parse_node(argv[2], strlen(argv[2]), &node);
        printf("%d %c %u:%u %s %llu %s\n", ok, ok ? node.type : '-', node.major, node.minor, node.name,
               node.align, node.socket);
        return 0;
    }
    window(0, 1, buf);                      /* ARS_CAP */
    window(1, 1, buf);                      /* SMART */
    u = 4096; memcpy(buf + 4, &u, 4);       /* GET_CONFIG_DATA of 4096 bytes */
    window(1, 5, buf);
    memset(buf, 0, sizeof(buf));
    u = 132; memcpy(buf + 20, &u, 4);       /* ND_CMD_CALL in 0, out 132 */
    window(1, 10, buf);
    u = 0xFFFFFFC0; memcpy(buf + 16, &u, 4); /* in_len wraps to 0 */
    window(1, 10, buf);
    u = 0x7FFFFFFF; memcpy(buf + 16, &u, 4); u = 0; memcpy(buf + 20, &u, 4);
    window(1, 10, buf);
    u = 0; memcpy(buf + 16, &u, 4); u = 0x80000000; memcpy(buf + 20, &u, 4);
    window(1, 10, buf);
    memset(buf, 0, sizeof(buf));
    u = 5; memcpy(buf + 4, &u, 4);          /* ARS_STATUS, out_length 5: its records' size wraps */
    window(0, 3, buf);
    window(0, 7, buf);                      /* no such bus command */
    window(1, 10, NULL);                    /* nothing readable: the package's 64 bytes at most */
    printf("%llu %llu %llu\n", (unsigned long long)block_window(0x80081272),
           (unsigned long long)block_window(0x1268), (unsigned long long)block_window(0x1260));
    return 0;
}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_program(tmp_path_factory.mktemp("parsing"), PROGRAM)


def parse(program: Path, attribute: str) -> str:
    res = subprocess.run([str(program), "parse", attribute], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_the_attribute_is_taken_whole_or_not_at_all(program: Path) -> None:
    good = "/run/vnvdimm/ioctl-0123456789abcdef.sock"
    assert parse(program, f"c 241:0 nmem0 0 {good}") == f"1 c 241:0 nmem0 0 {good}"
    assert parse(program, f"b 259:1 pmem1s 4096 {good}") == f"1 b 259:1 pmem1s 4096 {good}"
    longest = "/" + "s" * 106  # sun_path holds 107 bytes and the NUL
    assert parse(program, f"c 1:2 dax0.0 2097152 {longest}").startswith("1 ")
    for bad in (f"c 241:0 nmem0 0 {good} trailing", f"c 241:0 nmem0 0 {good}\n", f"c 1:2 n 0 {longest}s",
                f"x 241:0 nmem0 0 {good}", "c 241:0 nmem0 0 relative.sock", f"c 241:0 ../x 0 {good}",
                f"c 241 nmem0 0 {good}", f"c 99999:0 nmem0 0 {good}", f"c 241:0 nmem0 -1 {good}",
                f"c 241:0 nmem0 {good}", f"c  241:0 nmem0 0 {good}", ""):
        assert parse(program, bad).startswith("0 "), bad


def test_the_argument_is_sized_as_the_kernel_sizes_it(program: Path) -> None:
    res = subprocess.run([str(program)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n") == [
        "32",  # ARS_CAP: 8 + 8 in, 4 x 4 out
        "132",  # SMART: 4 + 128 out
        str(8 + 4 + 4096),  # GET_CONFIG_DATA: its in_length of data
        str(64 + 132),  # ND_CMD_CALL: the package and its payload
        "256",  # in_len wrapped to 0: the envelope's 256 bytes, never arg + 4 GiB
        "256",  # buf_len past 4 MiB: EINVAL after the envelope
        "320",  # the output envelope read past the 64-byte package
        "256",  # ARS_STATUS with out_length 5: 5 - 8 wraps; the envelope only
        "0",  # no such command: ENOTTY before any copy
        "64",  # the package the kernel copies first
        "8 4 8",  # BLKGETSIZE64, BLKSSZGET, BLKGETSIZE
        "",
    ]
