"""The preload library outside any mount: the calls it hooks behave exactly as the C
library's when given NULL or empty paths (no crash where the kernel allows them), whether or
not it is told of a mount."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vnvdimm.preload import PreloadMissing, library_path

# Every stat-family call with the NULL and empty paths a program may pass; each prints
# "name rc errno type", type being the file type bits of what came back (0 if nothing did).
PROGRAM = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

static void show(const char *name, int rc, unsigned mode)
{
    printf("%s %d %d %o\n", name, rc, rc ? errno : 0, rc ? 0 : mode & S_IFMT);
}

int main(int argc, char **argv)
{
    int fd = open(argv[1], O_RDONLY), path_fd = open(argv[1], O_PATH), n = 0;
    struct stat st;
    struct statx stx;

    int rc;
#define STAT(name, call) do { memset(&st, 0, sizeof(st)); errno = 0; rc = call; show(name, rc, st.st_mode); } while (0)
#define STATX(name, call) \
    do { memset(&stx, 0, sizeof(stx)); errno = 0; rc = call; show(name, rc, stx.stx_mode); } while (0)
    STAT("stat-null", stat(NULL, &st));
    STAT("stat-empty", stat("", &st));
    STAT("lstat-null", lstat(NULL, &st));
    STAT("fstatat-null-empty-path", fstatat(fd, NULL, &st, AT_EMPTY_PATH));
    STAT("fstatat-empty-empty-path", fstatat(fd, "", &st, AT_EMPTY_PATH));
    STAT("fstatat-o-path", fstatat(path_fd, "", &st, AT_EMPTY_PATH));
    STAT("fstatat-null", fstatat(AT_FDCWD, NULL, &st, 0));
    STAT("fstatat-cwd-empty-path", fstatat(AT_FDCWD, "", &st, AT_EMPTY_PATH));
    STAT("fstat-o-path", fstat(path_fd, &st));
    STATX("statx-null-empty-path", statx(fd, NULL, AT_EMPTY_PATH, STATX_BASIC_STATS, &stx));
    STATX("statx-o-path-null", statx(path_fd, NULL, AT_EMPTY_PATH, STATX_BASIC_STATS, &stx));
    STATX("statx-null", statx(AT_FDCWD, NULL, 0, STATX_BASIC_STATS, &stx));
    STATX("statx-empty", statx(AT_FDCWD, "", 0, STATX_BASIC_STATS, &stx));
    errno = 0;
    rc = ioctl(fd, FIONREAD, &n);
    show("ioctl-fionread", rc, S_IFREG);
    return 0;
}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler")
    src = tmp_path_factory.mktemp("preload") / "edges.c"
    src.write_text(PROGRAM)
    subprocess.run(["cc", "-O1", "-o", src.with_suffix(""), src], check=True, capture_output=True)
    return src.with_suffix("")


@pytest.fixture(scope="module")
def library() -> str:
    try:
        return str(library_path())
    except PreloadMissing as e:
        pytest.skip(str(e))


def run(program: Path, target: Path, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "VNVDIMM_MOUNT_DEV")}
    res = subprocess.run([str(program), str(target)], capture_output=True, text=True, timeout=60,
                         env={**base, **env})
    assert res.returncode == 0, f"rc {res.returncode}: {res.stderr}"
    return res.stdout


@pytest.mark.parametrize("told", [False, True])
@pytest.mark.parametrize("where", ["tmp", "dev-shm"])
def test_null_and_empty_paths_behave_as_without_the_library(program: Path, library: str, tmp_path: Path,
                                                            told: bool, where: str) -> None:
    """statx(fd, NULL, AT_EMPTY_PATH) and fstatat(fd, NULL, AT_EMPTY_PATH) used to crash the
    caller inside the library (on a file of an anonymous-device file system such as tmpfs);
    every hooked call now returns what the C library returns."""
    target = (Path("/dev/shm") if where == "dev-shm" else tmp_path) / f"vnvdimm-edges-{os.getpid()}"
    target.write_bytes(b"x" * 10)
    try:
        check(program, library, target, told)
    finally:
        target.unlink()


def check(program: Path, library: str, target: Path, told: bool) -> None:
    dev = os.stat(target).st_dev
    told_env = {"VNVDIMM_MOUNT_DEV": f"{os.major(dev)}:{os.minor(dev)}"} if told else {}
    without = run(program, target)
    assert "statx-null-empty-path 0 0 100000" in without  # the kernel takes a NULL path here
    assert run(program, target, LD_PRELOAD=library, **told_env) == without
