"""The messages between the engine's dispatcher and a worker process.

Transport: one pickled message per ``SOCK_SEQPACKET`` datagram (boundaries kept); the memfd of
an :class:`Attach` travels beside it with ``SCM_RIGHTS``. Every message is a frozen dataclass,
so both ends name the fields they read and a new field cannot be misread by position.

A worker never decides what to initialize: it initializes the runs it is handed and reports
each one back. Run ids (``rid``) are unique per engine, so a report about a run the engine has
since handed to another worker (a revoked run, see :class:`Revoke`) is recognized as stale.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

from .storage import Geometry

MSG_MAX = 1 << 16  # bytes: far above the largest message (a Run's populate list of one section)


# -- engine -> worker ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Attach:
    """Map the job's storage (the memfd comes with the message) and keep it until told."""

    jid: int
    geometry: Geometry


@dataclass(frozen=True)
class Run:
    """Initialize job pages ``[lo, hi)``; run phase 1 first for the sections in ``populate``."""

    jid: int
    rid: int
    lo: int
    hi: int
    populate: tuple[int, ...]


@dataclass(frozen=True)
class Revoke:
    """These runs were handed to another worker: drop them, or stop the one in progress."""

    jid: int
    rids: tuple[int, ...]


@dataclass(frozen=True)
class Cancel:
    """Abandon every run of the job, unmap its storage, then acknowledge with :class:`Cancelled`."""

    jid: int


@dataclass(frozen=True)
class Detach:
    """The job is done: unmap its storage, then acknowledge with :class:`Detached`."""

    jid: int


@dataclass(frozen=True)
class Exit:
    """Stop serving and exit."""


# -- worker -> engine ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Hello:
    """The worker is ready to serve."""

    pid: int


@dataclass(frozen=True)
class Progress:
    """Still working on a run (sent while a long run sleeps for the ns_per_page floor)."""

    jid: int
    rid: int


@dataclass(frozen=True)
class RunDone:
    """Every page of the run is initialized; ``populated``: the sections phase 1 ran for."""

    jid: int
    rid: int
    populated: tuple[int, ...]


@dataclass(frozen=True)
class RunAbandoned:
    """The run was stopped (cancelled, revoked, or its job is unknown here): nothing to count."""

    jid: int
    rid: int


@dataclass(frozen=True)
class RunFailed:
    """The run failed (e.g. ENOSPC in phase 1 of a map=dev job)."""

    jid: int
    rid: int
    message: str


@dataclass(frozen=True)
class AttachFailed:
    """The worker could not map the job's storage."""

    jid: int
    message: str


@dataclass(frozen=True)
class Cancelled:
    """Ack of :class:`Cancel`: nothing of the job is mapped here and no run of it will write."""

    jid: int


@dataclass(frozen=True)
class Detached:
    """Ack of :class:`Detach`: same guarantee as :class:`Cancelled`."""

    jid: int


ToWorker = Attach | Run | Revoke | Cancel | Detach | Exit
FromWorker = Hello | Progress | RunDone | RunAbandoned | RunFailed | AttachFailed | Cancelled | Detached


def encode(msg: ToWorker | FromWorker) -> bytes:
    return pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> ToWorker | FromWorker:
    msg = pickle.loads(data)
    if not isinstance(msg, ToWorker | FromWorker):
        raise TypeError(f"not a memmap protocol message: {type(msg).__name__}")
    return msg
