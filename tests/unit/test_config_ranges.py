"""One source for every range: what the config accepts makes a platform record that
Platform.validate() (the next mount's check) accepts, the limits refuse one step beyond, and
docs/config.md states the same numbers."""

from __future__ import annotations

import json
import re
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vnvdimm.model.namespace import Namespace
from vnvdimm.topology.boot import boot
from vnvdimm.topology.config import (
    MAX_DIMMS,
    MAX_NAMESPACES_PER_DIMM,
    MAX_NS_PER_PAGE,
    MAX_NUMA_NODE,
    MAX_REGION,
    MAX_WORKERS,
    ConfigError,
    format_size,
    parse_config,
)
from vnvdimm.topology.provision import provision
from vnvdimm.topology.record import InvalidPlatform, Platform
from vnvdimm.topology.statedir import StateDir

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"
G16M = 16 << 20


def platform_of(text: str) -> Platform:
    platform = Platform.from_config(parse_config(tomllib.loads(text), "t.toml"))
    platform.validate()
    return platform


def refused(text: str, key: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(tomllib.loads(text), "t.toml")
    assert str(e.value).startswith(f"t.toml: {key}: "), str(e.value)
    return str(e.value)


def e820(*sizes: int, memmap: str = "", numa: int = 0) -> str:
    regions = "".join(f'[[region]]\nsize = {s}\nnuma_node = {numa}\n' for s in sizes)
    return f"[memmap]\n{memmap}\n{regions}"


def test_the_worker_limit_is_the_engines() -> None:
    from vnvdimm.memmap import engine

    assert MAX_WORKERS == engine.MAX_WORKERS
    engine.MemmapEngine(workers=MAX_WORKERS)  # accepted (not started)
    with pytest.raises(ValueError):
        engine.MemmapEngine(workers=MAX_WORKERS + 1)


def test_each_limit_is_accepted_and_one_beyond_is_refused() -> None:
    assert platform_of(e820(64 << 20, memmap=f"workers = {MAX_WORKERS}")).memmap.workers == MAX_WORKERS
    refused(e820(64 << 20, memmap=f"workers = {MAX_WORKERS + 1}"), "memmap.workers")
    assert platform_of(e820(64 << 20, memmap=f"ns_per_page = {MAX_NS_PER_PAGE}")).memmap.ns_per_page == MAX_NS_PER_PAGE
    refused(e820(64 << 20, memmap=f"ns_per_page = {MAX_NS_PER_PAGE + 1}"), "memmap.ns_per_page")
    assert platform_of(e820(64 << 20, numa=MAX_NUMA_NODE)).regions[0].numa_node == MAX_NUMA_NODE
    refused(e820(64 << 20, numa=MAX_NUMA_NODE + 1), "region[0].numa_node")
    # The largest region fills the physical address space; a second one no longer fits.
    assert platform_of(e820(MAX_REGION)).regions[0].size == MAX_REGION
    refused(e820(MAX_REGION + G16M), "region[0].size")
    refused(e820(MAX_REGION - G16M, 64 << 20), "region[1].size")
    assert len(platform_of(e820(MAX_REGION - (2 << 30), 64 << 20)).regions) == 2
    # What the issue found failing after validation: sizes between 2^62 and 2^64, "4096T".
    for size in (1 << 62, (1 << 64) - G16M, '"4096T"'):
        refused(e820(size), "region[0].size")  # type: ignore[arg-type]
    dimms = '[[dimm]]\nsize = "32M"\n'
    assert len(platform_of(f'template = "nfit"\n{dimms * MAX_DIMMS}[[region]]\n').dimms) == MAX_DIMMS
    refused(f'template = "nfit"\n{dimms * (MAX_DIMMS + 1)}[[region]]\n', "dimm")


def test_namespace_sizes_follow_the_region_alignment() -> None:
    # 1000 DIMMs do not divide 16M: the region's alignment is 16M x 1000 (default_align()).
    dimms = '[[dimm]]\nsize = "32M"\n' * 1000
    message = refused(f'template = "nfit"\n{dimms}[[region]]\nnamespaces = [ {{ size = "1024M" }} ]\n',
                      "region[0].namespaces[0].size")
    assert "16000M" in message
    platform_of(f'template = "nfit"\n{dimms}[[region]]\nnamespaces = [ {{ size = "16000M" }} ]\n')


def test_a_dimm_holds_as_many_namespaces_as_its_label_area() -> None:
    # Two regions on DIMM 0: their namespaces share its label area.
    def config(first: int, second: int) -> str:
        def ns(n: int) -> str:
            return "namespaces = [" + ", ".join(['{ size = "16M" }'] * n) + "]"
        return (f'template = "nfit"\n[[dimm]]\nsize = "{(first + second) * 16}M"\n[[dimm]]\nsize = "32M"\n'
                f'[[region]]\ndimms = [0]\nsize = "{first * 16}M"\n{ns(first)}\n'
                f'[[region]]\ndimms = [0]\nsize = "{second * 16}M"\n{ns(second)}\n')

    platform_of(config(MAX_NAMESPACES_PER_DIMM - 9, 9))
    message = refused(config(MAX_NAMESPACES_PER_DIMM - 9, 10), "region[1].namespaces")
    assert f"DIMM 0 would hold {MAX_NAMESPACES_PER_DIMM + 1} namespace labels" in message


def test_the_most_namespaces_a_dimm_holds_are_made_and_come_back(tmp_path: Path) -> None:
    many = ", ".join(['{ size = "16M" }'] * MAX_NAMESPACES_PER_DIMM)
    config = parse_config(tomllib.loads(f'template = "nfit"\n[[dimm]]\nsize = "{MAX_NAMESPACES_PER_DIMM * 16}M"\n'
                                        f'[[region]]\nnamespaces = [{many}]\n'), "t.toml")
    state = StateDir(tmp_path / "state")
    platform, provision_config = state.open(config)
    assert provision_config is not None
    provision(platform, state, provision_config)
    with boot(platform, state) as system:
        assert sum(1 for ns in system.buses[0].regions[0].namespaces if ns.size) == MAX_NAMESPACES_PER_DIMM


@pytest.mark.parametrize("name", ["a\u0000b", " lead", "trail\t", "x" * 64])
def test_names_the_label_cannot_keep_are_refused(name: str) -> None:
    refused(f'template = "nfit"\n[[dimm]]\nsize = "32M"\n[[region]]\n'
            f'namespaces = [ {{ size = "16M", name = {json.dumps(name)} }} ]\n', "region[0].namespaces[0].name")


def test_an_e820_region_without_a_size_says_so() -> None:
    assert "missing: an e820 region needs a size" in refused("[[region]]\n", "region[0].size")


def test_modes_must_fit_their_namespace() -> None:
    refused(e820(32 << 20).replace("numa_node = 0\n", 'namespace = { mode = "fsdax", align = "1G" }\n'),
            "region[0].namespace")
    refused('template = "nfit"\n[[dimm]]\nsize = "32M"\n[[region]]\n'
            'namespaces = [ { size = "16M", mode = "sector" } ]\n', "region[0].namespaces[0]")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=2, max_value=(MAX_REGION >> 24) + 4), min_size=1, max_size=6),
       st.integers(min_value=0, max_value=MAX_WORKERS + 8), st.integers(min_value=0, max_value=MAX_NUMA_NODE + 8))
