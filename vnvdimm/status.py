"""`vnvdimm status`: the emulated platform as a tree, with a progress bar per active memmap.

The renderers of what `vnvdimm.client` reads from the mounted sysfs tree (``MNT/sys``), so it
also works on any sysfs root that has the libnvdimm layout (``vnvdimm status /`` inside
``with-vnvdimm``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any

from vnvdimm.client import GoneError, Memmap, NamespaceInfo, NotAMount, Root, Status, human_size, read_status_checked

# ---------------------------------------------------------------- rendering (rich)


def human_rate(pages_per_sec: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if pages_per_sec >= scale:
            return f"{pages_per_sec / scale:.1f}{unit} pages/s"
    return f"{pages_per_sec:.0f} pages/s"


def human_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-:--"
    seconds = int(seconds + 0.999)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def memmap_renderable(mm: Memmap, bar_width: int = 24) -> Any:
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    if not mm.active:
        rate = human_rate(mm.pages_per_sec)
        return Text.assemble(("memmap ", "dim"), (mm.device, "bold"), " ", ("idle", "green"),
                             f"  {mm.pages_done}/{mm.pages_total} pages in {mm.elapsed_us / 1e6:.2f} s ({rate})")
    label = Text.assemble(("memmap ", "dim"), (mm.device, "bold"), " ", ("active", "yellow"))
    detail = Text(f"{mm.fraction * 100:5.1f}%  {mm.pages_done}/{mm.pages_total} pages  "
                  f"{human_rate(mm.pages_per_sec)}  ETA {human_eta(mm.eta_s)}")
    if mm.pause_at is not None and mm.pause_at < 1000:
        detail.append(f" (pause at {mm.pause_at / 10:g}%)", "dim")
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True, min_width=len(label.plain))
    grid.add_column(width=bar_width, no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row(label, ProgressBar(total=max(1, mm.pages_total), completed=mm.pages_done, width=bar_width), detail)
    return grid


def namespace_label(ns: NamespaceInfo) -> Any:
    from rich.text import Text

    text = Text.assemble((ns.dev, "bold cyan"), "  ", (ns.mode, "magenta"))
    if ns.map:
        text.append(f" map={ns.map}")
    text.append(f"  {human_size(ns.size)}")
    if ns.path:
        text.append(f"  {ns.path}", "blue")
    if ns.holder:
        text.append(f"  ({ns.holder})", "dim")
    if not ns.enabled:
        text.append("  disabled", "red")
    if ns.badblock_count:
        text.append(f"  {ns.badblock_count} bad blocks", "bold red")
    return text


def status_renderable(status: Status) -> Any:
    from rich.console import Group
    from rich.text import Text
    from rich.tree import Tree

    if not status.buses:
        return Text(f"{status.root.sys}: no nvdimm bus")
    trees = []
    for bus in status.buses:
        label = Text.assemble((bus.dev, "bold"), f"  provider {bus.provider}")
        if bus.dimms:
            label.append(f"  dimms {' '.join(bus.dimms)}", "dim")
        tree = Tree(label)
        for region in bus.regions:
            rlabel = Text.assemble((region.dev, "bold green" if region.enabled else "bold red"),
                                   f"  {human_size(region.size)}")
            if region.numa_node is not None:
                rlabel.append(f"  node {region.numa_node}", "dim")
            if not region.enabled:
                rlabel.append("  disabled", "red")
            if region.badblock_count:
                rlabel.append(f"  {region.badblock_count} bad blocks", "bold red")
            rnode = tree.add(rlabel)
            if not region.namespaces:
                rnode.add(Text("no namespaces", "dim"))
            for ns in region.namespaces:
                nnode = rnode.add(namespace_label(ns))
                if ns.memmap is not None:
                    nnode.add(memmap_renderable(ns.memmap))
        trees.append(tree)
    return Group(*trees)


# ---------------------------------------------------------------- the command


def make_console(file: Any = None) -> Any:
    """A rich console: colours and live redraws on a terminal, plain text (no escape codes,
    no wrapping at 80 columns) into a pipe or file."""
    from rich.console import Console

    file = file or sys.stdout
    tty = hasattr(file, "isatty") and file.isatty()
    width = None if tty or os.environ.get("COLUMNS") else 200
    return Console(file=file, highlight=False, soft_wrap=False, width=width)


def run(mountpoint: str, as_json: bool = False, watch: bool = False, interval: float = 1.0,
        as_map: bool = False) -> int:
    try:
        root = Root.of(mountpoint)
    except NotAMount as e:
        print(f"vnvdimm: {e}", file=sys.stderr)
        return 2
    try:
        if as_map and (watch or as_json):
            print("vnvdimm: --map draws once, as text: not with --watch or --json", file=sys.stderr)
            return 2
        if not watch:
            show_once(root, as_json, as_map)
        elif as_json or not sys.stdout.isatty():
            watch_lines(root, as_json, interval)
        else:
            watch_live(root)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except GoneError as e:
        print(f"vnvdimm: {e}", file=sys.stderr)
        return 1
    return 0


def show_once(root: Root, as_json: bool, as_map: bool = False) -> None:
    status = read_status_checked(root)
    if as_map:
        from vnvdimm.statusmap import status_map

        width = max(32, min(100, (os.get_terminal_size().columns if sys.stdout.isatty() else 80) - 4))
        print(status_map(status, width), end="")
        return
    if as_json:
        print(json.dumps(status.to_json(), indent=2))
        return
    make_console().print(status_renderable(status))


def watch_lines(root: Root, as_json: bool, interval: float) -> None:
    """Not a terminal: one snapshot per interval (JSON lines with --json)."""
    console = None if as_json else make_console()
    while True:
        status = read_status_checked(root)
        if as_json:
            print(json.dumps(status.to_json()), flush=True)
        else:
            assert console is not None
            console.print(status_renderable(status))
            console.print(f"-- {time.strftime('%H:%M:%S')}")
            console.file.flush()
        time.sleep(interval)


def watch_live(root: Root) -> None:
    """On a terminal: the tree redrawn in place (rich Live) four times a second, until ^C."""
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    console = make_console()

    def frame() -> Any:
        status = read_status_checked(root)
        active = sum(1 for mm in status.memmaps() if mm.active)
        footer = Text(f"{time.strftime('%H:%M:%S')}  {active} active memmap(s)  (Ctrl-C to quit)", "dim")
        return Group(status_renderable(status), footer)

    with Live(frame(), console=console, auto_refresh=False, transient=False) as live:
        while True:
            time.sleep(0.25)
            live.update(frame(), refresh=True)
