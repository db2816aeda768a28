"""Run an ndctl source tree's own test scripts against vnvdimm, one fresh platform per test.

    python -m vnvdimm.suite NDCTL_SRC/test [TEST...] [--timeout S] [--json FILE] [-v]

ndctl's `test/` folder (any version; vnvdimm ships none of it) holds shell tests that expect
the buses of the kernel's nfit_test module (`nfit_test.0`, `nfit_test.1`), a few that use an
ACPI.NFIT or e820 bus, and C tests that must be built against libndctl first. Each shell test
runs here in its own mount (a platform chosen from the buses it names: nfit_test by default)
through `with-vnvdimm`, so `/sys` and `/dev` are the emulated ones and its `modprobe`,
`modinfo` and `journalctl` calls are answered by vnvdimm's shims. NDCTL and DAXCTL are the
tools found on the PATH unless set in the environment. Tests that run ndctl's C helpers
(`list-smart-dimm`, `smart-notify`, `daxdev-errors`, `dax-dev`...) find them in TEST_PATH
(`--test-path`: the `test/` folder of an ndctl build); without them those tests fail. The
result is a table: PASS (exit 0), SKIP (exit 77, ndctl's convention), SETUP-FAIL (exit 77 from
the err() trap: the test failed before its own setup was done), FAIL (anything else), TIMEOUT.
"""

from __future__ import annotations

import argparse
import contextlib
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
STATUSES = ("PASS", "SKIP", "SETUP-FAIL", "FAIL", "TIMEOUT", "ERROR")

NFIT_TEST: dict[str, Any] = {"template": "nfit_test", "memmap": {"workers": 1}}
# align.sh and sub-section.sh want an ACPI.NFIT bus with an empty, 1 GiB-aligned, labelled
# region large enough for two 1 GiB namespaces (the media is sparse), not interleaved (align.sh
# sets the region align to 4 KiB, which a 2-way set refuses).
ACPI_NFIT: dict[str, Any] = {
    "template": "nfit", "memmap": {"workers": 1},
    "dimm": [{"size": "8G"}],
    "region": [{"dimms": [0]}],
}
# daxctl-create.sh carves the capacity of a soft-reserved (dax_hmem) region; its align test
# wants a 1 GiB device beside the rest, so 2 GiB of it (RAM: an anonymous memory file).
HMEM: dict[str, Any] = {
    "template": "e820", "memmap": {"workers": 1},
    "region": [{"size": "32M", "namespace": {"mode": "raw"}}],
    "hmem": [{"size": "2G"}],
}
E820: dict[str, Any] = {
    "template": "e820", "memmap": {"workers": 1},
    "region": [{"size": "1G", "namespace": {"mode": "raw"}}],
}


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
    if re.search(r"NFIT_TEST_BUS|nfit_test", script_text):
        return "nfit_test", NFIT_TEST
    if re.search(r"ACPI_BUS|ACPI\.NFIT", script_text):
        return "ACPI.NFIT", ACPI_NFIT
    if re.search(r"E820_BUS|\be820\b", script_text):
        return "e820", E820
    return "nfit_test", NFIT_TEST


def discover(test_dir: Path, wanted: list[str]) -> list[Path]:
    """The shell tests of the folder, in meson.build's order when it has one."""
    scripts = {p.name: p for p in sorted(test_dir.glob("*.sh"))}
    order: list[str] = []
    meson = test_dir / "meson.build"
    if meson.exists():
        order = [name for name in re.findall(r"find_program\('([^']+\.sh)'\)", meson.read_text()) if name in scripts]
    names = order + [n for n in scripts if n not in order]
    if wanted:
        unknown = [w for w in wanted if w not in scripts and f"{w}.sh" not in scripts]
        if unknown:
            raise SystemExit(f"vnvdimm.suite: no such test in {test_dir}: {', '.join(unknown)}")
        names = [n for n in names if n in wanted or n.removesuffix(".sh") in wanted]
    return [scripts[n] for n in names]


