"""Malformed config files and state dirs: a clear error (one line naming the file, no
traceback, nothing mounted, no daemon left) or a namespace that comes back raw, and never a
crash or a silent change of the data on the media (compared byte for byte before/after)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import struct
import sys
import tomllib
from pathlib import Path

import pytest
import sysfs_invariants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_kit import Machine
from topologies import nfit

from vnvdimm.model.infoblock import DAX_SIG, INFO_BLOCK_OFFSET, PFN_SIG, PfnGeometry, PfnInfo, sb_checksum
from vnvdimm.model.personality import Pfn
from vnvdimm.mounts import vnvdimm_processes
from vnvdimm.sysfs.tree import Tree
from vnvdimm.topology.boot import boot
from vnvdimm.topology.config import ConfigError, load_config, parse_config
from vnvdimm.topology.provision import provision
from vnvdimm.topology.record import Platform
from vnvdimm.topology.statedir import StateDir

VNVDIMM = [sys.executable, "-m", "vnvdimm.cli"]
PLATFORM = """\
template = "e820"
[memmap]
workers = 2
[[region]]
size = "64M"
namespace = { mode = "fsdax", map = "dev", align = "2M" }
[[region]]
size = "64M"
namespace = { mode = "devdax", map = "mem", align = "2M" }
[[region]]
size = "32M"
namespace = { mode = "sector", sector_size = 4096 }
[[region]]
size = "32M"
namespace = { mode = "raw" }
"""
ALTMAP = (8192, 2 << 20)  # region0: where the map=dev memmap of its pfn lives (written at enable)


def fill(path: Path, seed: int) -> None:
    """Recognizable data everywhere but the first 8 KiB (the info block area)."""
    rng = random.Random(seed)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(8192)
        for _ in range(8192, size, 1 << 20):
            f.write(rng.randbytes(min(1 << 20, size - f.tell())))


def digest(path: Path, skip: tuple[int, int] | None = None) -> str:
    data = bytearray(path.read_bytes())
    if skip is not None:
        data[skip[0]: skip[1]] = bytes(skip[1] - skip[0])
    return hashlib.sha256(data).hexdigest()


def digests(state: Path) -> dict[str, str]:
    """Every media file; region0's memmap area is left out (an enabled map=dev pfn writes it)."""
    return {p.name: digest(p, ALTMAP if p.name == "region0.media" else None) for p in sorted(state.glob("*.media"))}


@pytest.fixture
def state(make_mount):  # type: ignore[no-untyped-def]
    """A provisioned state dir whose media carry data; the Mount is returned unmounted."""
    m = make_mount(PLATFORM)
    m.umount()
    for i, media in enumerate(sorted(m.state_dir.glob("region*.media"))):
        if i != 2:  # region2's BTT keeps its map and log in the media: leave it as formatted
            fill(media, i)
    return m


def mount_ok(m) -> None:  # type: ignore[no-untyped-def]
    res = m.mount()
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr


def clear_error(m, res, *words: str) -> None:  # type: ignore[no-untyped-def]
    """A refused mount: exit status 1 or 2, one message naming what is wrong, no traceback,
    nothing mounted, no daemon."""
    assert res.returncode in (1, 2), (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and res.stderr.startswith("vnvdimm: "), res.stderr
    for word in words:
        assert word in res.stderr, (word, res.stderr)
    assert not m.is_mounted()
    lock = m.state_dir / "lock"
    if lock.exists() and lock.read_text().strip():
        pid = int(lock.read_text().split()[0])
        # The lock keeps the pid of this state dir's last daemon, long gone: on a busy machine
        # the kernel may have handed that pid to an unrelated process since.
        assert pid not in vnvdimm_processes(m.root), "a daemon stayed behind"  # (its title names MNT)


def log_clean(m) -> None:  # type: ignore[no-untyped-def]
    log = (m.state_dir / "vnvdimm.log").read_text()
    assert "Traceback" not in log and "Uncaught exception" not in log, log[-3000:]


def raw_namespace(m, ns: str = "namespace0.0") -> None:  # type: ignore[no-untyped-def]
    base = f"sys/bus/nd/devices/{ns}"
    assert m.read(f"{base}/holder") == "\n", m.read(f"{base}/holder")
    assert m.read(f"{base}/mode") in ("raw\n", "memory\n")
    assert os.path.islink(m.path(f"{base}/driver")), f"{ns} not enabled as a raw namespace"


def invariants(m) -> None:  # type: ignore[no-untyped-def]
    problems = sysfs_invariants.check(sysfs_invariants.MountView(m.root), lambda i: m.state_dir / f"region{i}.media")
    assert not problems, problems


# ---------------------------------------------------------------- info blocks


def info_block(m, region: int = 0) -> bytes:  # type: ignore[no-untyped-def]
    with open(m.state_dir / f"region{region}.media", "rb") as f:
        f.seek(INFO_BLOCK_OFFSET)
        return f.read(4096)


def put_info_block(m, block: bytes, region: int = 0) -> None:  # type: ignore[no-untyped-def]
    with open(m.state_dir / f"region{region}.media", "r+b") as f:
        f.seek(INFO_BLOCK_OFFSET)
        f.write(block)


def forged(original: bytes, **fields: int) -> bytes:
    """The pfn info block with some fields replaced and a valid checksum."""
    info = PfnInfo.unpack(original, PFN_SIG)
    assert info is not None
    head = bytearray(original)
    offsets = {"dataoff": 56, "npfns": 64, "mode": 72, "start_pad": 76, "end_trunc": 80, "align": 84,
               "version_major": 52, "version_minor": 54, "page_size": 88, "page_struct_size": 92}
    formats = {"dataoff": "<Q", "npfns": "<Q", "mode": "<I", "start_pad": "<I", "end_trunc": "<I",
               "align": "<I", "version_major": "<H", "version_minor": "<H", "page_size": "<I",
               "page_struct_size": "<H"}
    for name, value in fields.items():
        struct.pack_into(formats[name], head, offsets[name], value)
    head[-8:] = struct.pack("<Q", sb_checksum(bytes(head)))
    return bytes(head)


CORRUPTIONS = {
    "torn (second half zero)": lambda b: b[:2048] + bytes(2048),
    "first half zero": lambda b: bytes(2048) + b[2048:],
    "bad checksum": lambda b: b[:100] + bytes([b[100] ^ 0x40]) + b[101:],
    "all ones": lambda b: b"\xff" * 4096,
    "signature only": lambda b: PFN_SIG + bytes(4080),
    "dax signature on a pfn block": lambda b: DAX_SIG + b[16:],
}

FORGERIES = {
    "data offset 0": {"dataoff": 0},
    "data offset 4096": {"dataoff": 4096},
    "data offset over the memmap": {"dataoff": 8192},
    "data offset not page aligned": {"dataoff": (2 << 20) + 100},
    "data offset past the end": {"dataoff": 64 << 20},
    "data offset huge": {"dataoff": 1 << 62},
    "npfns huge": {"npfns": 1 << 40},
    "mode 0": {"mode": 0},
    "mode 7": {"mode": 7},
    "align 0": {"align": 0},
    "align 3": {"align": 3},
    "align 1 << 31": {"align": 1 << 31},
    "end_trunc huge": {"end_trunc": 0xFFFFFFFF},
    "start_pad huge": {"start_pad": 0xFFFFFFFF},
    "version 2.0": {"version_major": 2},
    "version 1.0": {"version_minor": 0},
    "page size 64K": {"page_size": 65536},
    "page struct size 128": {"page_struct_size": 128},
}

# Forgeries whose outcome nd_pfn_validate() decides exactly (the others only have to be safe):
# a map=dev block written for larger pages is refused; larger struct pages fit the room.
REFUSED_FORGERIES = {"page size 64K"}
ENABLED_FORGERIES = {"page struct size 128"}


# ---------------------------------------------------------------- on the model (every case)


def problems(machine: Machine) -> list[str]:
    return sysfs_invariants.check(sysfs_invariants.TreeView(Tree(machine.sys)), machine.state.media_path)


def pfn_enabled(machine: Machine) -> PfnGeometry | None:
    for p in machine.sys.buses[0].regions[0].personalities:
        if p.driver is not None and isinstance(p, Pfn):
            return p.geometry
    return None


def booted(state_dir: Path) -> Machine:
    """The state dir booted without a mount and without a memmap engine: nothing but the
    probe itself can touch the media."""
    machine = Machine(state_dir)
    machine.boot()
    return machine


def test_every_damaged_or_forged_info_block_on_the_model(state, figures) -> None:  # type: ignore[no-untyped-def]
    m = state
    media = m.state_dir / "region0.media"
    original = media.read_bytes()
    good = info_block(m)
    cases = {**{n: f(good) for n, f in CORRUPTIONS.items()},
             **{n: forged(good, **fields) for n, fields in FORGERIES.items()}}
    npages = (64 << 20) // 4096
    for name, block in cases.items():
        put_info_block(m, block)
        before = media.read_bytes()
        machine = booted(m.state_dir)
        try:
            assert not problems(machine), (name, problems(machine))
            geometry = pfn_enabled(machine)
            ns = machine.system.buses[0].regions[0].namespaces[0]
            if name in REFUSED_FORGERIES:
                assert geometry is None and ns.probe_errno == errno.EOPNOTSUPP, (name, geometry, ns.probe_errno)
            if name in ENABLED_FORGERIES:
                assert geometry is not None, name
            if geometry is None:
                # not a usable block: the namespace is raw, or (nd_pmem_probe() on
                # nd_pfn_validate()'s EOPNOTSUPP: a block that is there but misplaced) not enabled
                assert ns.claim is None, f"{name}: namespace0.0 is claimed"
                assert ns.driver is not None or ns.probe_errno == errno.EOPNOTSUPP, f"{name}: {ns.probe_errno}"
            else:
                # Accepted: the data lies after the info block and the memmap, inside the namespace.
                assert geometry.dataoff % 4096 == 0 and geometry.dataoff >= 8192 + npages * 64, (name, geometry)
                assert geometry.dataoff + geometry.data_size <= ns.size, (name, geometry)
        finally:
            machine.shutdown()
        assert media.read_bytes() == before, f"{name}: the probe changed the media"
        figures.add(damaged_states=1, bytes_verified=len(before))
    media.write_bytes(original)


def test_damaged_btt_and_dax_info_blocks_on_the_model(state, figures) -> None:  # type: ignore[no-untyped-def]
    m = state
    for region, ns in ((1, 1), (2, 2)):
        good = info_block(m, region)
        for name, damage in CORRUPTIONS.items():
            put_info_block(m, damage(good), region)
            before = (m.state_dir / f"region{region}.media").read_bytes()
            machine = booted(m.state_dir)
            try:
                assert not problems(machine), (region, name, problems(machine))
                namespace = machine.system.buses[0].regions[region].namespaces[0]
                assert namespace.claim is None or namespace.claim.driver is not None, (region, name)
            finally:
                machine.shutdown()
            assert (m.state_dir / f"region{region}.media").read_bytes() == before
            figures.add(damaged_states=1)
        put_info_block(m, good, region)
        del ns


# ---------------------------------------------------------------- through the mount (samples)

MOUNT_CASES = {
    "torn (second half zero)": lambda b: CORRUPTIONS["torn (second half zero)"](b),
    "bad checksum": lambda b: CORRUPTIONS["bad checksum"](b),
    "data offset over the memmap": lambda b: forged(b, dataoff=8192),
    "data offset 0": lambda b: forged(b, dataoff=0),
}


REFUSED_CASES = {"data offset over the memmap"}


@pytest.mark.parametrize("name", sorted(MOUNT_CASES))
def test_damaged_info_block_through_the_mount(state, figures, name: str) -> None:  # type: ignore[no-untyped-def]
    """The namespace comes back raw (or disabled, where the kernel refuses it), the other
    devices come up (their memmaps run), and no byte of the media changes (the damaged block
    stays for a repair tool)."""
    m = state
    put_info_block(m, MOUNT_CASES[name](info_block(m)))
    region0 = m.state_dir / "region0.media"
    before = {p.name: p.read_bytes() for p in sorted(m.state_dir.glob("*.media"))}
    mount_ok(m)
    if name in REFUSED_CASES:
        # nd_pfn_validate(): a data offset off the pfn's alignment is EOPNOTSUPP, which
        # nd_pmem_probe() passes on: the namespace stays disabled (and unclaimed)
        assert m.read("sys/bus/nd/devices/namespace0.0/holder") == "\n"
        assert not os.path.islink(m.path("sys/bus/nd/devices/namespace0.0/driver"))
    else:
        raw_namespace(m)
    invariants(m)
    for dev in ("dax1.1", "btt2.1"):
        assert os.path.islink(m.path(f"sys/bus/nd/devices/{dev}/driver")), f"{dev} did not come up"
    assert m.write("sys/bus/nd/devices/dax1.1/memmap_state", b"sync") == 4
    m.umount()
    log_clean(m)
    after = {p.name: p.read_bytes() for p in sorted(m.state_dir.glob("*.media"))}
    assert after == before, [n for n in after if after[n] != before[n]]
    figures.add(damaged_states=1, bytes_verified=sum(len(b) for b in after.values()))
    del region0


# ---------------------------------------------------------------- media files


@pytest.mark.parametrize("damage", ["missing", "shorter", "longer"])
def test_missing_or_resized_media_is_a_clear_error(state, figures, damage: str) -> None:  # type: ignore[no-untyped-def]
    m = state
    media = m.state_dir / "region1.media"
    others = {n: d for n, d in digests(m.state_dir).items() if n != media.name}
    if damage == "missing":
        media.unlink()
    else:
        os.truncate(media, (32 << 20) if damage == "shorter" else (128 << 20))
    size = media.stat().st_size if media.exists() else None
    m.config = None  # no config: nothing to provision from
    res = m.mount()
    clear_error(m, res, "region1.media")
    # With the config, a missing media file is provisioned afresh (documented); a resized one
    # is still refused. Either way the other regions' media are untouched.
    m.config = m.state_dir.parent / "topology0.toml"
    res = m.mount()
    if damage == "missing":
        assert res.returncode == 0, res.stderr
        m.umount()
    else:
        clear_error(m, res, "region1.media")
        assert media.stat().st_size == size
    assert {n: d for n, d in digests(m.state_dir).items() if n != media.name} == others
    figures.add(damaged_states=1)


# ---------------------------------------------------------------- platform.json


PLATFORM_DAMAGE = {
    "random bytes": lambda t: bytes(random.Random(5).randbytes(300)),
    "truncated": lambda t: t[: len(t) // 2],
    "empty": lambda t: b"",
    "a list": lambda t: b"[1, 2, 3]",
    "string sizes": lambda t: t.replace(b'"size": 67108864', b'"size": "64M"'),
    "negative size": lambda t: t.replace(b'"size": 67108864', b'"size": -67108864'),
    "no regions": lambda t: json.dumps({**json.loads(t), "regions": []}).encode(),
    "unknown template": lambda t: t.replace(b'"e820"', b'"pmem9"'),
    "overlapping regions": lambda t: json.dumps(
        {**json.loads(t), "regions": [json.loads(t)["regions"][0]] * 2}).encode(),
}


@pytest.mark.parametrize("name", sorted(PLATFORM_DAMAGE))
def test_damaged_platform_record_is_a_clear_error(state, figures, name: str) -> None:  # type: ignore[no-untyped-def]
    m = state
    record = m.state_dir / "platform.json"
    record.write_bytes(PLATFORM_DAMAGE[name](record.read_bytes()))
    media = {p.name: digest(p) for p in m.state_dir.glob("*.media")}
    for config in (None, m.state_dir.parent / "topology0.toml"):
        m.config = config
        res = m.mount()
        clear_error(m, res)
        assert "platform" in res.stderr or "does not match" in res.stderr, res.stderr
    assert {p.name: digest(p) for p in m.state_dir.glob("*.media")} == media
    figures.add(damaged_states=1)


def platform_docs() -> st.SearchStrategy[object]:
    """JSON documents near a valid platform record: fields replaced by random JSON values,
    removed, or added."""
    valid = json.loads(Platform.from_config(parse_config(tomllib.loads(PLATFORM), "x")).to_json())
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                        st.text(max_size=8), st.sampled_from([0, 1, 16 << 20, 64 << 20, 1 << 40]))
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                                         max_size=3), max_leaves=6)

    def mutate(doc: dict, path: list[object], value: object, op: int) -> object:  # type: ignore[type-arg]
        out = json.loads(json.dumps(doc))
        node = out
        for key in path[:-1]:
            node = node[key]
        last = path[-1]
        if op == 0 or isinstance(node, list):
            node[last] = value
        elif op == 1:
            del node[last]
        else:
            node[f"{last}_extra"] = value
        return out

    paths = [["template"], ["regions"], ["dimms"], ["memmap"]]
    paths += [["memmap", k] for k in ("mode", "workers", "ns_per_page")]
    for i in range(4):
        paths += [["regions", i], *[["regions", i, k] for k in ("start", "size", "numa_node", "dimms", "set_cookie")]]
    return st.one_of(
        values,
        st.builds(mutate, st.just(valid), st.sampled_from(paths), values, st.integers(0, 2)),
    )


