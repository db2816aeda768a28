"""The topology config (TOML) and the state dir's platform record: every error names the file
and the key and says what is wrong; a config that contradicts existing media is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vnvdimm.topology.config import ConfigError, default_config, load_config, parse_size
from vnvdimm.topology.provision import provision
from vnvdimm.topology.record import Platform
from vnvdimm.topology.statedir import StateDir

GOOD_E820 = """\
template = "e820"
[[region]]
size = "64M"
namespace = { mode = "fsdax", map = "dev", align = "2M" }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "topology.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,key,what", [
    ('template = "e821"\n[[region]]\nsize = "64M"\n', "template", "must be one of e820, nfit"),
    ('template = "e820"\n', "region", "at least one [[region]]"),
    ('[[region]]\nsize = "64Q"\n', "region[0].size", "is not a size"),
    ('[[region]]\nsize = "20M"\n', "region[0].size", "multiple of 16M"),
    ('[[region]]\nsize = true\n', "region[0].size", "not a boolean"),
    ('[[region]]\nsize = "64M"\nnuma_node = -1\n', "region[0].numa_node", "integer from 0"),
    ('[[region]]\nsize = "64M"\ncolour = "blue"\n', "region[0].colour", "unknown key"),
    ('[[region]]\nsize = "64M"\nnamespace = { mode = "memory" }\n', "region[0].namespace.mode", "must be one of"),
    ('[[region]]\nsize = "64M"\nnamespace = { mode = "fsdax", map = "ram" }\n', "region[0].namespace.map",
     "must be one of mem, dev"),
    ('[[region]]\nsize = "64M"\nnamespace = { mode = "fsdax", align = "8K" }\n', "region[0].namespace.align",
     "4K, 2M or 1G"),
    ('[[region]]\nsize = "64M"\nnamespace = { mode = "sector", sector_size = 1024 }\n',
     "region[0].namespace.sector_size", "must be one of"),
    ('[[region]]\nsize = "64M"\nnamespace = { size = "32M" }\n', "region[0].namespace.size", "unknown key"),
    ('[memmap]\nmode = "lazy"\n[[region]]\nsize = "64M"\n', "memmap.mode", "must be one of async, sync"),
    ('[memmap]\nworkers = 1000\n[[region]]\nsize = "64M"\n', "memmap.workers", "integer from 0 to 251"),
    ('[[dimm]]\nsize = "64M"\n[[region]]\nsize = "64M"\n', "dimm", "only with template = \"nfit\""),
    ('template = "nfit"\n[[dimm]]\nsize = "64M"\n[[region]]\ndimms = [1]\n', "region[0].dimms",
     "DIMM indexes from 0 to 0"),
    ('template = "nfit"\n[[dimm]]\nsize = "64M"\n[[dimm]]\nsize = "64M"\n[[region]]\ndimms = [0, 0]\n',
     "region[0].dimms", "lists a DIMM twice"),
    ('template = "nfit"\n[[dimm]]\nsize = "64M"\n[[region]]\nsize = "128M"\n', "region[0].size",
     "must be a multiple of 16M and fit"),
    ('template = "nfit"\n[[dimm]]\nsize = "64M"\n[[region]]\nnamespaces = [ { size = "8M" } ]\n',
     "region[0].namespaces[0].size", "non-zero multiple of 16M"),
    ('template = "nfit"\n[[dimm]]\nsize = "64M"\n[[region]]\nnamespaces = [ { size = "48M" }, { size = "32M" } ]\n',
     "region[0].namespaces", "more than the region's 64M"),
    ('template = "nfit"\n[[dimm]]\nsize = "64M"\n[[region]]\nnamespaces = [ { size = "16M", name = "' + "n" * 64
     + '" } ]\n', "region[0].namespaces[0].name", "at most 63 bytes"),
])
def test_errors_name_the_file_and_the_key(tmp_path: Path, text: str, key: str, what: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert what in message, message


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, "template = \n")
    with pytest.raises(ConfigError, match=f"^{path}: not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match=f"^{tmp_path}/nope.toml: cannot read the config file"):
        load_config(tmp_path / "nope.toml")


def test_good_config_and_default() -> None:
    default = default_config()
    assert default.template == "e820"
    assert [(r.size, r.namespaces[0].mode, r.namespaces[0].map, r.namespaces[0].align) for r in default.regions] == [
        (8 << 30, "fsdax", "dev", 2 << 20), (8 << 30, "devdax", "mem", 2 << 20)]


@pytest.mark.parametrize("text,value", [
    ("8G", 8 << 30), ("512M", 512 << 20), ("2MiB", 2 << 20), ("4k", 4096), ("4096", 4096), (" 1T ", 1 << 40),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value
    assert parse_size(value) == value


def test_state_dir_refuses_a_config_that_contradicts_its_media(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    platform, config = state.open(load_config(write(tmp_path, GOOD_E820)))
    assert config is not None and [r.size for r in platform.regions] == [64 << 20]
    assert provision(platform, state, config) == [0]
    # same state dir, no config: the recorded platform comes back
    again, config = state.open(None)
    assert config is None and again == platform
    other = tmp_path / "other.toml"
    other.write_text(GOOD_E820.replace("64M", "128M"))
    with pytest.raises(ConfigError) as e:
        state.open(load_config(other))
    message = str(e.value)
    assert message.startswith(f"{other}: does not match the platform already in {tmp_path / 'state'}")
    assert "64M" in message and "128M" in message


def test_damaged_platform_record_is_an_error_naming_it(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    platform, config = state.open(load_config(write(tmp_path, GOOD_E820)))
    provision(platform, state, config)
    state.platform_path.write_text(json.dumps({"template": "e820"}))
    with pytest.raises(ConfigError, match=f"^{state.platform_path}: damaged platform record"):
        state.open(None)


def test_platform_record_round_trip() -> None:
    platform = Platform.from_config(default_config())
    assert Platform.from_json(platform.to_json(), "x") == platform
    starts = [r.start for r in platform.regions]
    assert starts == [16 << 30, 24 << 30]  # 1 GiB aligned, one after the other


def test_memmap_settings_have_one_shape_and_old_records_still_open(tmp_path: Path) -> None:
    """`[memmap]` of the config, `memmap` of the platform record and the System's settings
    are one object; a record written with the former top-level keys (memmap_mode,
    memmap_workers, ns_per_page) reads back the same settings."""
    config = load_config(write(tmp_path, GOOD_E820 + '[memmap]\nmode = "sync"\nworkers = 3\nns_per_page = 7\n'))
    platform = Platform.from_config(config)
    assert platform.memmap is config.memmap
    record = json.loads(platform.to_json())
    assert record["memmap"] == {"mode": "sync", "workers": 3, "ns_per_page": 7, "pause_at": 1000}
    del record["memmap"]
    record.update(memmap_mode="sync", memmap_workers=3, ns_per_page=7)
    assert Platform.from_json(json.dumps(record), "old.json") == platform
    with pytest.raises(ConfigError, match=r"^new\.json: damaged platform record"):
        Platform.from_json(json.dumps({**record, "memmap": [1]}), "new.json")


def test_memmap_pause_at_holds_from_boot_and_is_refused_where_it_cannot_work(tmp_path: Path) -> None:
    """`[memmap] pause_at` (per mille) is the bus-level pause mark at boot; 1000 (none) by
    default; a sync platform cannot be held (enabling would wait for ever) and says so."""
    assert load_config(write(tmp_path, GOOD_E820)).memmap.pause_at == 1000
    assert load_config(write(tmp_path, GOOD_E820 + "[memmap]\npause_at = 0\n")).memmap.pause_at == 0
    with pytest.raises(ConfigError, match=r"memmap\.pause_at: must be an integer from 0 to 1000, not 1001"):
        load_config(write(tmp_path, GOOD_E820 + "[memmap]\npause_at = 1001\n"))
    with pytest.raises(ConfigError, match=r"memmap\.pause_at: .*mode = \"sync\""):
        load_config(write(tmp_path, GOOD_E820 + '[memmap]\nmode = "sync"\npause_at = 10\n'))
