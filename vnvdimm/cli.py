"""vnvdimm command line: mount, umount, status, wait, inject-error."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# Every command imports only what it uses: with-vnvdimm runs `preload-path` and `blockdevs`
# on every call, and the model (numpy, the memmap engine) costs a quarter of a second to
# import; only `mount` needs it.


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "umount":
        # Without the model's imports: an unmount under load should not wait for them.
        p = argparse.ArgumentParser(prog="vnvdimm umount", description=UMOUNT_DESCRIPTION)
        add_umount_arguments(p)
        return _umount(p.parse_args(argv[1:]))
    if argv and argv[0] == "run":
        return _run(argv[1:])
    if argv and argv[0] == "sysfs-attach":
        # with-vnvdimm's helper (in its private mount namespace): a /sys connection of its own.
        from vnvdimm.scripts import sysfs_attach

        return sysfs_attach.main(argv[1:])
    if argv and argv[0] == "blockdevs":
        # with-vnvdimm's helper (root, in its private mount namespace): loop block devices.
        from vnvdimm import blockdev

        return blockdev.main(argv[1:])

    parser = build_parser()
    sub = subcommands(parser)

    if argv and argv[0] in TOOL_COMMANDS:
        # Options may follow the devices (`wait MNT dax1.0 --timeout 5`).
        tool_args = sub.choices[argv[0]].parse_intermixed_args(argv[1:])
        return TOOL_COMMANDS[argv[0]](tool_args)
    args = parser.parse_args(argv)
    if args.command == "mount":
        return _mount(args)
    return 2


EPILOG = ("Documentation: man vnvdimm (`vnvdimm man`), docs/tutorial.md and docs/tools.md of the source (installed "
          "by mountscripts/install in PREFIX/share/doc/vnvdimm). Shell completion: `vnvdimm completion bash`.")


def build_parser() -> argparse.ArgumentParser:
    """Every command's arguments: what main() parses, and what the man page and the shell
    completion are generated from (vnvdimm/docgen.py)."""
    parser = argparse.ArgumentParser(prog="vnvdimm", description="Emulated Linux persistent memory over FUSE",
                                     epilog=EPILOG)
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("mount", help="mount an emulated pmem platform (sysfs + /dev) at MNT")
    p.add_argument("mountpoint", metavar="MNT", type=Path)
    p.add_argument("--config", type=Path, help="topology TOML file (default: two 8 GiB e820 regions)")
    p.add_argument("--state-dir", type=Path,
                   help="media, labels and logs (default: $XDG_DATA_HOME/vnvdimm, else ~/.local/share/vnvdimm)")
    p.add_argument("-f", "--foreground", action="store_true", help="do not daemonize")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (repeat for more)")
    p.add_argument("--allow-other", action="store_true", help="let other users see the mount (-o allow_other)")
    p.add_argument("--workers", type=int, help="memmap worker processes (default: config, else CPU count)")

    p = sub.add_parser("umount", help="unmount MNT and wait for its daemon to exit", description=UMOUNT_DESCRIPTION)
    add_umount_arguments(p)

    add_tool_commands(sub)
    return parser


def subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:  # type: ignore[type-arg]
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub


def _mount(args: argparse.Namespace) -> int:
    from vnvdimm import daemon
    from vnvdimm.safe_files import canonical
    from vnvdimm.topology.config import ConfigError, load_config
    from vnvdimm.topology.statedir import default_state_dir

    config = None
    if args.config is not None:
        try:
            config = load_config(args.config)
        except ConfigError as e:
            print(f"vnvdimm: {e}", file=sys.stderr)
            return 2
    opts = daemon.MountOptions(
        # The parent's links resolved, not the last component's: a mount point or state dir
        # that is itself a symbolic link is refused, never followed (see safe_files).
        mountpoint=canonical(args.mountpoint),
        state_dir=canonical(args.state_dir or default_state_dir()),
        config=config,
        foreground=args.foreground,
        allow_other=args.allow_other,
        verbose=args.verbose,
        workers=args.workers,
        source=str(args.config.resolve()) if args.config is not None else None,
    )
    return daemon.mount(opts)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vnvdimm")
    except PackageNotFoundError:
        return "(not installed: run from a source tree)"


class _Version(argparse.Action):
    """--version, looked up only when asked for (importlib.metadata is slow to import)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"vnvdimm {package_version()}")  # on stdout, as argparse's own version action
        parser.exit()


UMOUNT_DESCRIPTION = ("Unmount MNT and wait for its daemon to exit. A mount whose device files are open, mapped "
                      "or behind a loop device is refused (exit 1), naming them and the processes; nothing is "
                      "changed.")


def add_umount_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", metavar="MNT", type=Path)
    how = p.add_mutually_exclusive_group()
    how.add_argument("-l", "--lazy", action="store_true",
                     help="detach now (like umount -l); the daemon serves the open files until they are closed, "
                          "then exits")
    how.add_argument("-f", "--force", action="store_true",
                     help="stop the daemon even under open files: names what it breaks (their I/O fails)")


def _umount(args: argparse.Namespace) -> int:
    from vnvdimm import umount

    # Resolve the parent only: stat()ing the mount point itself would hang on a stuck daemon.
    mode = "lazy" if args.lazy else "force" if args.force else "normal"
    return umount.umount(args.mountpoint.absolute().parent.resolve() / args.mountpoint.name, mode)


