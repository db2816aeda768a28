"""vnvdimm command line: mount, umount (status and wait live in their own issue)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vnvdimm.topology.config import ConfigError, load_config
from vnvdimm.topology.platform import default_state_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vnvdimm", description="Emulated Linux persistent memory over FUSE")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mount", help="mount an emulated pmem platform (sysfs + /dev) at MNT")
    p.add_argument("mountpoint", metavar="MNT", type=Path)
    p.add_argument("--config", type=Path, help="topology TOML file (default: two 8 GiB e820 regions)")
    p.add_argument("--state-dir", type=Path, help=f"media, labels and logs (default: {default_state_dir()})")
    p.add_argument("-f", "--foreground", action="store_true", help="do not daemonize")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (repeat for more)")
    p.add_argument("--allow-other", action="store_true", help="let other users see the mount (-o allow_other)")
    p.add_argument("--workers", type=int, help="memmap worker processes (default: config, else CPU count)")

    p = sub.add_parser("umount", help="unmount MNT and wait for its daemon to exit")
    p.add_argument("mountpoint", metavar="MNT", type=Path)

    args = parser.parse_args(argv)
    from vnvdimm import daemon

    if args.command == "mount":
        config = None
        if args.config is not None:
            try:
                config = load_config(args.config)
            except ConfigError as e:
                print(f"vnvdimm: {e}", file=sys.stderr)
                return 2
        opts = daemon.MountOptions(
            mountpoint=args.mountpoint.resolve(),
            state_dir=(args.state_dir or default_state_dir()).resolve(),
            config=config,
            foreground=args.foreground,
            allow_other=args.allow_other,
            verbose=args.verbose,
            workers=args.workers,
        )
        return daemon.mount(opts)
    if args.command == "umount":
        return daemon.umount(args.mountpoint.resolve())
    return 2


if __name__ == "__main__":
    sys.exit(main())
