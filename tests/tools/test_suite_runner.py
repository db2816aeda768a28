"""python -m vnvdimm.suite on a small folder laid out like ndctl's test/: one fresh platform per
test (chosen from the buses the script names), ndctl's exit-code conventions, the results table,
and the modprobe shim answering the scripts' `modprobe nfit_test`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
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


MESON_SUITE = """
libfoo = executable('lib-foo', testcore + [ 'lib_foo.c' ],
  dependencies : libndctl_deps,
)
daxy_src = testcore + [ 'daxy.c' ]
daxy = executable('daxy', daxy_src)
first = find_program('first.sh')
helper = find_program('helper.sh')
needs_tool = find_program('needs-tool.sh')

tests = [
  [ 'lib-foo',        libfoo,     'ndctl' ],
  [ 'first.sh',       first,      'ndctl' ],
  [ 'needs-tool.sh',  needs_tool, 'ndctl' ],
]
if get_option('destructive').enabled()
  tests += [
    [ 'daxy',         daxy,       'dax'   ],
  ]
endif
"""


@pytest.fixture
def meson_dir(tmp_path: Path) -> tuple[Path, Path]:
    """A test folder whose meson.build lists two C tests and two shell tests, with a helper
    script beside them that is not a test, and a build folder with the C tests built (as
    scripts standing in for the executables)."""
    folder = tmp_path / "test"
    folder.mkdir()
    (folder / "common").write_text('NFIT_TEST_BUS0="nfit_test.0"\n')
    (folder / "meson.build").write_text(MESON_SUITE)
    (folder / "lib_foo.c").write_text('/* uses "nfit_test.0" */\n')
    (folder / "daxy.c").write_text('/* its victim is on the "e820" bus */\n')
    scripts = {"first.sh": "test -d /sys/devices/platform/nfit_test.1 && test \"$HOME\" = \"$PWD\"\n",
               "helper.sh": "exit 1\n",
               "needs-tool.sh": "check_prereq \"no-such-tool-xyz\"\nno-such-tool-xyz --go\n"}
    for name, body in scripts.items():
        (folder / name).write_text("#!/bin/bash\n. $(dirname $0)/common\n" + body)
        (folder / name).chmod(0o755)
    build = tmp_path / "build-test"
    build.mkdir()
    # the C tests, as the platform shows to them: lib-foo sees nfit_test's buses, daxy e820's
    (build / "lib-foo").write_text("#!/bin/sh\ncat /sys/bus/nd/devices/ndbus1/provider\n")
    (build / "daxy").write_text("#!/bin/sh\ntest \"$(cat /sys/bus/nd/devices/ndbus0/provider)\" = e820\n")
    for exe in ("lib-foo", "daxy"):
        (build / exe).chmod(0o755)
    return folder, build


def test_the_suite_is_meson_builds_list_c_tests_included(meson_dir: tuple[Path, Path], tmp_path: Path) -> None:
    folder, build = meson_dir
    out = tmp_path / "results.json"
    assert suite.main([str(folder), "--test-path", str(build), "--json", str(out)]) == 1
    results = {r["test"]: r for r in json.loads(out.read_text())}
    # meson.build's order, the destructive additions included; helper.sh is not a test
    assert list(results) == ["lib-foo", "first.sh", "needs-tool.sh", "daxy"]
    assert {t: (r["status"], r["platform"]) for t, r in results.items()} == {
        "lib-foo": ("PASS", "nfit_test"), "first.sh": ("PASS", "nfit_test"),
        "needs-tool.sh": ("MISSING", "nfit_test"), "daxy": ("PASS", "e820")}
    assert "nfit_test.1" in results["lib-foo"]["tail"]
    assert "no-such-tool-xyz" in results["needs-tool.sh"]["tail"]


def test_c_tests_without_a_build_are_missing_and_named(meson_dir: tuple[Path, Path], tmp_path: Path) -> None:
    folder, _ = meson_dir
    out = tmp_path / "results.json"
    assert suite.main([str(folder), "lib-foo", "daxy", "--json", str(out)]) == 1
    assert [(r["test"], r["status"]) for r in json.loads(out.read_text())] == [("lib-foo", "MISSING"),
                                                                               ("daxy", "MISSING")]
    with pytest.raises(SystemExit):
        suite.main([str(folder), "helper.sh"])  # not in the suite
    with pytest.raises(SystemExit):
        suite.main([str(folder), "--build", str(tmp_path / "b")])  # the folder's parent is no ndctl tree


NDCTL_LIKE_MESON = """
pmem_ns = executable('pmem-ns', testcore + [ 'pmem_namespaces.c' ],
  dependencies : libndctl_deps,
)
device_dax_src = testcore + namespace_core + [
  'device-dax.c',
  'dax-dev.c',
]
if poison_enabled
  device_dax_src += 'dax-poison.c'