def add_tool_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="the platform as a tree, with memmap progress bars",
                       description="Show buses, regions and namespaces (mode, size, device file) and a progress "
                                   "bar for each memmap being initialized. MNT may also be a sysfs root "
                                   "(e.g. / under with-vnvdimm).")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("--json", action="store_true", help="machine-readable output (JSON lines with --watch)")
    p.add_argument("--map", action="store_true",
                   help="draw each region's capacity: namespaces by mode over its address range, free extents, "
                        "seeds, memmap progress")
    p.add_argument("-w", "--watch", action="store_true",
                   help="keep redrawing (in place on a terminal) until interrupted")
    p.add_argument("--interval", type=float, default=1.0, metavar="S",
                   help="seconds between snapshots when --watch is not on a terminal (default 1)")

    p = sub.add_parser("wait", help="block until memmaps are idle (poll() on memmap_state)",
                       description="Wait until the memmap of every named device (default: every pfn/dax device) "
                                   "reads idle. DEVICE is a device file (pmem0, dax1.0, /dev/pmem0), a namespace "
                                   "or a pfn/dax device. A progress bar is drawn on stderr when it is a terminal. "
                                   "Exit status: 0 idle, 1 timeout, 2 usage error.")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("devices", metavar="DEVICE", nargs="*")
    p.add_argument("-t", "--timeout", type=float, metavar="S", help="give up after S seconds (exit 1)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar even on a terminal")

    p = sub.add_parser("inject-error", help="inject (or remove) media errors in a namespace",
                       description="Like ndctl inject-error: BLOCK and COUNT are 512-byte blocks from the start of "
                                   "the namespace's data (after the info block and memmap of fsdax/devdax). Bad "
                                   "blocks show in regionN/badblocks and the block device's badblocks, reads of "
                                   "them fail with EIO, and a write of whole bad blocks clears them.")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("namespace", metavar="NAMESPACE")
    p.add_argument("-B", "--block", type=_number, help="first 512-byte block")
    p.add_argument("-n", "--count", type=_number, default=1, help="number of blocks (default 1)")
    p.add_argument("--uninject", action="store_true",
                   help="take the injection back (the platform forgets it; the bad blocks stay until written)")
    p.add_argument("--clear", action="store_true", help="clear the errors (as ndctl clear-errors)")
    p.add_argument("--status", action="store_true", help="list the namespace's bad blocks (JSON)")

    p = sub.add_parser("run", help="run a command where MNT/sys is /sys and MNT/dev is /dev (with-vnvdimm)",
                       description="vnvdimm run MNT [-- CMD [ARG...]]: CMD (default: a shell) in a private "
                                   "mount namespace over the emulated platform, with the preload library; "
                                   "`vnvdimm run --help` says more.")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD")

    sub.add_parser("preload-path", help="print the path of the preload library (for LD_PRELOAD)",
                   description="The library that makes the emulated /dev/ndctlN, nmemN, daxR.M and pmemN "
                               "look like device nodes and answers their ioctls; with-vnvdimm loads it.")

    p = sub.add_parser("completion", help="print the shell completion script (bash or zsh)",
                       description="Print a completion script for SHELL. Install it for yourself with "
                                   "`vnvdimm completion bash > ~/.local/share/bash-completion/completions/vnvdimm` "
                                   "(bash), or for everyone in /usr/share/bash-completion/completions/vnvdimm; for "
                                   "zsh, `vnvdimm completion zsh > ~/.zfunc/_vnvdimm` with ~/.zfunc on $fpath.")
    p.add_argument("shell", metavar="SHELL", choices=("bash", "zsh"))

    p = sub.add_parser("man", help="print the vnvdimm(1) man page (roff)",
                       description="Print the man page, generated from the commands' arguments. Read it with "
                                   "`vnvdimm man | man -l -`, or install it with `vnvdimm man > "
                                   "~/.local/share/man/man1/vnvdimm.1` (mountscripts/install puts it in "
                                   "PREFIX/share/man/man1).")


def _number(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _status(args: argparse.Namespace) -> int:
    from vnvdimm import status

    return status.run(args.mountpoint, as_json=args.json, watch=args.watch, interval=args.interval,
                      as_map=args.map)


def _wait(args: argparse.Namespace) -> int:
    from vnvdimm import wait

    return wait.run(args.mountpoint, args.devices, args.timeout, quiet=args.quiet)


def _inject(args: argparse.Namespace) -> int:
    from vnvdimm import inject

    return inject.run(args.mountpoint, args.namespace, args.block, args.count, args.uninject, args.status,
                      args.clear)


def _run(argv: list[str]) -> int:
    """exec the packaged with-vnvdimm; its loop block devices call back into this same vnvdimm
    (VNVDIMM), so the command works where the venv's bin is not on the PATH."""
    import os

    from vnvdimm.scripts import WITH_VNVDIMM

    env = dict(os.environ)
    env.setdefault("VNVDIMM", f"{sys.executable} -m vnvdimm.cli")
    os.execve("/bin/sh", ["/bin/sh", str(WITH_VNVDIMM), *argv], env)
    return 127  # not reached


def _preload_path(args: argparse.Namespace) -> int:
    from vnvdimm.preload import PreloadMissing, library_path

    try:
        print(library_path())
    except PreloadMissing as e:
        print(f"vnvdimm: {e}", file=sys.stderr)
        return 1
    return 0


def _completion(args: argparse.Namespace) -> int:
    from vnvdimm import docgen

    print(docgen.completion(build_parser(), args.shell), end="")
    return 0


def _man(args: argparse.Namespace) -> int:
    from vnvdimm import docgen

    print(docgen.man_page(build_parser(), package_version()), end="")
    return 0


TOOL_COMMANDS = {"status": _status, "wait": _wait, "inject-error": _inject, "preload-path": _preload_path,
                 "completion": _completion, "man": _man}


if __name__ == "__main__":
    sys.exit(main())