@settings(max_examples=300, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(doc=platform_docs())
def test_platform_record_fuzz(tmp_path_factory, figures, doc: object) -> None:  # type: ignore[no-untyped-def]
    """Whatever platform.json holds: the mount's preparation refuses it with a message naming
    the file, or the machine boots (media of the right size or a clear media error)."""
    from vnvdimm import daemon

    figures.add(fuzz_cases=1)
    base = tmp_path_factory.mktemp("platform")
    (base / "mnt").mkdir()
    state = base / "state"
    state.mkdir()
    (state / "platform.json").write_text(json.dumps(doc))
    opts = daemon.MountOptions(mountpoint=base / "mnt", state_dir=state, config=None)
    try:
        _, platform, lock = daemon.prepare(opts)
    except (daemon.MountError, ConfigError) as e:
        assert "platform.json" in str(e), e
        return
    os.close(lock.fd)
    for i, r in enumerate(platform.regions):
        with open(state / f"region{i}.media", "wb") as f:
            f.truncate(r.size)
    try:
        machine = boot(platform, StateDir(state))
    except ConfigError as e:
        assert "media" in str(e) or "labels" in str(e), e
        return
    with machine as system:
        assert not sysfs_invariants.check(sysfs_invariants.TreeView(Tree(system)), StateDir(state).media_path)


# ---------------------------------------------------------------- label files


NFIT_REGION = "0,1: 64M fsdax dev; 32M raw; 64M sector sector_size=4096"
NFIT = nfit("128M 128M", NFIT_REGION, workers=None)


@pytest.fixture(scope="module")
def nfit_state(tmp_path_factory):  # type: ignore[no-untyped-def]
    state = StateDir(tmp_path_factory.mktemp("nfit") / "state")
    platform, config = state.open(parse_config(tomllib.loads(NFIT), "nfit.toml"))
    assert config is not None
    provision(platform, state, config)
    return state


def label_area_damage(valid: bytes) -> st.SearchStrategy[bytes]:
    """A DIMM's label area as a crash, a bad disk or a hand edit could leave it: bytes flipped
    in the index blocks and the first labels, a prefix overwritten, the file cut or grown."""

    def flip(changes: list[tuple[int, int]]) -> bytes:
        out = bytearray(valid)
        for at, xor in changes:
            out[at] ^= xor
        return bytes(out)

    return st.one_of(
        st.lists(st.tuples(st.integers(0, 2047), st.integers(1, 255)), min_size=1, max_size=8).map(flip),
        st.binary(min_size=1, max_size=600).map(lambda head: head + valid[len(head):]),
        st.integers(0, len(valid) + 4096).map(lambda n: (valid + bytes(4096))[:n]),
    )


@settings(max_examples=300, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_label_area_fuzz(nfit_state, figures, data) -> None:  # type: ignore[no-untyped-def]
    """Whatever a DIMM's label area holds: a clear error naming it, or a machine whose
    namespaces are consistent; the probe never writes the media or the label areas."""
    figures.add(fuzz_cases=1)
    area = nfit_state.label_area_path(0)
    valid = area.read_bytes() if not hasattr(test_label_area_fuzz, "valid") else test_label_area_fuzz.valid
    test_label_area_fuzz.valid = valid  # type: ignore[attr-defined]
    damaged = data.draw(label_area_damage(valid))
    area.write_bytes(damaged)
    # (Any write to a media file moves its mtime: cheaper than hashing it for every example.)
    media = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in nfit_state.path.glob("*.media")}
    other = nfit_state.label_area_path(1).read_bytes()
    try:
        try:
            machine = boot(Platform.from_json(nfit_state.platform_path.read_text(), "x"), nfit_state)
        except ValueError as e:
            assert str(area) in str(e), e
            return
        with machine as system:
            problems = sysfs_invariants.check(sysfs_invariants.TreeView(Tree(system)), nfit_state.media_path)
            assert not problems, problems
        assert area.read_bytes() == damaged and nfit_state.label_area_path(1).read_bytes() == other
        assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in nfit_state.path.glob("*.media")} == media
    finally:
        area.write_bytes(valid)


