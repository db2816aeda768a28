"""Run an ndctl source tree's own tests against vnvdimm, one fresh platform per test.

    python -m vnvdimm.suite NDCTL_SRC/test [TEST...] [--test-path BUILD/test | --build DIR]
                            [--timeout S] [--json FILE] [-v]

ndctl's `test/` folder (any version; vnvdimm ships none of it) lists its suite in meson.build:
shell tests that expect the buses of the kernel's nfit_test module (`nfit_test.0`,
`nfit_test.1`), a few that use an ACPI.NFIT or e820 bus, and C tests (libndctl, dsm-fail,
ack-shutdown-count-set, pmem-ns, dax-dev, device-dax...) built from ndctl's source. Only that
list runs (helper scripts beside it, such as dax.sh or security.sh, do not), in its order.
Each test runs in its own mount (a platform chosen from the buses it or its C source names,
nfit_test by default, sized for what the test does) through `with-vnvdimm`, so `/sys`, `/dev`
and the kernel modules libkmod sees are the emulated ones and its `modprobe`, `modinfo` and
`journalctl` calls are answered by vnvdimm's shims. NDCTL and DAXCTL are the tools found on the
PATH unless set in the environment. The C tests and the helpers the shell tests run
(`list-smart-dimm`, `smart-notify`, `daxdev-errors`, `dax-dev`...) are taken from TEST_PATH
(`--test-path`: the `test/` folder of an ndctl build), or built by `--build DIR` from the source
tree with meson (the Debian packages it needs: docs/tools.md). A test that needs a tool the host
lacks (fio, uuidgen, jq...) is reported as MISSING with the tool's name. Nothing is installed
into the host: no key in its keyrings, nothing in /etc/ndctl. The result is a table: PASS
(exit 0), SKIP (exit 77, ndctl's convention), SETUP-FAIL (exit 77 from the err() trap: the test
failed before its own setup was done), FAIL (anything else), TIMEOUT, MISSING, ERROR.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vnvdimm.model import keyring
from vnvdimm.testbed import WITH_VNVDIMM, Testbed, TestbedError, with_preload

SKIP_STATUS = 77
STATUSES = ("PASS", "SKIP", "SETUP-FAIL", "FAIL", "TIMEOUT", "MISSING", "ERROR")

NFIT_TEST: dict[str, Any] = {"template": "nfit_test", "memmap": {"workers": 1}}
CXL_TEST: dict[str, Any] = {"template": "cxl_test", "memmap": {"workers": 1}}  # nfit_test's too
# align.sh and sub-section.sh want an ACPI.NFIT bus with an empty, 1 GiB-aligned, labelled
# region large enough for two 1 GiB namespaces (the media is sparse), not interleaved (align.sh
# sets the region align to 4 KiB, which a 2-way set refuses).
ACPI_NFIT: dict[str, Any] = {
    "template": "nfit", "memmap": {"workers": 1},
    "dimm": [{"size": "8G"}],
    "region": [{"dimms": [0]}],
}
E820: dict[str, Any] = {
    "template": "e820", "memmap": {"workers": 1},
    "region": [{"size": "1G", "namespace": {"mode": "raw"}}],
}
# device-dax-fio.sh and device-dax make their victim an fsdax or devdax namespace aligned to
# 4 KiB, 2 MiB and 1 GiB in turn: with the memmap on the device (ndctl's default) and the data
# start rounded up to 1 GiB, a 1 GiB region leaves nothing; 4 GiB (sparse) leave 3 GiB.
# daxctl-create.sh carves the capacity of a soft-reserved (dax_hmem) region; its align test
# wants a 1 GiB device beside the rest, so 2 GiB of it (RAM: an anonymous memory file).
HMEM: dict[str, Any] = {
    "template": "e820", "memmap": {"workers": 1},
    "region": [{"size": "32M", "namespace": {"mode": "raw"}}],
    "hmem": [{"size": "2G"}],
}
E820_LARGE: dict[str, Any] = {**E820, "region": [{"size": "4G", "namespace": {"mode": "raw"}}]}
# tests by name that need a bigger platform than their bus's default
LARGE = {"device-dax-fio.sh": ("e820", E820_LARGE), "device-dax": ("e820", E820_LARGE)}
# programs a test runs that a host may lack (ndctl's check_prereq names them too, then skips)
TOOLS = ("fio", "uuidgen", "jq", "parted", "mkfs.ext4", "mkfs.xfs", "xxd", "trace-cmd", "keyctl", "losetup",
         "blockdev", "filefrag", "dd", "mount", "mkfs.ext4")


@dataclass
class Result:
    test: str
    status: str
    seconds: float
    exit_code: int | None
    platform: str
    tail: str = ""


def platform_for(script_text: str) -> tuple[str, dict[str, Any]]:
    """The platform a test script expects, from the buses it names (ndctl's dax-dev helper,
    which picks the test's victim namespace, looks for it on the e820 bus)."""
    if re.search(r"\$TEST_PATH/dax-dev\b", script_text):
        return "e820", E820
    if re.search(r"dax_hmem|device_hmem", script_text):
        return "hmem", HMEM
    if re.search(r"CXL_TEST_BUS|cxl_test|security\.sh cxl", script_text):
        return "cxl_test", CXL_TEST
    if re.search(r"NFIT_TEST_BUS|nfit_test", script_text):
        return "nfit_test", NFIT_TEST
    if re.search(r"ACPI_BUS|ACPI\.NFIT", script_text):
        return "ACPI.NFIT", ACPI_NFIT
    if re.search(r"E820_BUS|\be820\b", script_text):
        return "e820", E820
    return "nfit_test", NFIT_TEST


def platform_for_c(source_text: str) -> tuple[str, dict[str, Any]]:
    """The platform a C test expects, from its sources: pmem-ns prefers an ACPI.NFIT bus (it
    falls back to nfit_test only without one); dax-dev.c's ndctl_get_test_dev() looks for its
    victim on e820 (device-dax and revoke_devmem link it); the rest name nfit_test's buses."""
    if re.search(r"ACPI\.NFIT", source_text):
        return "ACPI.NFIT", ACPI_NFIT
    if re.search(r"\be820\b", source_text):
        return "e820", E820
    return "nfit_test", NFIT_TEST


@dataclass(frozen=True)
class SuiteTest:
    """One test of the suite: its name in meson.build and what runs it."""

    name: str
    script: Path | None  # a shell test
    executable: str | None = None  # a C test: the program's name in the build's test/ folder
    sources: tuple[Path, ...] = ()

    def text(self) -> str:
        files = [self.script] if self.script is not None else list(self.sources)
        return "\n".join(f.read_text(errors="replace") for f in files if f.is_file())

    def platform(self) -> tuple[str, dict[str, Any]]:
        if self.name in LARGE:
            return LARGE[self.name]
        return platform_for(self.text()) if self.script is not None else platform_for_c(self.text())


def _meson_call(text: str, start: int) -> str:
    """The text of a meson call from `start` (at its opening parenthesis) to its close."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i + 1]
    return text[start:]


def _statement(text: str, start: int) -> str:
    """A meson statement from `start` to the end of its line, brackets spanning lines included."""
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(ch, 0)
        if ch == "\n" and depth <= 0:
            return text[start:i]
    return text[start:]


def _c_sources(text: str, call: str, test_dir: Path) -> tuple[Path, ...]:
    """The .c files of an executable() call, those of the *_src lists it names included."""
    names = re.findall(r"'([\w.-]+\.c)'", call)
    for var in re.findall(r"\b(\w+_src)\b", call):
        for m in re.finditer(rf"^\s*{var}\s*\+?=", text, re.M):
            names += re.findall(r"'([\w.-]+\.c)'", _statement(text, m.end()))
    return tuple(test_dir / n for n in dict.fromkeys(names) if (test_dir / n).is_file())


def suite_tests(test_dir: Path) -> list[SuiteTest]:
    """The suite as meson.build declares it (its `tests` list, the destructive and keyutils
    additions included), in its order; without such a list (an older tree, a folder laid out
    by hand), every *.sh, those meson.build finds first."""
    scripts = {p.name: p for p in sorted(test_dir.glob("*.sh"))}
    meson = test_dir / "meson.build"
    text = meson.read_text() if meson.exists() else ""
    entries = re.findall(r"\[\s*'([^']+)'\s*,\s*(\w+)\s*,\s*'\w+'\s*\]", text)
    if not entries:
        order = [n for n in re.findall(r"find_program\('([^']+\.sh)'\)", text) if n in scripts]
        return [SuiteTest(n, scripts[n]) for n in order + [n for n in scripts if n not in order]]
    programs: dict[str, SuiteTest] = {}
    for m in re.finditer(r"^\s*(\w+)\s*=\s*find_program\('([^']+)'\)", text, re.M):
        programs[m.group(1)] = SuiteTest("", test_dir / m.group(2))
    for m in re.finditer(r"^\s*(\w+)\s*=\s*executable\(\s*'([^']+)'", text, re.M):
        call = _meson_call(text, m.end() - len(m.group(2)) - 3)
        programs[m.group(1)] = SuiteTest("", None, m.group(2), _c_sources(text, call, test_dir))
    tests = []
    for name, var in entries:
        prog = programs.get(var)
        if prog is not None:
            tests.append(SuiteTest(name, prog.script, prog.executable, prog.sources))
    return tests


def discover(test_dir: Path, wanted: list[str]) -> list[SuiteTest]:
    """The suite's tests, or those of them named in `wanted` (with or without .sh)."""
    tests = suite_tests(test_dir)
    if not wanted:
        return tests
    def known(w: str) -> bool:
        return any(w in (t.name, t.name.removesuffix(".sh"), t.executable) for t in tests)
    unknown = [w for w in wanted if not known(w)]
    if unknown:
        raise SystemExit(f"vnvdimm.suite: no such test in {test_dir}: {', '.join(unknown)}")
    return [t for t in tests if {t.name, t.name.removesuffix(".sh"), t.executable} & set(wanted)]


def missing_tools(text: str, path: str) -> list[str]:
    """The tools the test runs (check_prereq "X", or a command at the start of a line or pipe)
    that are not on the PATH."""
    needed = set(re.findall(r"check_prereq\s+\"?([\w.-]+)", text))
    needed |= {t for t in TOOLS if re.search(rf"(^|[|;&(]|\$\()\s*{re.escape(t)}\b", text, re.M)}
    return sorted(t for t in needed if shutil.which(t, path=path) is None)


def _sourced_scripts(test: SuiteTest) -> list[str]:
    """The text of the test folder's other scripts a shell test runs or sources by name
    (nfit-security.sh is `security.sh nfit`)."""
    if test.script is None:
        return []
    parts = []
    for name in set(re.findall(r"\b([\w.-]+\.sh)\b", test.text())) - {test.script.name}:
        path = test.script.parent / name
        if path.is_file():
            parts.append(path.read_text(errors="replace"))
    return parts


def run_one(test: SuiteTest, timeout: float, env: dict[str, str]) -> Result:
    name, topology = test.platform()
    started = time.monotonic()
    if test.script is not None:
        # as meson runs them: by their own #! line (some trace with bash -x)
        cmd = [str(test.script)] if os.access(test.script, os.X_OK) else ["bash", str(test.script)]
        missing = missing_tools(test.text(), env.get("PATH", ""))
    else:
        assert test.executable is not None
        program = Path(env.get("TEST_PATH", "")) / test.executable
        if "TEST_PATH" not in env or not os.access(program, os.X_OK):
            return Result(test.name, "MISSING", 0.0, None, name,
                          f"{test.executable}: not built (give --test-path BUILD/test or --build DIR)")
        cmd = [str(program)]
        missing = []
    if missing:
        return Result(test.name, "MISSING", 0.0, None, name, f"needs {', '.join(missing)} (not on the PATH)")
    if "keyctl" in test.text() or any("keyctl" in part for part in _sourced_scripts(test)):
        why = keyring.keyctl_available()
        if why is not None:  # a container's seccomp profile, typically: no kernel keyring at all
            return Result(test.name, "SKIP", 0.0, None, name, f"skipped: {why}; the test needs the kernel keyring")
    try:
        with Testbed(topology) as tb:
            # ndctl's tests find `common` and their data next to themselves; they write nothing
            # there. Their working directory is a scratch dir of the test bed, and so is HOME.
            assert tb.dir is not None
            run_env = {**env, "HOME": str(tb.dir)}
            argv = [str(WITH_VNVDIMM), str(tb.root), "--", *cmd]
            keys_before = user_keys()  # any test may add keys (nfit-security.sh does, through security.sh)
            try:
                proc = subprocess.run(contained(argv, tb.dir), cwd=tb.dir, env=run_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
            finally:
                forget_new_keys(keys_before)
            code: int | None = proc.returncode
            output = proc.stdout
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return Result(test.name, "TIMEOUT", time.monotonic() - started, None, name, out[-2000:])
    except TestbedError as e:
        return Result(test.name, "ERROR", time.monotonic() - started, None, name, str(e))
    status = "PASS" if code == 0 else "SKIP" if code == SKIP_STATUS else "FAIL"
    if status == "SKIP" and re.search(r": failed at line \d+", output):
        # err() exits with $rc, still 77 before a test's setup is done: a failure, not a skip
        status = "SETUP-FAIL"
    return Result(test.name, status, time.monotonic() - started, code, name, output[-4000:])


def _keyctl(*args: str) -> str:
    if shutil.which("keyctl") is None:
        return ""
    return subprocess.run(["keyctl", *args], capture_output=True, text=True).stdout


def user_keys() -> set[str]:
    """The ids of the keys in the caller's user keyring (@u)."""
    return set(_keyctl("rlist", "@u").split())


def forget_new_keys(before: set[str]) -> None:
    """Unlink from @u the nvdimm keys a test added there (a user namespace would not keep them
    out: root's user keyring is found by its uid, which such a namespace maps to itself). Only
    keys named as security.sh names them (nvdimm-master, nvdimm:<id>) and new since `before`."""
    for key in user_keys() - before:
        description = _keyctl("rdescribe", key).strip().split(";")[-1]
        if description == "nvdimm-master" or description.startswith("nvdimm:"):
            _keyctl("unlink", key, "@u")


# Inside the test's own mount namespace: /etc is an overlay whose writes land in the test
# bed's scratch dir (security.sh keeps key blobs in /etc/ndctl/keys), then the test runs.
_CONTAIN = """set -e
mkdir -p "$1/etc-upper" "$1/etc-work"
mount -t overlay vnvdimm-etc -o "lowerdir=/etc,upperdir=$1/etc-upper,workdir=$1/etc-work" /etc
shift
exec "$@"
"""


def contained(argv: list[str], scratch: Path) -> list[str]:
    """argv in its own mount namespace where /etc is copied on write: nothing a test writes
    there (security.sh's key blobs in /etc/ndctl/keys) reaches the host's."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _CONTAIN, "vnvdimm-suite", str(scratch),
            *argv]


def build_helpers(source: Path, build: Path) -> Path:
    """ndctl's tests and helpers built from its source tree with meson into `build`; returns
    the build's test/ folder. Configured as ndctl's suite needs (tests, destructive ones,
    keyutils), documentation off."""
    if not (build / "build.ninja").exists():
        subprocess.run(["meson", "setup", str(build), str(source), "-Dtest=enabled", "-Ddestructive=enabled",
                        "-Ddocs=disabled", "-Dasciidoctor=disabled", "-Dsystemd=disabled", "-Dkeyutils=enabled"],
                       check=True)
    subprocess.run(["ninja", "-C", str(build)], check=True)
    return build / "test"


def table(results: list[Result]) -> str:
    width = max([len(r.test) for r in results] + [4])
    lines = [f"{'test':<{width}}  {'result':<10}  {'platform':<9}  {'seconds':>7}"]
    lines += [f"{r.test:<{width}}  {r.status:<10}  {r.platform:<9}  {r.seconds:7.1f}" for r in results]
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    lines.append(", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n) + f" of {len(results)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vnvdimm.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("test_dir", type=Path, help="the test/ folder of an ndctl source tree")
    p.add_argument("tests", nargs="*", help="run only these (file names, with or without .sh)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per test (default 300)")
    p.add_argument("--json", type=Path, help="also write the results (with each output's tail) here")
    p.add_argument("--test-path", type=Path,
                   help="where ndctl's built test helpers are (TEST_PATH; default: the environment's)")
    p.add_argument("--build", type=Path, metavar="DIR",
                   help="build ndctl's tests and helpers from the source tree with meson into DIR (reused when "
                        "configured already) and take them from there")
    p.add_argument("-v", "--verbose", action="store_true", help="print the output tail of tests that fail")
    args = p.parse_args(argv)
    if not (args.test_dir / "common").is_file():
        p.error(f"{args.test_dir}: not an ndctl test folder (no 'common')")
    env = dict(os.environ)
    for var, tool in (("NDCTL", "ndctl"), ("DAXCTL", "daxctl")):
        if var not in env:
            found = shutil.which(tool)
            if found is None:
                p.error(f"{tool} not found on the PATH (or set {var})")
            env[var] = found
    env.setdefault("CXL", shutil.which("cxl") or "/bin/false")
    if args.test_path is not None and args.build is not None:
        p.error("give --test-path or --build, not both")
    if args.build is not None:
        for tool in ("meson", "ninja"):
            if shutil.which(tool) is None:
                p.error(f"--build needs {tool} (see docs/tools.md for the packages)")
        if not (args.test_dir.parent / "meson.build").is_file():
            p.error(f"{args.test_dir.parent}: not an ndctl source tree (no meson.build)")
        try:
            args.test_path = build_helpers(args.test_dir.parent.resolve(), args.build.resolve())
        except subprocess.CalledProcessError as e:
            p.error(f"building ndctl's tests failed: {e}")
    if args.test_path is not None:
        if not args.test_path.is_dir():
            p.error(f"{args.test_path}: not a directory")
        env["TEST_PATH"] = str(args.test_path.resolve())
    env = with_preload(env)
    results = []
    for test in discover(args.test_dir, args.tests):
        result = run_one(test, args.timeout, env)
        results.append(result)
        print(f"{result.test}: {result.status} ({result.seconds:.1f} s)", file=sys.stderr, flush=True)
        if args.verbose and result.status not in ("PASS", "SKIP"):
            print(result.tail, file=sys.stderr)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    return 0 if all(r.status in ("PASS", "SKIP") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
