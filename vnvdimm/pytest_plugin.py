"""pytest plugin: emulated persistent memory for your tests (registered as `vnvdimm`).

Fixtures:

* ``vnvdimm_testbed``: a started :class:`vnvdimm.testbed.Testbed`, stopped after the test
  (also when it fails). Its topology comes from the ``vnvdimm_topology`` marker (a dict,
  TOML text or a TOML path; on the test, its class or module), else the small default
  (two 256 MiB e820 regions: fsdax map=dev and devdax map=mem).
* ``vnvdimm_testbed_factory``: ``factory(topology=None, **options) -> Testbed``, started;
  every test bed it made is stopped after the test.

Tests using them are skipped (not failed), with the reason, where a test bed cannot run:
no /dev/fuse, or an ordinary user on a system that does not let users mount FUSE file systems
or make user namespaces (see :func:`vnvdimm.testbed.unsupported_reason`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vnvdimm_topology(topology): the platform the vnvdimm_testbed fixture mounts "
                   "(a dict in the config-file schema, TOML text, or a TOML file path)")


def _skip_if_unsupported() -> None:
    from vnvdimm.testbed import unsupported_reason

    reason = unsupported_reason()
    if reason is not None:
        pytest.skip(f"vnvdimm test beds cannot run here: {reason}")


@pytest.fixture
def vnvdimm_testbed_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Any]]:
    from vnvdimm.testbed import Testbed

    made: list[Testbed] = []

    def factory(topology: Any = None, **options: Any) -> Testbed:
        _skip_if_unsupported()
        options.setdefault("base_dir", tmp_path_factory.mktemp("vnvdimm"))
        tb = Testbed(topology, **options)
        made.append(tb)
        return tb.start()

    try:
        yield factory
    finally:
        for tb in made:
            tb.stop()


@pytest.fixture
def vnvdimm_testbed(request: pytest.FixtureRequest, vnvdimm_testbed_factory: Callable[..., Any]) -> Any:
    marker = request.node.get_closest_marker("vnvdimm_topology")
    topology = marker.args[0] if marker is not None and marker.args else None
    options = dict(marker.kwargs) if marker is not None else {}
    return vnvdimm_testbed_factory(topology, **options)