endif
device_dax = executable('device-dax', device_dax_src,
  dependencies : ndctl_deps,
)
max_extent = find_program('max_available_extent_ns.sh')
device_dax_fio = find_program('device-dax-fio.sh')
tests = [
  [ 'pmem-ns',           pmem_ns,        'ndctl' ],
  [ 'max_extent_ns',     max_extent,     'ndctl' ],
  [ 'device-dax',        device_dax,     'dax'   ],
  [ 'device-dax-fio.sh', device_dax_fio, 'dax'   ],
]
"""


def test_platforms_chosen_from_c_sources_and_sized_per_test(tmp_path: Path) -> None:
    """As in ndctl's tree: pmem-ns prefers an ACPI.NFIT bus (it names nfit_test only as a
    fallback), device-dax's sources (a multi-line *_src list) include dax-dev.c, whose victim
    is on e820; a test's name may differ from its script's; device-dax-fio gets 4 GiB."""
    folder = tmp_path / "test"
    folder.mkdir()
    (folder / "meson.build").write_text(NDCTL_LIKE_MESON)
    (folder / "pmem_namespaces.c").write_text('"ACPI.NFIT" ... "nfit_test.0"\n')
    (folder / "device-dax.c").write_text("/* nothing about buses */\n")
    (folder / "dax-dev.c").write_text('ndctl_bus_get_by_provider(ctx, "e820");\n')
    (folder / "dax-poison.c").write_text("\n")
    for script in ("max_available_extent_ns.sh", "device-dax-fio.sh"):
        (folder / script).write_text("$NDCTL create-namespace -b $NFIT_TEST_BUS0\n")
    tests = {t.name: t for t in suite.suite_tests(folder)}
    assert list(tests) == ["pmem-ns", "max_extent_ns", "device-dax", "device-dax-fio.sh"]
    assert tests["max_extent_ns"].script == folder / "max_available_extent_ns.sh"
    assert [p.name for p in tests["device-dax"].sources] == ["device-dax.c", "dax-dev.c", "dax-poison.c"]
    assert {name: t.platform()[0] for name, t in tests.items()} == {
        "pmem-ns": "ACPI.NFIT", "max_extent_ns": "nfit_test", "device-dax": "e820", "device-dax-fio.sh": "e820"}
    assert tests["device-dax-fio.sh"].platform()[1]["region"][0]["size"] == "4G"


@pytest.mark.skipif(shutil.which("keyctl") is None, reason="needs keyctl")
def test_a_test_leaves_no_key_and_nothing_in_etc(tmp_path: Path) -> None:
    """As security.sh does: a master key in root's user keyring and a blob in /etc/ndctl/keys.
    After the run the host has neither; inside, the test saw both."""
    folder = tmp_path / "test"
    folder.mkdir()
    (folder / "common").write_text("")
    marker = f"vnvdimm-suite-{os.getpid()}"
    (folder / "keys.sh").write_text(
        "#!/bin/bash\nset -e\nkeyctl new_session >/dev/null\nkeyctl link @u @s\n"
        "echo secret | keyctl padd user nvdimm-master @u >/dev/null\n"
        f"mkdir -p /etc/{marker} && echo blob > /etc/{marker}/nvdimm-master.blob\n"
        f"keyctl search @u user nvdimm-master >/dev/null && cat /etc/{marker}/nvdimm-master.blob\n")
    (folder / "keys.sh").chmod(0o755)
    before = subprocess.run(["keyctl", "rlist", "@u"], capture_output=True, text=True).stdout.split()
    out = tmp_path / "results.json"
    assert suite.main([str(folder), "--json", str(out)]) == 0
    assert "blob" in json.loads(out.read_text())[0]["tail"]
    after = subprocess.run(["keyctl", "rlist", "@u"], capture_output=True, text=True).stdout.split()
    assert after == before
    assert not Path("/etc", marker).exists()
