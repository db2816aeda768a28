"""Fixtures of the tools tests (helpers are in tooltest.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from tooltest import SLOW_E820


@pytest.fixture
def slow_mnt(make_mount: Callable[..., Any]) -> Any:
    return make_mount(SLOW_E820)

