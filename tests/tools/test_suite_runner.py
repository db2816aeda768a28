"""python -m vnvdimm.suite on a small folder laid out like ndctl's test/: one fresh platform per
test (chosen from the buses the script names), ndctl's exit-code conventions, the results table,
and the modprobe shim answering the scripts' `modprobe nfit_test`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vnvdimm import suite

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and FUSE")

SCRIPTS = {
    # second.sh runs first (meson.build's order) and gives namespace0.0 a uuid; first.sh must
    # not see it: every test has a platform of its own
    "first.sh": "modprobe nfit_test\n[ -z \"$(cat /sys/bus/nd/devices/namespace0.0/uuid)\" ] || exit 1\n"
                "test -d /sys/devices/platform/nfit_test.1/ndbus1 && echo $NFIT_TEST_BUS0\n",
    "second.sh": "modprobe nfit_test\nuuidgen > /sys/bus/nd/devices/namespace0.0/uuid\n",
    "reload.sh": "modprobe -r nfit_test\ntest ! -e /sys/bus/nd/devices/ndbus0 && modprobe nfit_test\n"
                 "test -e /sys/bus/nd/devices/ndbus0\n",
    "skip.sh": "exit 77\n",
    "setup.sh": "rc=77\ntrap 'echo test/setup.sh: failed at line $LINENO; exit $rc' ERR\nfalse\n",
    "fail.sh": "rc=1\nexit 3\n",
    "acpi.sh": "test \"$(cat /sys/bus/nd/devices/ndbus0/provider)\" = ACPI.NFIT # needs $ACPI_BUS\n",
}


@pytest.fixture
def test_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "test"
    folder.mkdir()
    (folder / "common").write_text('NFIT_TEST_BUS0="nfit_test.0"\nACPI_BUS="ACPI.NFIT"\n')
    for name, body in SCRIPTS.items():
        path = folder / name
        # the shell tests source common, as ndctl's do
        path.write_text("#!/bin/bash\n. $(dirname $0)/common\n" + body)
        path.chmod(0o755)
    (folder / "meson.build").write_text("".join(f"x = find_program('{n}')\n" for n in ("second.sh", "first.sh")))
    return folder


def test_each_test_on_its_own_platform_and_the_table(test_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results.json"
    assert suite.main([str(test_dir), "--json", str(out), "--timeout", "120"]) == 1
    results = {r["test"]: r for r in json.loads(out.read_text())}
    assert list(results)[:2] == ["second.sh", "first.sh"]  # meson.build's order first
    assert {t: (r["status"], r["platform"]) for t, r in results.items()} == {
        "second.sh": ("PASS", "nfit_test"), "first.sh": ("PASS", "nfit_test"), "reload.sh": ("PASS", "nfit_test"),
        "skip.sh": ("SKIP", "nfit_test"),
        "setup.sh": ("SETUP-FAIL", "nfit_test"), "fail.sh": ("FAIL", "nfit_test"), "acpi.sh": ("PASS", "ACPI.NFIT")}
    assert "nfit_test.0" in results["first.sh"]["tail"]
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["test", "result", "platform", "seconds"]
    assert table.splitlines()[-1] == "4 pass, 1 skip, 1 setup-fail, 1 fail of 7"


def test_selection_and_errors(test_dir: Path, tmp_path: Path) -> None:
    assert suite.main([str(test_dir), "skip", "first.sh"]) == 0
    with pytest.raises(SystemExit, match="no such test"):
        suite.main([str(test_dir), "nope"])
    with pytest.raises(SystemExit):
        suite.main([str(tmp_path)])  # no common: not an ndctl test folder


def test_platform_for_the_dax_dev_helper_is_e820() -> None:
    # dax.sh, mmap.sh, device-dax-fio.sh...: their victim namespace is the one dax-dev finds on e820
    assert suite.platform_for("dev=$($TEST_PATH/dax-dev)\n")[0] == "e820"
    assert suite.platform_for("$NDCTL create-namespace -b $NFIT_TEST_BUS0\n")[0] == "nfit_test"


def test_test_path_reaches_the_scripts(tmp_path: Path) -> None:
    folder = tmp_path / "test"
    folder.mkdir()
    (folder / "common").write_text('NFIT_TEST_BUS0="nfit_test.0"\n')
    helpers = tmp_path / "build-test"
    helpers.mkdir()
    (helpers / "list-smart-dimm").write_text("#!/bin/sh\necho '[]'\n")
    (helpers / "list-smart-dimm").chmod(0o755)
    (folder / "helper.sh").write_text("#!/bin/bash\n. $(dirname $0)/common\nmodprobe nfit_test\n"
                                      "test \"$($TEST_PATH/list-smart-dimm -b $NFIT_TEST_BUS0)\" = '[]'\n")
    (folder / "helper.sh").chmod(0o755)
    out = tmp_path / "results.json"
    assert suite.main([str(folder), "--test-path", str(helpers), "--json", str(out)]) == 0
    assert [r["status"] for r in json.loads(out.read_text())] == ["PASS"]
    with pytest.raises(SystemExit):
        suite.main([str(folder), "--test-path", str(tmp_path / "missing")])