# ndctl keeps key blobs in /etc/ndctl/keys (NDCTL_KEYS_DIR) and the security tests write
# there: inside the test's mount namespace the folder is a fresh tmpfs, so nothing a test
# writes or leaves behind reaches the host's.
KEYS_DIR_GUARD = (
    'd=/etc/ndctl/keys; if [ -d "$d" ]; then mount -t tmpfs -o mode=0755 vnvdimm-keys "$d" || exit 1; '
    'elif [ -d /etc/ndctl ]; then mount -t tmpfs -o mode=0755 vnvdimm-keys /etc/ndctl && mkdir "$d" || exit 1; '
    'else echo "vnvdimm.suite: no /etc/ndctl to hide the test\'s key blobs in" >&2; exit 1; fi; exec "$@"')


def _sourced_scripts(script: Path, text: str) -> list[str]:
    """The text of the test folder's other scripts this one runs or sources by name
    (nfit-security.sh is `security.sh nfit`)."""
    parts = []
    for name in set(re.findall(r"\b([\w.-]+\.sh)\b", text)) - {script.name}:
        path = script.parent / name
        if path.is_file():
            parts.append(path.read_text(errors="replace"))
    return parts


def run_one(script: Path, timeout: float, env: dict[str, str]) -> Result:
    text = script.read_text(errors="replace")
    name, topology = platform_for(text)
    started = time.monotonic()
    uses_keys = "keyctl" in text or any("keyctl" in part for part in _sourced_scripts(script, text))
    if uses_keys:
        why = keyring.keyctl_available()
        if why is not None:  # a container's seccomp profile, typically: no kernel keyring at all
            return Result(script.name, "SKIP", 0.0, None, name, f"skipped: {why}; the test needs the kernel keyring")
    before = keyring.user_keyring_links() if uses_keys else set()
    try:
        return _run(script, name, topology, timeout, env, uses_keys, started)
    finally:
        if uses_keys:
            # keys a failed test left in root's user keyring go (its own cleanup unlinks them)
            for serial in keyring.user_keyring_links() - before:
                with contextlib.suppress(OSError):
                    keyring.unlink_from_user_keyring(serial)


def _run(script: Path, name: str, topology: dict[str, Any], timeout: float, env: dict[str, str], uses_keys: bool,
         started: float) -> Result:
    try:
        with Testbed(topology) as tb:
            # ndctl's scripts find `common` and their data next to themselves; they write
            # nothing there. Their working directory is a scratch dir of the test bed.
            assert tb.dir is not None
            # as meson runs them: by their own #! line (some trace with bash -x)
            cmd = [str(script)] if os.access(script, os.X_OK) else ["bash", str(script)]
            if uses_keys:
                cmd = ["sh", "-c", KEYS_DIR_GUARD, "sh", *cmd]
            proc = subprocess.run([str(WITH_VNVDIMM), str(tb.root), "--", *cmd], cwd=tb.dir, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
            code: int | None = proc.returncode
            output = proc.stdout
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return Result(script.name, "TIMEOUT", time.monotonic() - started, None, name, out[-2000:])
    except TestbedError as e:
        return Result(script.name, "ERROR", time.monotonic() - started, None, name, str(e))
    status = "PASS" if code == 0 else "SKIP" if code == SKIP_STATUS else "FAIL"
    if status == "SKIP" and re.search(r": failed at line \d+", output):
        # err() exits with $rc, still 77 before a test's setup is done: a failure, not a skip
        status = "SETUP-FAIL"
    return Result(script.name, status, time.monotonic() - started, code, name, output[-4000:])


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
    if args.test_path is not None:
        if not args.test_path.is_dir():
            p.error(f"{args.test_path}: not a directory")
        env["TEST_PATH"] = str(args.test_path.resolve())
    env = with_preload(env)
    results = []
    for script in discover(args.test_dir, args.tests):
        result = run_one(script, args.timeout, env)
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
