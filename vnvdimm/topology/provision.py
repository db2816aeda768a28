"""Provisioning: the media of new regions created and formatted as a config says, through
the model calls ndctl's create-namespace makes, all or nothing."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

from vnvdimm import safe_files
from vnvdimm.model.base import Attr, Device, Driver
from vnvdimm.model.media import Media
from vnvdimm.model.namespace import Namespace
from vnvdimm.model.region import Region
from vnvdimm.safe_files import write_atomically
from vnvdimm.topology.boot import boot
from vnvdimm.topology.config import ConfigError, NamespaceConfig, TopologyConfig, format_size
from vnvdimm.topology.record import Platform
from vnvdimm.topology.statedir import PLATFORM_FILE, PROVISIONING_COMPLETE, PROVISIONING_DIR, StateDir

log = logging.getLogger("vnvdimm.topology")


def provision(platform: Platform, state: StateDir, config: TopologyConfig) -> list[int]:
    """Create the media of regions that have none (every region of a new platform) and format
    them as `config` says. All or nothing: the work happens in a directory of its own inside
    the state dir and moves into place once complete, so a failed or interrupted provisioning
    leaves nothing a later mount would take for a platform (see StateDir.ensure).
    Returns the indexes of the regions it created."""
    new_record = not state.has(PLATFORM_FILE)
    created = [i for i in range(len(platform.regions))
               if new_record or not state.has(state.media_path(i).name)]
    if not created:
        return []
    # Label writes are made durable once, when the installer's machine closes (before the
    # completion mark), not one by one: nothing sees them before they are installed, and a
    # crash throws the whole work away. (One fdatasync per label write was most of the time.)
    work = state.subdir(PROVISIONING_DIR, sync_each_label_write=False)
    try:
        for i, r in enumerate(platform.regions):
            name = state.media_path(i).name
            if i in created:
                create_media(work.media_path(i), r.size, work.fd)
            else:  # read by the boot, not written
                os.link(name, name, src_dir_fd=state.fd, dst_dir_fd=work.fd, follow_symlinks=False)
        # The label areas of DIMMs that exist are copied: a new region's namespaces are written
        # into them beside those of the regions already there.
        for d in range(len(platform.dimms)):
            for path, copy in ((state.label_area_path(d), work.label_area_path(d)),
                               (state.label_path(d), work.label_path(d))):
                if state.has(path.name, state.labels_fd):
                    write_atomically(copy, safe_files.read_private(path, state.labels_fd), dir_fd=work.labels_fd)
        format_regions(platform, work, config, created)
        safe_files.fsync_dir(work.path / "labels", work.labels_fd)  # the label areas it created
        if new_record:
            work.write_platform(platform)
        write_atomically(work.path / PROVISIONING_COMPLETE, b"", dir_fd=work.fd)
    except BaseException:
        shutil.rmtree(PROVISIONING_DIR, dir_fd=state.fd, ignore_errors=True)
        raise
    finally:
        work.close()
    state.install_provisioned()
    return created


def create_media(path: Path, size: int, dir_fd: int | None = None) -> None:
    try:
        Media.create(path, size, dir_fd=dir_fd)
    except OSError as e:
        hint = {errno.EFBIG: "the file system of the state dir cannot hold a file that large (ext4: 16T); "
                             "put the state dir on one that can (xfs, btrfs, tmpfs) or use smaller regions",
                errno.ENOSPC: "the file system of the state dir is full",
                errno.EDQUOT: "your disk quota is used up"}.get(e.errno or 0, "")
        raise ConfigError(f"{path.parent.parent / path.name}: cannot create {format_size(size)} of media: "
                          f"{e.strerror}{'; ' + hint if hint else ''}") from None


def format_regions(platform: Platform, state: StateDir, config: TopologyConfig, created: list[int]) -> None:
    """Boot the platform without serving it (the installer's boot: no memmap engine) and make
    the namespaces `config` asks for in the regions in `created`."""
    with boot(platform, state) as system, system.lock:
        regions = [r for bus in system.buses for r in bus.regions]
        for i in created:
            region = regions[i]
            if i >= len(config.regions):
                continue  # a template's region (nfit_test): fresh media, nothing on it
            rcfg = config.regions[i]
            if region.iset is None:
                with refused(config, f"region[{i}].namespace"):
                    apply_mode(region.namespaces[0], rcfg.namespaces[0])
            else:
                for j, nscfg in enumerate(rcfg.namespaces):
                    with refused(config, f"region[{i}].namespaces[{j}]"):
                        ns = create_labelled_namespace(region, nscfg)
                        apply_mode(ns, nscfg)
            log.info("provisioned %s (%s)", region.name, format_size(region.size))


@contextlib.contextmanager
def refused(config: TopologyConfig, key: str) -> Iterator[None]:
    """A namespace the model refuses (as the kernel would refuse ndctl) is an error in the
    config, naming the key, not a traceback. (Validation rules out what it can foresee.)"""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e)
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        raise ConfigError(f"{config.source}: {key}: cannot be created: "
                          f"{reason if name in reason else f'{reason} ({name})'}") from None


def attach(dev: Device, driver: Driver) -> None:
    """bind_store() for a device in hand (no lookup by name through every device)."""
    if not dev.system.match(driver, dev):
        raise OSError(errno.ENODEV, f"{driver.name} does not match {dev.name}")
    dev.system.driver_attach(driver, dev)


def store(dev: Device, name: str, value: str) -> None:
    """Write an attribute as ndctl does: the value plus a NUL, in one write."""
    for entry in dev.entries():
        if isinstance(entry, Attr) and entry.name == name and entry.store is not None:
            entry.store(value.encode() + b"\0")
            return
    raise OSError(errno.EACCES, f"{dev.name}/{name} is not writable")


def create_labelled_namespace(region: Region, cfg: NamespaceConfig) -> Device:
    seed = region.ns_seed
    assert seed is not None
    store(seed, "uuid", str(uuidlib.uuid4()))
    store(seed, "alt_name", cfg.name)
    store(seed, "size", str(cfg.size))
    system = region.system
    attach(seed, system.nd_drivers["nd_pmem"])
    return seed


def apply_mode(ns: Device, cfg: NamespaceConfig) -> None:
    """What `ndctl create-namespace -e <ns> -m <mode> -f` does, minus the info-block wipe
    (the media is fresh)."""
    assert isinstance(ns, Namespace)
    if cfg.mode == "raw":
        return
    system = ns.system
    region = ns.region
    if ns.driver is not None:
        system.driver_detach(ns)
    if cfg.mode == "sector":
        store(ns, "holder_class", "btt")
        dev: Device | None = region.btt_seed
        assert dev is not None
        store(dev, "uuid", str(uuidlib.uuid4()))
        store(dev, "sector_size", str(cfg.sector_size))
    else:
        klass = "pfn" if cfg.mode == "fsdax" else "dax"
        store(ns, "holder_class", klass)
        dev = region.pfn_seed if klass == "pfn" else region.dax_seed
        assert dev is not None
        store(dev, "uuid", str(uuidlib.uuid4()))
        store(dev, "mode", "pmem" if cfg.map == "dev" else "ram")
        store(dev, "align", str(cfg.align))
    store(dev, "namespace", ns.name)
    driver = system.nd_drivers["dax_pmem" if cfg.mode == "devdax" else "nd_pmem"]
    attach(dev, driver)