def test_a_config_that_passes_always_makes_a_valid_record(granules: list[int], workers: int, numa: int) -> None:
    text = e820(*(g * G16M for g in granules), memmap=f"workers = {workers}", numa=numa)
    try:
        config = parse_config(tomllib.loads(text), "t.toml")
    except ConfigError:
        return
    try:
        Platform.from_config(config).validate()
    except InvalidPlatform as e:
        pytest.fail(f"accepted by the config, refused as a record: {e}\n{text}")


def test_the_docs_state_the_same_ranges() -> None:
    docs = DOCS.read_text()
    rows = dict(re.findall(r"^\| `?([^|]+?)`? \| (.+?) \|$", docs, re.M))
    assert rows["memmap.workers"].startswith(f"0 to {MAX_WORKERS} ")
    assert rows["memmap.ns_per_page"] == f"0 to {MAX_NS_PER_PAGE}"
    assert rows["numa_node"] == f"0 to {MAX_NUMA_NODE}"
    assert rows["[[dimm]]"] == f"at most {MAX_DIMMS}"
    assert rows["nfit namespaces per DIMM"].startswith(f"at most {MAX_NAMESPACES_PER_DIMM} ")
    assert f"at most {format_size(MAX_REGION)}" in docs
    assert f"workers = 2                  # worker processes, 0 to {MAX_WORKERS};" in docs
    assert f"(0 to {MAX_NS_PER_PAGE})" in docs


NFIT = 'template = "nfit"\n[[dimm]]\nsize = "64M"\n[[dimm]]\nsize = "64M"\n[[region]]\n'


def test_the_nfit_test_platform_is_valid_and_its_tables_are_not_editable(tmp_path: Path) -> None:
    platform = platform_of('template = "nfit_test"\n')
    assert Platform.from_json(platform.to_json(), "p") == platform
    for edited in (replace(platform, regions=platform.regions[:-1]),
                   replace(platform, dimms=(replace(platform.dimms[0], size=64 << 20), *platform.dimms[1:]))):
        with pytest.raises(InvalidPlatform, match="nfit_test module's"):
            edited.validate()


