"""`vnvdimm status` on a real mount: the tree (text, on a terminal, JSON) and --watch."""

from __future__ import annotations

import json
import re
import subprocess

from tooltest import REPO, VNVDIMM, PtyRun, clean_env, hold_memmap, holder, release_memmap, strip_ansi


def status(m, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VNVDIMM, "status", str(m.root), *args], capture_output=True, text=True, timeout=60,
                          env=clean_env())


def test_text_tree_without_a_terminal(mnt) -> None:
    res = status(mnt)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "\x1b[" not in out  # plain text into a pipe: no escape codes
    pfn, dax = holder(mnt, "namespace0.0"), holder(mnt, "namespace1.0")
    lines = out.splitlines()
    assert lines[0] == "ndbus0  provider e820"
    assert re.search(r"region0  256\.0 MiB", out)
    assert re.search(rf"namespace0\.0  fsdax map=dev  250\.0 MiB  {mnt.root}/dev/pmem0  \({pfn}\)", out)
    assert re.search(rf"namespace1\.0  devdax map=mem  254\.0 MiB  {mnt.root}/dev/dax1\.0  \({dax}\)", out)
    assert re.search(rf"memmap {pfn} idle  65534/65534 pages in", out)
    assert re.search(rf"memmap {dax} idle  65536/65536 pages in", out)
    # A tree: regions hang off the bus, namespaces off regions, memmaps off namespaces.
    assert any(line.startswith("├── region0") for line in lines)
    assert any(line.startswith("└── region1") for line in lines)


def test_a_relative_mount_point_gives_absolute_paths(mnt) -> None:
    """`vnvdimm status mnt0` from the mount's parent: the device files it names can be used
    from anywhere (as with --json and the devices of `wait`)."""
    res = subprocess.run([*VNVDIMM, "status", mnt.root.name], capture_output=True, text=True, timeout=60,
                         env=clean_env(), cwd=mnt.root.parent)
    assert res.returncode == 0, res.stderr
    assert f" {mnt.root}/dev/pmem0 " in res.stdout and f" {mnt.root}/dev/dax1.0 " in res.stdout, res.stdout
    res = subprocess.run([*VNVDIMM, "status", "--json", mnt.root.name], capture_output=True, text=True, timeout=60,
                         env=clean_env(), cwd=mnt.root.parent)
    assert f'"{mnt.root}/dev/pmem0"' in res.stdout, res.stdout


