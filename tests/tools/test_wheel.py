"""A wheel built from the checkout, installed in a new venv, works from outside the checkout:
it mounts, runs ndctl through the packaged wrapper (`vnvdimm run`), and runs a test of the
test bed and of the pytest fixture. What breaks here is what a `pip install vnvdimm` user
would see (a file the package forgot, a path into the source tree).

The venv gets the wheel with `--no-index --no-deps` (a test must not need the package index);
its dependencies (mfusepy, numpy, rich, pytest...) come from this interpreter's environment
through a .pth file, after the venv's own site-packages, so `import vnvdimm` finds only the
wheel's copy (checked). The wheel is built once per session from a copy of the tree (the
build writes build/ and *.egg-info beside the sources)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mount_kit import SMALL_E820, fuse_mounts_under

from vnvdimm.mounts import lazy_unmount

REPO = Path(__file__).resolve().parents[2]
DEPENDENCIES = ("mfusepy", "numpy", "rich", "markdown_it", "mdurl", "pygments", "pytest", "_pytest", "pluggy",
                "iniconfig", "packaging", "pytest_timeout")
SOURCE_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                       ".pytest_cache", ".ruff_cache", "results")


@dataclass
class Venv:
    root: Path
    env: dict[str, str]

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def run(self, *argv: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, cwd=cwd, env=self.env)


def _build_wheel(base: Path, compiler: str | None = None) -> Path:
    source = base / "src"
    shutil.copytree(REPO, source, ignore=SOURCE_IGNORE)
    # Offline where this environment can build wheels itself; else as a user would (`pip wheel .`:
    # setuptools and wheel from the package index, in an isolated build environment).
    offline = ["--no-build-isolation", "--no-index"] if _can_build_wheels() else []
    env = dict(os.environ)
    env.pop("VNVDIMM_WERROR", None)
    if compiler is not None:
        env["CC"] = compiler  # what setuptools compiles with
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *offline,
                          "-w", str(base / "dist"), str(source)], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    (built,) = (base / "dist").glob("vnvdimm-*.whl")
    return built


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the wheel would have no preload library (test_without_a_compiler covers that)")
    return _build_wheel(tmp_path_factory.mktemp("wheel"))


def _can_build_wheels() -> bool:
    """setuptools builds wheels by itself from 70.1 on, with the wheel package before."""
    try:
        from importlib.metadata import version

        setuptools = tuple(int(x) for x in version("setuptools").split(".")[:2])
    except Exception:
        return False
    return setuptools >= (70, 1) or importlib.util.find_spec("wheel") is not None


def _site_packages_of(package: str) -> Path | None:
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    file = Path(module.__file__ or "")
    return (file.parent if file.name == "__init__.py" else file).parent


@pytest.fixture(scope="session")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    return _make_venv(wheel, tmp_path_factory.mktemp("venv") / "venv")


def _make_venv(wheel: Path, root: Path) -> Venv:
    res = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    python = root / "bin" / "python"
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                          "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    deps = [d for d in dict.fromkeys(_site_packages_of(p) for p in DEPENDENCIES) if d is not None]
    # Never the checkout itself (PYTHONPATH runs): only the wheel's vnvdimm may be importable.
    deps = [d for d in deps if not (d / "vnvdimm" / "__init__.py").exists()]
    (site,) = (root / "lib").glob("python3*/site-packages")
    (site / "zz_test_dependencies.pth").write_text("".join(f"{d}\n" for d in deps))
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "VNVDIMM", "VNVDIMM_PRELOAD", "PYTEST_ADDOPTS")
           and not k.startswith("PYTEST_")}
    env["PATH"] = f"{root / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return Venv(root, env)


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A working directory outside the checkout; any mount left under it is detached."""
    try:
        yield tmp_path
    finally:
        for m in fuse_mounts_under(tmp_path):
            lazy_unmount(m)


