"""The documentation stays true: the tutorial's commands run, the sysfs reference matches what
vnvdimm serves, the worked example is the test the project runs, and the README links them."""

from __future__ import annotations

import re
import subprocess
import sys

from tooltest import REPO, clean_env

DOCS = REPO / "docs"


def fenced_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", text, flags=re.S | re.M)


def test_tutorial_runs_as_written(tmp_path) -> None:
    """Every ```sh block of the tutorial, in order (```shell blocks are the ones a reader runs
    by hand: installing, the interactive --watch). /tmp/pmem and /tmp/pmem-tutorial are moved
    into this test's temp dir, and the mount is always undone."""
    text = (DOCS / "tutorial.md").read_text()
    blocks = fenced_blocks(text, "sh")
    # The install block: the apt line names what a fresh Debian needs (gcc and libc6-dev build
    # the preload library; python3-venv makes the venv), and the venv is made before pip runs.
    # Neither is run here (no reinstalling the machine): this test's vnvdimm is on the PATH.
    install = blocks.pop(0)
    apt, venv = install.strip().splitlines()
    assert apt.startswith("apt-get update && apt-get install -y ") and \
        {"fuse3", "ndctl", "daxctl", "gcc", "libc6-dev", "python3-venv"} <= set(apt.split())
    assert venv == "python3 -m venv .venv && . .venv/bin/activate && pip install -e ."
    # The platform shown is the example the tutorial copies, without its comments.
    (shown,) = fenced_blocks(text, "toml")
    example = (REPO / "examples" / "slow.toml").read_text()
    assert shown == "".join(line.split("  #")[0].rstrip() + "\n" for line in example.splitlines(keepends=True)
                            if not line.startswith("#")), "the tutorial shows examples/slow.toml as it is"
    script = "\n".join(blocks)
    mnt, work = tmp_path / "pmem", tmp_path / "pmem-tutorial"
    script = script.replace("/tmp/pmem-tutorial", str(work)).replace("/tmp/pmem", str(mnt))
    assert "vnvdimm umount" in script and "ndctl create-namespace" in script
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "vnvdimm").write_text(f"#!/bin/sh\nexec {sys.executable} -m vnvdimm.cli \"$@\"\n")
    (bindir / "vnvdimm").chmod(0o755)
    env = clean_env(PATH=f"{bindir}:{clean_env()['PATH']}", PYTHONPATH=str(REPO))
    try:
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, capture_output=True, text=True,
                             timeout=240, env=env)
    finally:
        subprocess.run([sys.executable, "-m", "vnvdimm.cli", "umount", str(mnt)], capture_output=True, timeout=60)
    assert res.returncode == 0, f"stdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}"
    out = res.stdout
    assert "namespace0.0  fsdax map=dev  2.0 GiB" in out
    assert "service started" in out
    assert "store refused: device pfn0.1, attribute memmap_state, value 'later'" in out
    assert "refused, as expected" in out and "EIO, as expected" in out
    assert '"badblock_count":1' in out and "8 1\n" in out
    assert not work.exists()


def test_sysfs_reference_is_current() -> None:
    res = subprocess.run([sys.executable, str(DOCS / "gen_sysfs_reference.py"), "--check"], capture_output=True,
                         text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr


def test_worked_example_is_the_test_the_project_runs() -> None:
    text = (DOCS / "testbed.md").read_text()
    example = REPO / "tests" / "tools" / "example"
    assert (example / "test_start_when_pmem_ready.py").read_text() in fenced_blocks(text, "python")
    assert (example / "start-when-pmem-ready").read_text() in fenced_blocks(text, "sh")


def test_readme_links_the_docs_and_keeps_its_quick_start() -> None:
    readme = (REPO / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    install_and_mount, run_tests = fenced_blocks(quick_start, "sh")[:2]
    # CI runs both, word for word (in a venv: PEP 668).
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    for command in (install_and_mount, run_tests):
        assert command.strip() in ci, command
    assert "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && " in install_and_mount
    assert "vnvdimm mount ~/pmem" in install_and_mount and "python -m pytest -q" in run_tests
    # The tutorial mounts elsewhere: following both does not collide.
    tutorial = (DOCS / "tutorial.md").read_text()
    assert "~/pmem" not in tutorial and "/tmp/pmem" not in readme
    for doc in ("tutorial.md", "tools.md", "testbed.md", "sysfs-reference.md", "config.md", "limits.md"):
        assert f"docs/{doc}" in readme, doc
        assert (DOCS / doc).exists(), doc
    for doc in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+\.md)\)", doc.read_text()):
            assert (DOCS / target).exists(), f"{doc.name} links to missing {target}"


def test_readme_memmap_example_reads_the_device_that_holds_the_memmap(mnt) -> None:
    """The README's "What you get" example, on a mount of this test: it reads memmap_state of
    the dax device that claimed the namespace (the one with a memmap), not the idle seed."""
    readme = (REPO / "README.md").read_text()
    (block,) = [b for b in fenced_blocks(readme, "sh") if "memmap_state" in b and "create-namespace" in b]
    script = block.replace("~/pmem", str(mnt.root)) + 'echo "$dax"\ncat ' + str(mnt.root) + \
        '/sys/bus/nd/devices/$dax/memmap_state\n'
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=clean_env())
    assert res.returncode == 0, res.stderr
    *_, first_state, dax, synced = res.stdout.splitlines()
    assert first_state in ("active", "idle") and synced == "idle"
    assert dax == mnt.read("sys/bus/nd/devices/namespace0.0/holder").strip()
    assert int(mnt.read(f"sys/bus/nd/devices/{dax}/memmap/pages_total")) > 0