@pytest.mark.parametrize(("edit", "field"), [
    (lambda d: d["dimms"][0].update(vendor=1 << 16), "dimm[0].vendor"),
    (lambda d: d["dimms"][0].update(mfg_location=256), "dimm[0].mfg_location"),
    (lambda d: d["dimms"][0].update(bus=1), "dimm[0].bus"),
    (lambda d: d["dimms"][0].update(label_fill=7), "dimm[0].label_fill"),
    (lambda d: d["regions"][0].update(persistence="battery"), "region[0].persistence"),
    (lambda d: d["regions"][0].update(range_index=-2), "region[0].range_index"),
    (lambda d: d["regions"][0].update(region_offsets=[0]), "region[0].region_offsets"),
    (lambda d: d["regions"][0].update(cookie2=-1), "region[0].cookie2"),
    (lambda d: d["regions"][0].update(flush_hints="yes"), "region[0].flush_hints"),
    (lambda d: d["buses"][0].update(provider="e820"), "buses"),
    (lambda d: d["memmap"].update(workers=MAX_WORKERS + 1), "memmap.workers"),
])
def test_every_field_of_a_record_is_checked(tmp_path: Path, edit: Callable[[dict[str, Any]], None],
                                            field: str) -> None:
    """A hand-edited platform.json is refused naming the field, never a traceback later."""
    doc = json.loads(platform_of(NFIT).to_json())
    edit(doc)
    state = StateDir(tmp_path)
    state.platform_path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=rf"damaged platform record \({re.escape(field)}"):
        state.read_platform()


def nfit_namespace(spec: dict[str, Any]) -> str:
    fields = [f'size = "{spec["size16"] * 16}M"', f'mode = "{spec["mode"]}"', f'map = "{spec["map"]}"',
              f'align = "{spec["align"]}"', f'sector_size = {spec["sector_size"]}']
    return "{ " + ", ".join(fields) + " }"


NAMESPACE_SPECS = st.fixed_dictionaries({
    "mode": st.sampled_from(["raw", "fsdax", "devdax", "sector"]), "map": st.sampled_from(["mem", "dev"]),
    "align": st.sampled_from(["4K", "2M", "1G"]), "size16": st.integers(min_value=1, max_value=12),
    "sector_size": st.sampled_from([512, 520, 4096, 4224])})


@settings(max_examples=60, deadline=None)
@given(dimms=st.integers(min_value=1, max_value=3), dimm16=st.integers(min_value=2, max_value=24),
       namespaces=st.lists(NAMESPACE_SPECS, max_size=4), e820_size16=st.integers(min_value=2, max_value=40),
       e820_namespace=NAMESPACE_SPECS)
def test_a_config_that_passes_always_provisions(dimms: int, dimm16: int, namespaces: list[dict[str, Any]],
                                                e820_size16: int, e820_namespace: dict[str, Any]) -> None:
    """Whatever the checks accept, the first mount makes: every namespace with its mode, the
    same after a reboot (nothing refused by the model at provisioning)."""
    nfit = ['template = "nfit"', *[f'[[dimm]]\nsize = "{dimm16 * 16}M"' for _ in range(dimms)],
            "[[region]]", f"namespaces = [{', '.join(nfit_namespace(n) for n in namespaces)}]"]
    ns = dict(e820_namespace)
    ns.pop("size16")
    e820_text = (f'[[region]]\nsize = "{e820_size16 * 16}M"\nnamespace = {{ '
                 + ", ".join(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}" for k, v in ns.items()) + " }\n")
    for text, wanted in (("\n".join(nfit) + "\n", [n["mode"] for n in namespaces]), (e820_text, [ns["mode"]])):
        try:
            config = parse_config(tomllib.loads(text), "t.toml")
        except ConfigError:
            continue
        with tempfile.TemporaryDirectory() as d:
            state = StateDir(Path(d) / "state")
            platform, provision_config = state.open(config)
            assert provision_config is not None
            try:
                provision(platform, state, provision_config)
            except ConfigError as e:
                pytest.fail(f"accepted by the config, refused by the first mount: {e}\n{text}")
            with boot(platform, state) as system:
                made = sorted(namespace_mode(ns) for bus in system.buses for r in bus.regions
                              for ns in r.namespaces if ns.size)
            assert made == sorted(wanted), text


MODE_OF_CLAIM = {None: "raw", "pfn": "fsdax", "dax": "devdax", "btt": "sector"}


def namespace_mode(ns: Namespace) -> str:
    return MODE_OF_CLAIM[ns.claim.claim_class if ns.claim is not None else None]