# ---------------------------------------------------------------- config files


def config_texts() -> st.SearchStrategy[str]:
    keys = ["template", "memmap", "region", "dimm", "size", "mode", "map", "align", "namespace", "namespaces",
            "dimms", "workers", "ns_per_page", "numa_node", "sector_size", "name", "x"]
    values = st.one_of(st.sampled_from(['"e820"', '"nfit"', '"8G"', '"64M"', '"2M"', '"fsdax"', '"devdax"', '"raw"',
                                        '"sector"', '"dev"', '"mem"', "0", "-1", "1e3", "true", "[0, 1]", "[]",
                                        "{}", '"1T"', "18446744073709551616", '"x"', "{ mode = 1 }"]),
                       st.integers(-(2**64), 2**64).map(str))
    line = st.one_of(
        st.tuples(st.sampled_from(keys), values).map(lambda kv: f"{kv[0]} = {kv[1]}"),
        st.sampled_from(["[memmap]", "[[region]]", "[[dimm]]", "[region]", "[[region.namespaces]]"]),
        st.tuples(st.sampled_from(keys), st.sampled_from(keys), values).map(
            lambda t: f"{t[0]} = {{ {t[1]} = {t[2]} }}"),
    )
    return st.one_of(st.text(max_size=200), st.lists(line, max_size=14).map("\n".join),
                     st.lists(line, max_size=14).map(lambda ls: PLATFORM + "\n".join(ls)))


