"""Fixtures of the reliability suite: the figures every test reports (runs, writes
tried, faults injected, bytes verified), written to ``<basetemp>/reliability-figures.json``
and printed in the terminal summary, and the /dev/shm leak check."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mount_kit import daemon_tree, memfds, wait_for
from reliability_kit import STRESS_SECONDS

from vnvdimm.mounts import vnvdimm_processes

# ---------------------------------------------------------------- figures


class Figures:
    """Counters per test (summed over the run) and other facts (worst latencies...), saved as
    JSON after every update, so an interrupted run keeps its numbers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.tests: dict[str, dict[str, float]] = {}
        self.facts: dict[str, dict[str, Any]] = {}

    def add(self, test: str, **counts: float) -> None:
        with self.lock:
            entry = self.tests.setdefault(test, {})
            for key, value in counts.items():
                entry[key] = entry.get(key, 0) + value
            self.save()

    def note(self, test: str, **facts: Any) -> None:
        with self.lock:
            self.facts.setdefault(test, {}).update(facts)
            self.save()

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for entry in self.tests.values():
            for key, value in entry.items():
                out[key] = out.get(key, 0) + value
        return out

    def save(self) -> None:
        doc = {"stress_seconds": STRESS_SECONDS, "totals": self.totals(), "tests": self.tests, "facts": self.facts}
        self.path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


_FIGURES: list[Figures] = []


@pytest.fixture(scope="session")
def figures_store(tmp_path_factory: pytest.TempPathFactory) -> Figures:
    f = Figures(tmp_path_factory.getbasetemp() / "reliability-figures.json")
    _FIGURES.append(f)
    return f


class TestFigures:
    """`figures.add(writes=..., faults=..., bytes_verified=...)` for the current test."""

    def __init__(self, store: Figures, name: str) -> None:
        self.store = store
        self.name = name
        store.add(name, runs=1)

    def add(self, **counts: float) -> None:
        self.store.add(self.name, **counts)

    def note(self, **facts: Any) -> None:
        self.store.note(self.name, **facts)


@pytest.fixture
def figures(figures_store: Figures, request: pytest.FixtureRequest) -> TestFigures:
    return TestFigures(figures_store, request.node.nodeid.split("tests/reliability/", 1)[-1])


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for f in _FIGURES:
        if f.tests:
            totals = ", ".join(f"{k} {int(v) if float(v).is_integer() else round(v, 3)}"
                               for k, v in sorted(f.totals().items()))
            terminalreporter.write_line(f"vnvdimm reliability figures ({f.path}): {totals}")


@pytest.fixture
def shm_unchanged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """/dev/shm holds no new segment of vnvdimm's or of Python's multiprocessing after the test,
    and no process of this session (this one, its vnvdimm daemons and their workers) holds a
    memfd it did not hold before: the engine keeps its records in memfds, which /dev/shm
    never shows (other names may come and go with other test runs on the machine)."""
    base = str(tmp_path_factory.getbasetemp().resolve())

    daemons = vnvdimm_processes(base)

    def session_memfds() -> set[str]:
        # This process and the daemons (with their workers) that were there before the test
        # (a wider-scoped mount's): those the test started must be gone (the leak check).
        return set(memfds([os.getpid(), *(p for d in daemons for p in daemon_tree(d))]))

    before = set(os.listdir("/dev/shm"))
    fds_before = session_memfds()
    yield
    ours = re.compile(r"(vnvdimm|memmap|psm_|sem\.mp-|mp-)")
    leaked = {n for n in set(os.listdir("/dev/shm")) - before if ours.search(n)}
    assert not leaked, f"shared-memory segments left behind: {sorted(leaked)}"
    wait_for(lambda: not session_memfds() - fds_before, 60, "memfds to be released",
             report=lambda: f"memfds left behind: {sorted(session_memfds() - fds_before)}")
