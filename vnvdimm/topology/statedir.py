"""The state dir: what the DIMMs and the firmware's tables are to a real machine, kept in one
private directory (see safe_files), every file opened relative to its descriptor.

State dir layout:
    platform.json        the platform record (record.py: template, buses, DIMMs, regions,
                         soft-reserved ranges, memmap settings)
    region<N>.media      sparse media of region N (its SPA range, byte for byte)
    labels/nmem<N>.lsa   the label storage area of DIMM N, raw bytes (nfit, nfit_test, cxl_test)
    labels/nmem<N>.json.migrated
                         the JSON labels of a state dir written before label areas, kept once
                         legacy_labels.py moved their namespaces into the label areas
    .provisioning/       a provisioning under way (provision.py): moved into place once
                         complete, finished or discarded by the next mount if interrupted
    lock                 flock'ed by the daemon that serves this state dir (its pid inside)
    vnvdimm.log          the daemon's log (and vnvdimm.log.1, .2: logfile.py's rotations)

A config provisions (provision.py): a region whose media file is missing is created and
formatted as the config says; everything else is brought back from the media and labels
(boot.py), exactly as a kernel finds it at boot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from pathlib import Path

from vnvdimm import safe_files
from vnvdimm.model.label_area import LabelArea
from vnvdimm.model.media import Media
from vnvdimm.safe_files import write_atomically
from vnvdimm.topology.config import ConfigError, TopologyConfig, default_config, format_size
from vnvdimm.topology.record import InvalidPlatform, Platform

log = logging.getLogger("vnvdimm.topology")

PLATFORM_FILE = "platform.json"


def default_state_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "vnvdimm"


def damaged(path: Path, what: str) -> ConfigError:
    return ConfigError(f"{path}: damaged platform record ({what}); move it away to start afresh")


class StateDir:
    """The state dir, and every file in it opened relative to one directory descriptor.

    The descriptor comes from a walk from / that checks every ancestor (safe_files: owned by
    root or the user, not writable by others, no symbolic link met); after it, no name of the
    state dir is looked up from / again, so renaming or swapping a directory above it (for a
    symbolic link, say) changes nothing: the lock, the platform record, the media, the label
    areas, .provisioning and the log are the ones in the directory that was checked. The
    `*_path` properties are for messages."""

    def __init__(self, path: Path, *, sync_each_label_write: bool = True, dir_fd: int | None = None) -> None:
        """`sync_each_label_write` False: label areas reach the disk when the machine closes
        them (an installer's state dir, used by nothing until it is complete). `dir_fd`: the
        directory, already open (a subdirectory of a state dir)."""
        self.path = path
        self.sync_each_label_write = sync_each_label_write
        self._fd = dir_fd
        self._labels_fd: int | None = None

    @property
    def fd(self) -> int:
        """The state dir's descriptor, opened by a checked walk on first use (see safe_files)."""
        if self._fd is None:
            try:
                self._fd, _ = safe_files.open_checked_dir(safe_files.canonical(self.path), "state dir", create=True)
            except safe_files.UnsafeStateDir as e:
                raise ConfigError(str(e)) from None
            except OSError as e:
                raise ConfigError(f"{self.path}: cannot create the state dir: {e.strerror}") from None
        return self._fd

    @property
    def labels_fd(self) -> int:
        """labels/, opened relative to the state dir (created 0700 if missing)."""
        if self._labels_fd is None:
            self._labels_fd = _subdir(self.fd, "labels")
        return self._labels_fd

    def subdir(self, name: str, *, sync_each_label_write: bool = True) -> StateDir:
        """A directory inside this one (created 0700 if missing) as a StateDir of its own."""
        return StateDir(self.path / name, sync_each_label_write=sync_each_label_write,
                        dir_fd=_subdir(self.fd, name))

    def close(self) -> None:
        for fd in (self._labels_fd, self._fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._labels_fd = None

    # The descriptors are this object's alone (a subdir's too): a StateDir that is dropped
    # closes them, so a process that opens many (the test bed, provisioning's work dir, a
    # test suite) does not run out of descriptors.
    __del__ = close

    def has(self, name: str, dir_fd: int | None = None) -> bool:
        """Whether `name` exists in the state dir (or in `dir_fd`), a link included."""
        try:
            os.stat(name, dir_fd=self.fd if dir_fd is None else dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def media_path(self, index: int) -> Path:
        return self.path / f"region{index}.media"

    def label_path(self, dimm: int) -> Path:
        return self.path / "labels" / f"nmem{dimm}.json"

    def label_area_path(self, dimm: int) -> Path:
        return self.path / "labels" / f"nmem{dimm}.lsa"

    def open_media(self, index: int, size: int) -> Media:
        return Media(self.media_path(index), size, dir_fd=self.fd)

    def label_area(self, dimm: int, size: int, max_xfer: int, fill: bytes = b"") -> LabelArea:
        """DIMM `dimm`'s label storage area, created (`fill`, then zeroes) on first use."""
        path = self.label_area_path(dimm)
        try:
            if not self.has(path.name, self.labels_fd):
                return LabelArea.create(path, size, max_xfer, fill, sync_each_write=self.sync_each_label_write,
                                        dir_fd=self.labels_fd)
            return LabelArea(path, size, max_xfer, sync_each_write=self.sync_each_label_write, dir_fd=self.labels_fd)
        except ValueError as e:
            raise ConfigError(f"{e}: move it away to start that DIMM's labels afresh") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot open the label area: {e.strerror}") from None

    def open_file(self, path: Path, flags: int) -> int:
        """os.open of a file at the top of the state dir (the lock, the log): relative to its
        descriptor, never through a symbolic link, created 0600."""
        return safe_files.open_private(path, flags, self.fd)

    def write_platform(self, platform: Platform) -> None:
        write_atomically(self.platform_path, platform.to_json().encode(), dir_fd=self.fd)

    @property
    def platform_path(self) -> Path:
        return self.path / PLATFORM_FILE

    @property
    def log_path(self) -> Path:
        return self.path / "vnvdimm.log"

    @property
    def provisioning_path(self) -> Path:
        return self.path / PROVISIONING_DIR

    def ensure(self) -> None:
        """Create the state dir (0700) or check that it is private (see safe_files), and finish
        or undo a provisioning that was interrupted."""
        try:
            safe_files.check_private_tree(self.path, self.fd)
        except safe_files.UnsafeStateDir as e:
            raise ConfigError(str(e)) from None
        self.labels_fd  # noqa: B018 (created if missing)
        if self.has(PROVISIONING_DIR):
            work = self.subdir(PROVISIONING_DIR)
            try:
                complete = self.has(PROVISIONING_COMPLETE, work.fd)
            finally:
                work.close()
            if complete:
                log.info("%s: finishing an interrupted provisioning", self.path)
                self.install_provisioned()
            else:
                log.info("%s: discarding an interrupted provisioning", self.path)
                shutil.rmtree(PROVISIONING_DIR, dir_fd=self.fd)

    def open(self, config: TopologyConfig | None) -> tuple[Platform, TopologyConfig | None]:
        """The platform of this state dir, or a new one from `config` (or the default) on first
        use. Returns the platform and the config to provision missing media with; a new
        platform's record is written by `provision`, with its media, all or nothing."""
        self.ensure()
        if self.has(PLATFORM_FILE):
            platform = self.read_platform()
            if config is not None:
                wanted = checked(Platform.from_config(config), config)
                if wanted.shape() != platform.shape():
                    raise ConfigError(
                        f"{config.source}: does not match the platform already in {self.path} "
                        f"({describe(platform)} there, {describe(wanted)} in the config); "
                        "use another --state-dir, or remove that one to start afresh")
                # Memmap settings are run-time knobs: the config's win.
                platform = wanted
                self.write_platform(platform)
            return platform, config
        leftovers = sorted(n for n in os.listdir(self.fd) if re.fullmatch(r"region.*\.media", n)) + sorted(
            f"labels/{n}" for n in os.listdir(self.labels_fd))
        if leftovers:
            raise ConfigError(f"{self.path}: has {', '.join(leftovers[:4])}{' ...' if len(leftovers) > 4 else ''} "
                              f"but no {PLATFORM_FILE} to say what they are; put the record back, or move "
                              "them away too to start afresh")
        config = config or default_config()
        return checked(Platform.from_config(config), config), config

    def read_platform(self) -> Platform:
        """The platform record, refused with a message naming it if it cannot describe a machine."""
        try:
            text = safe_files.read_private(self.platform_path, self.fd).decode()
        except UnicodeDecodeError:
            raise damaged(self.platform_path, "not text") from None
        except OSError as e:
            raise ConfigError(f"{self.platform_path}: cannot read the platform record: {e.strerror}") from None
        platform = Platform.from_json(text, str(self.platform_path))
        try:
            platform.validate()
        except InvalidPlatform as e:
            raise damaged(self.platform_path, str(e)) from None
        return platform

    def install_provisioned(self) -> None:
        """Move a complete provisioning into place: labels, then media, the record last (its
        presence says the platform is whole). Renaming again after a crash is harmless, and a
        hard link of media that already existed renames onto itself: nothing happens."""
        work = self.subdir(PROVISIONING_DIR)
        try:
            if self.has("labels", work.fd):
                for label in sorted(os.listdir(work.labels_fd)):
                    os.rename(label, label, src_dir_fd=work.labels_fd, dst_dir_fd=self.labels_fd)
                    if label.endswith(MIGRATED):  # the boot moved JSON labels into the label areas
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(label.removesuffix(MIGRATED), dir_fd=self.labels_fd)
                safe_files.fsync_dir(self.path / "labels", self.labels_fd)
            for media in sorted(n for n in os.listdir(work.fd) if re.fullmatch(r"region.*\.media", n)):
                os.rename(media, media, src_dir_fd=work.fd, dst_dir_fd=self.fd)
            if self.has(PLATFORM_FILE, work.fd):
                os.rename(PLATFORM_FILE, PLATFORM_FILE, src_dir_fd=work.fd, dst_dir_fd=self.fd)
        finally:
            work.close()
        safe_files.fsync_dir(self.path, self.fd)
        shutil.rmtree(PROVISIONING_DIR, dir_fd=self.fd)
        safe_files.fsync_dir(self.path, self.fd)


def _subdir(dir_fd: int, name: str) -> int:
    """Open directory `name` in `dir_fd` (made 0700 if missing), never through a link."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, safe_files.DIR_MODE, dir_fd=dir_fd)
    return os.open(name, safe_files.DIR_FLAGS, dir_fd=dir_fd)


PROVISIONING_DIR = ".provisioning"
PROVISIONING_COMPLETE = "complete"
MIGRATED = ".migrated"  # the suffix JSON label files of old state dirs keep once migrated


def checked(platform: Platform, config: TopologyConfig) -> Platform:
    """A platform made from a config that passed validation is valid; should the two ever
    disagree, the mount stops here with a message instead of writing a record no later mount
    accepts."""
    try:
        platform.validate()
    except InvalidPlatform as e:
        raise ConfigError(f"{config.source}: cannot be laid out as a platform ({e})") from None
    return platform


def describe(p: Platform) -> str:
    regions = ", ".join(format_size(r.size) for r in p.regions)
    return f"{p.template} with regions of {regions}"