@settings(max_examples=500, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(text=config_texts())
def test_config_fuzz(tmp_path_factory, figures, text: str) -> None:  # type: ignore[no-untyped-def]
    """Any config text: a TopologyConfig, or a ConfigError naming the file; nothing else."""
    figures.add(fuzz_cases=1)
    path = tmp_path_factory.getbasetemp() / "fuzz.toml"
    path.write_text(text)
    try:
        cfg = load_config(path)
    except ConfigError as e:
        assert str(e).startswith(str(path)), e
        return
    Platform.from_config(cfg)  # what a mount makes of it next


@pytest.mark.parametrize("content", [
    b"\xff\xfe garbage", b"template = ", b"[[region]]\nsize = -1\n",
                                     b"template = \"e820\"\n[[region]]\nsize = \"7M\"\n", None, "directory"])
def test_bad_config_file_through_the_cli(make_mount, figures, content) -> None:  # type: ignore[no-untyped-def]
    m = make_mount(None, mount=False)
    config = m.root.parent / "bad.toml"
    if content == "directory":
        config.mkdir()
    elif content is not None:
        config.write_bytes(content)
    m.config = config
    res = m.mount()
    clear_error(m, res, str(config))
    assert not m.state_dir.exists() or not list(m.state_dir.glob("*.media"))
    figures.add(damaged_states=1)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b""])
def test_garbage_label_file_through_the_mount(make_mount, figures, content: bytes) -> None:  # type: ignore[no-untyped-def]
    m = make_mount(nfit("128M 128M", NFIT_REGION, workers=2))
    m.umount()
    media = {p.name: digest(p) for p in m.state_dir.glob("*.media")}
    label = m.state_dir / "labels" / "nmem0.json"
    label.write_bytes(content)
    m.config = None
    res = m.mount()
    clear_error(m, res, str(label))
    assert label.read_bytes() == content, "the damaged label area was rewritten"
    assert {p.name: digest(p) for p in m.state_dir.glob("*.media")} == media
    figures.add(damaged_states=1)