def test_json_agrees_with_ndctl(mnt) -> None:
    res = status(mnt, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    (bus,) = doc["buses"]
    assert (bus["dev"], bus["provider"]) == ("ndbus0", "e820")
    namespaces = {ns["dev"]: ns for region in bus["regions"] for ns in region["namespaces"]}
    ndctl = {ns["dev"]: ns for ns in mnt.ndctl("list", "-N")}
    assert set(namespaces) == set(ndctl) == {"namespace0.0", "namespace1.0"}
    for name, ns in namespaces.items():
        for key in ("mode", "map", "size", "blockdev", "chardev"):
            assert ns.get(key) == ndctl[name].get(key), (name, key)
        assert ns["enabled"] is True
        mm = ns["memmap"]
        assert mm["state"] == "idle" and mm["pages_done"] == mm["pages_total"] > 0
        assert mm["eta_s"] is None and mm["workers"] == 2
    assert namespaces["namespace0.0"]["path"] == f"{mnt.root}/dev/pmem0"
    assert namespaces["namespace1.0"]["path"] == f"{mnt.root}/dev/dax1.0"


def test_progress_bar_on_a_terminal(slow_mnt) -> None:
    pfn = holder(slow_mnt, "namespace0.0")
    hold_memmap(slow_mnt, pfn, 400)
    try:
        run = PtyRun([*VNVDIMM, "status", str(slow_mnt.root)])
        assert run.finish(60) == 0
    finally:
        release_memmap(slow_mnt, pfn)
    raw = run.output
    assert b"\x1b[" in raw  # colours on a terminal
    text = strip_ansi(raw)
    assert "━" in text  # rich's progress bar
    line = next(line for line in text.splitlines() if f"memmap {pfn} active" in line)
    m = re.search(r"(\d+\.\d)%\s+(\d+)/(\d+) pages\s+\S+ pages/s\s+ETA (\d+:\d\d|-:--)", line)
    assert m, line
    assert 40 <= float(m.group(1)) < 100 and int(m.group(3)) == 65534


def test_watch_redraws_in_place_until_interrupted(slow_mnt) -> None:
    pfn = holder(slow_mnt, "namespace0.0")
    hold_memmap(slow_mnt, pfn, 300)
    run = PtyRun([*VNVDIMM, "status", str(slow_mnt.root), "--watch"])
    try:
        run.read_until(f"memmap {pfn} active", 20)
        assert f"memmap {pfn} active" in strip_ansi(run.output)
        release_memmap(slow_mnt, pfn)
        run.read_until(f"memmap {pfn} idle", 30)
        run.read_for(0.6)
    finally:
        release_memmap(slow_mnt, pfn)
        run.interrupt()
    assert run.finish(20) == 0
    text = strip_ansi(run.output)
    assert f"memmap {pfn} idle" in text
    # Redrawn in place: rich moves the cursor up over the previous frame.
    assert run.output.count(b"\x1b[1A") > 10
    assert "(Ctrl-C to quit)" in text


def test_watch_json_lines_into_a_pipe(slow_mnt) -> None:
    """One JSON document per line, each a fresh snapshot: while the memmap is held its
    progress reads active and stands still at the mark; once released the lines follow it to
    idle, every page done; the last line is what `status --json` prints."""
    pfn = holder(slow_mnt, "namespace0.0")
    hold_memmap(slow_mnt, pfn, 300)

    def memmap_of(doc: dict) -> dict:  # type: ignore[type-arg]
        return doc["buses"][0]["regions"][0]["namespaces"][0]["memmap"]

    proc = subprocess.Popen([*VNVDIMM, "status", str(slow_mnt.root), "--watch", "--json", "--interval", "0.1"],
                            stdout=subprocess.PIPE, text=True, env=clean_env())
    assert proc.stdout is not None
    try:
        held = [json.loads(proc.stdout.readline()) for _ in range(3)]
        assert [d["buses"][0]["dev"] for d in held] == ["ndbus0"] * 3
        marks = [memmap_of(d) for d in held]
        assert all(mm["device"] == pfn and mm["state"] == "active" and mm["pause_at"] == 300 for mm in marks), marks
        assert all(300 * mm["pages_total"] <= 1000 * mm["pages_done"] < 1000 * mm["pages_total"] for mm in marks)
        assert len({mm["elapsed_us"] for mm in marks}) == 3, "the lines are not fresh snapshots"
        release_memmap(slow_mnt, pfn)
        seen = []
        for _ in range(600):  # 0.1 s apart: a minute at most
            mm = memmap_of(json.loads(proc.stdout.readline()))
            seen.append(mm["pages_done"])
            if mm["state"] == "idle":
                break
        assert mm["state"] == "idle" and mm["pages_done"] == mm["pages_total"], (mm, seen[-5:])
        assert seen == sorted(seen), "progress went backwards"
        last = json.loads(proc.stdout.readline())
    finally:
        release_memmap(slow_mnt, pfn)
        proc.terminate()
        proc.wait(10)
    once = json.loads(status(slow_mnt, "--json").stdout)
    # (elapsed and rate are frozen once idle; the other memmap may still be moving)
    assert memmap_of(last) == memmap_of(once)
    assert last["buses"][0]["regions"][0] == once["buses"][0]["regions"][0]


def test_not_a_mount(tmp_path) -> None:
    res = subprocess.run([*VNVDIMM, "status", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "not a vnvdimm mount" in res.stderr


def test_map_draws_each_regions_capacity(slow_mnt, make_mount) -> None:
    """--map: a bar per region over its address range (namespaces by mode, free extents as
    dots), the memmap's progress under the namespace it belongs to, a legend, the seeds."""
    pfn = holder(slow_mnt, "namespace0.0")
    hold_memmap(slow_mnt, pfn, 500)
    try:
        res = subprocess.run([*VNVDIMM, "status", "--map", str(slow_mnt.root)], capture_output=True, text=True,
                             timeout=60, env=clean_env())
    finally:
        release_memmap(slow_mnt, pfn)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "ndbus0  provider e820"
    r0 = lines.index(next(line for line in lines if line.startswith("region0  256.0 MiB  0x")))
    bar, progress, legend = lines[r0 + 1: r0 + 4]
    assert bar == "  |" + "█" * 75 + "   █ fsdax"  # a pipe: 80 columns less the indent; one fsdax namespace
    cells = progress[2:].split("   ")[0]
    assert set(cells) == {"━", "╌"} and cells.startswith("━") and cells.endswith("╌")
    assert 0.45 <= cells.count("━") / len(cells) <= 0.6, cells  # held at half (pause_at 500)
    assert re.fullmatch(rf"  █ namespace0\.0  fsdax map=dev  256\.0 MiB  at \+0x0  memmap {pfn} active \d+\.\d%",
                        legend), legend
    assert any(re.fullmatch(r"  seeds: namespace0\.0 pfn0\.\d dax0\.\d btt0\.0", line) for line in lines), lines
    # An nfit region with room left: the free extent after the namespace, as dots and in words.
    nfit = make_mount((REPO / "examples" / "nfit-errors.toml").read_text())
    res = subprocess.run([*VNVDIMM, "status", "--map", str(nfit.root)], capture_output=True, text=True, timeout=60,
                         env=clean_env())
    lines = res.stdout.splitlines()
    assert lines[2].startswith("  |" + "█" * 10) and "·" * 40 in lines[2], lines
    assert "  · free: 6.0 GiB at +0x80000000" in lines, lines
    res = subprocess.run([*VNVDIMM, "status", "--map", "--json", str(nfit.root)], capture_output=True, text=True,
                         timeout=60, env=clean_env())
    assert res.returncode == 2 and "--map" in res.stderr
