"""The shell half of vnvdimm, shipped in the package so that a wheel install has it:
`with-vnvdimm` (also `vnvdimm run`) and the modprobe/modinfo/journalctl shims it puts on the
PATH. mountscripts/with-vnvdimm in a checkout is a thin wrapper around this one."""

from __future__ import annotations

from pathlib import Path

WITH_VNVDIMM = Path(__file__).resolve().parent / "with-vnvdimm"
SHIMS = Path(__file__).resolve().parent / "shims"
