"""The preload library's own C, compiled into a test program that includes its source whole
(static functions and macros included), for the tests that ask it directly."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "vnvdimm" / "preload" / "vnvdimm_preload.c"


def compile_program(directory: Path, program: str) -> Path:
    """`program` (C; the word SOURCE stands for the library's path) built in `directory`;
    skips the test where there is no C compiler."""
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler")
    src = directory / "program.c"
    src.write_text(program.replace("SOURCE", str(SOURCE)))
    subprocess.run(["cc", "-O1", "-Wall", "-Werror", "-Wno-unused-function", "-o", src.with_suffix(""), src, "-ldl"],
                   check=True, capture_output=True)
    return src.with_suffix("")
