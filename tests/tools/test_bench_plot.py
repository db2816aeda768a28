"""`python -m bench --plot DIR` writes the charts (PNG) and the numbers they show; without
matplotlib (an optional extra) it says what to install, before measuring anything."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from tooltest import REPO, clean_env

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib (the plot extra) not installed")
def test_plot_writes_the_three_charts(tmp_path) -> None:
    res = subprocess.run([sys.executable, "-m", "bench", "--plot", str(tmp_path / "charts"), "--quick"],
                         capture_output=True, text=True, timeout=240, cwd=REPO, env=clean_env())
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("memmap-init.png", "first-read.png", "throughput.png"):
        data = (tmp_path / "charts" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, name
    numbers = json.loads((tmp_path / "charts" / "plot-data.json").read_text())
    assert all(seconds > 0 for line in numbers["memmap_init"].values() for _, seconds in line)
    assert numbers["first_read"]["during"] and len(numbers["first_read"]["after"]) == 40
    assert [req for req, _ in numbers["throughput"]] == [4096 << k for k in range(9)]


def test_plot_without_matplotlib_says_what_to_install(tmp_path) -> None:
    blocker = tmp_path / "sitecustomize.py"  # this interpreter, with matplotlib unimportable
    blocker.write_text("import sys\nsys.modules['matplotlib'] = None\n")
    res = subprocess.run([sys.executable, "-m", "bench", "--plot", str(tmp_path / "charts")], capture_output=True,
                         text=True, timeout=120, cwd=REPO, env=clean_env(PYTHONPATH=f"{tmp_path}:{REPO}"))
    assert res.returncode == 2 and "pip install matplotlib" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "charts").exists()