def test_the_wheel_has_everything_it_runs(venv: Venv, outside: Path) -> None:
    res = venv.run(str(venv.bin / "python"), "-c",
                   "import vnvdimm, vnvdimm.scripts as s, vnvdimm.preload as p; "
                   "print(vnvdimm.__file__); print(s.WITH_VNVDIMM); print(p.library_path())", cwd=outside)
    assert res.returncode == 0, res.stderr
    for line in res.stdout.splitlines():
        assert Path(line).is_relative_to(venv.root), f"{line} is not the wheel's (from {venv.root})"
        assert Path(line).exists()
    res = venv.run(str(venv.bin / "vnvdimm"), "preload-path", cwd=outside)
    assert res.returncode == 0 and Path(res.stdout.strip()).is_relative_to(venv.root), res.stderr


@pytest.mark.ndctl
def test_the_wheel_mounts_and_runs_ndctl(venv: Venv, outside: Path) -> None:
    if shutil.which("ndctl") is None:
        pytest.skip("ndctl is not installed")
    (outside / "mnt").mkdir()
    (outside / "topology.toml").write_text(SMALL_E820)
    vnvdimm = str(venv.bin / "vnvdimm")
    res = venv.run(vnvdimm, "mount", "mnt", "--config", "topology.toml", "--state-dir", "state", cwd=outside)
    assert res.returncode == 0, res.stderr
    try:
        # A shell whose PATH does not have the venv: `vnvdimm run` finds everything by itself.
        res = subprocess.run([vnvdimm, "run", "mnt", "--", "ndctl", "list", "-N"], capture_output=True, text=True,
                             timeout=120, cwd=outside,
                             env={**venv.env, "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"})
        assert res.returncode == 0, res.stderr
        assert sorted(ns["dev"] for ns in json.loads(res.stdout)) == ["namespace0.0", "namespace1.0"]
    finally:
        res = venv.run(vnvdimm, "umount", "mnt", cwd=outside)
    assert res.returncode == 0, res.stderr


BED_TEST = '''
import json

from vnvdimm.testbed import Testbed


def test_the_bed():
    with Testbed() as tb:
        res = tb.run(["ndctl", "list", "-N"])
        assert res.returncode == 0, res.stderr
        assert {ns["dev"] for ns in json.loads(res.stdout)} == {"namespace0.0", "namespace1.0"}


def test_the_fixture(vnvdimm_testbed):
    res = vnvdimm_testbed.run(["ndctl", "list", "-R"])
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)) == 2
'''


@pytest.mark.ndctl
def test_the_wheel_runs_a_test_bed_test(venv: Venv, outside: Path) -> None:
    if shutil.which("ndctl") is None:
        pytest.skip("ndctl is not installed")
    (outside / "test_bed.py").write_text(BED_TEST)
    res = venv.run(str(venv.bin / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   f"--basetemp={outside / 'tmp'}", "test_bed.py", cwd=outside, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "2 passed" in res.stdout


def test_without_a_compiler_the_install_works_and_says_what_is_missing(outside: Path) -> None:
    """No C compiler (CC names none): the wheel builds and installs, without the preload
    library, and the commands that need it say so and what to do."""
    tmp_path = outside
    venv = _make_venv(_build_wheel(tmp_path / "build", compiler=str(tmp_path / "no-such-cc")), tmp_path / "venv")
    with zipfile.ZipFile(next((tmp_path / "build" / "dist").glob("*.whl"))) as wheel:
        assert not [n for n in wheel.namelist() if n.endswith(".so")], wheel.namelist()
    res = venv.run(str(venv.bin / "vnvdimm"), "preload-path", cwd=tmp_path)
    assert res.returncode == 1 and res.stdout == ""
    assert "no _vnvdimm_preload" in res.stderr and "C compiler" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    # It mounts, and with-vnvdimm still runs the command, after saying what will not work.
    vnvdimm = str(venv.bin / "vnvdimm")
    (tmp_path / "mnt").mkdir()
    (tmp_path / "topology.toml").write_text(SMALL_E820)
    res = venv.run(vnvdimm, "mount", "mnt", "--config", "topology.toml", "--state-dir", "state", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    try:
        res = venv.run(vnvdimm, "run", "mnt", "--", "cat", "/sys/bus/nd/devices/region0/size", cwd=tmp_path)
        assert res.returncode == 0 and res.stdout == "268435456\n", res.stdout + res.stderr
        assert "no preload library" in res.stderr and "without a C compiler" in res.stderr, res.stderr
    finally:
        res = venv.run(vnvdimm, "umount", "mnt", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
