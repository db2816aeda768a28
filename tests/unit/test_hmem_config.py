"""[[hmem]] in a topology: what is accepted, what is refused with which message, and the
platform record that keeps it."""

from __future__ import annotations

import pytest

from vnvdimm.topology.config import HMEM_BASE, ConfigError, parse_config
from vnvdimm.topology.record import InvalidPlatform, Platform

E820 = {"template": "e820", "region": [{"size": "32M"}]}


def test_hmem_ranges_are_laid_out_above_the_pmem_and_recorded() -> None:
    cfg = parse_config({**E820, "hmem": [{"size": "2G", "numa_node": 1}, {"size": "34M"}]}, "t.toml")
    p = Platform.from_config(cfg)
    assert [(h.start, h.size, h.numa_node) for h in p.hmem] == [(HMEM_BASE, 2 << 30, 1),
                                                              (HMEM_BASE + (2 << 30), 34 << 20, 0)]
    p.validate()
    assert Platform.from_json(p.to_json(), "platform.json") == p
    nt = Platform.from_config(parse_config({"template": "nfit_test", "hmem": [{"size": "64M"}]}, "t.toml"))
    assert len(nt.hmem) == 1 and Platform.from_json(nt.to_json(), "platform.json").hmem == nt.hmem


@pytest.mark.parametrize(("hmem", "message"), [
    ([{"size": "33M"}], "hmem[0].size: must be a multiple of 2M"),
    ([{"size": "16M"}], "hmem[0].size: must be a multiple of 2M"),
    ([{"size": "64M", "numa_node": 5000}], "hmem[0].numa_node"),
    ([{"size": "64M", "colour": 1}], "hmem[0]"),
    ({"size": "64M"}, "hmem: must be an array of tables"),
])
def test_bad_hmem_is_refused_by_name(hmem: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config({**E820, "hmem": hmem}, "t.toml")


def test_a_damaged_record_is_refused() -> None:
    p = Platform.from_config(parse_config({**E820, "hmem": [{"size": "64M"}]}, "t.toml"))
    text = p.to_json().replace(str(64 << 20), str((64 << 20) + 4096))
    with pytest.raises(InvalidPlatform):
        Platform.from_json(text, "platform.json").validate()
