"""Where the preload library is: `vnvdimm preload-path`, with-vnvdimm and the test bed load it
into every command they run (LD_PRELOAD), so that the emulated /dev looks like device nodes."""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

LIBRARY_STEM = "_vnvdimm_preload"


class PreloadMissing(RuntimeError):
    """The package was installed without its C part (no compiler at `pip install` time)."""


def library_path() -> Path:
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"{LIBRARY_STEM}{suffix}"
        if candidate.is_file():
            return candidate
    raise PreloadMissing(f"{here}: no {LIBRARY_STEM}*.so; reinstall vnvdimm with a C compiler "
                         "(pip install needs gcc or cc)")
