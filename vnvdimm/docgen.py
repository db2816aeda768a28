"""The man page and the shell completion, generated from the argument parsers (cli.build_parser)
so that they cannot fall behind a new command or option: `vnvdimm man`, `vnvdimm completion SHELL`.

Completion knows the commands, each command's options, which options take a file or a
directory, and, for `status`, `wait` and `inject-error`, the devices of the mount already
named on the line (read from MNT/sys/bus/nd/devices, as the command itself would)."""

from __future__ import annotations

import argparse
import datetime
import shlex

# Options whose value is a path (completed as files), and commands whose first positional is
# a mount point (completed as directories), the rest being device names of that mount.
PATH_OPTIONS = {"--config", "--state-dir"}
DEVICE_COMMANDS = {"status", "wait", "inject-error"}
# What the positionals are, where the parser gives no help of its own.
POSITIONAL_HELP = {"MNT": "the mount point: a directory (status, wait and inject-error also take a sysfs root, e.g. "
                          "/ under vnvdimm run)",
                   "DEVICE": "a device file (pmem0, dax1.0, /dev/pmem0), a namespace or a pfn/dax device",
                   "NAMESPACE": "a namespace (namespaceR.N)"}
DESCRIPTION = ("vnvdimm serves a kernel-faithful libnvdimm sysfs tree (buses, DIMMs, regions, namespaces, "
               "pfn/dax/btt devices) and the matching /dev/pmemN and /dev/daxR.M device files from a FUSE file "
               "system, so that the real ndctl and daxctl run against it (through `vnvdimm run`) without NVDIMM "
               "hardware. It emulates the asynchronous, multithreaded memmap initialization of pfn/dax devices.")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help_of(parser: argparse.ArgumentParser, name: str) -> str:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if choice.dest == name:
                    return choice.help or ""
    return ""


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings]


def _positionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]


# ---------------------------------------------------------------- man

def _roff(text: str) -> str:
    """Text for a roff line: backslashes and hyphens escaped, no line starting with a dot."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return ("\\&" + out) if out.startswith((".", "'")) else out


def _option_label(action: argparse.Action) -> str:
    names = ", ".join(f"\\fB{_roff(o)}\\fR" for o in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or (action.dest.upper() if not action.choices else "|".join(action.choices))
    return f"{names} \\fI{_roff(str(metavar))}\\fR"


def man_page(parser: argparse.ArgumentParser, version: str) -> str:
    lines = [f'.TH VNVDIMM 1 "{datetime.date.today():%Y-%m-%d}" "vnvdimm {_roff(version)}" "User Commands"',
             ".SH NAME", "vnvdimm \\- emulated Linux persistent memory (libnvdimm sysfs, pmem and dax devices) "
             "over FUSE", ".SH SYNOPSIS", ".B vnvdimm", "\\fICOMMAND\\fR [\\fIOPTIONS\\fR]", ".br",
             ".B vnvdimm", "\\fB\\-\\-version\\fR", ".SH DESCRIPTION", _roff(DESCRIPTION), ".SH COMMANDS"]
    for name, sub in _subparsers(parser).items():
        usage = " ".join(sub.format_usage().split())
        usage = usage.removeprefix("usage: ")
        lines += [f'.SS "{_roff(usage)}"', _roff(sub.description or _help_of(parser, name))]
        for action in _positionals(sub):
            metavar = str(action.metavar or action.dest)
            text = action.help or POSITIONAL_HELP.get(metavar) or (
                "one of " + ", ".join(action.choices) if action.choices else "")
            lines += [".TP", f"\\fI{_roff(metavar)}\\fR", _roff(text)]
        for action in _options(sub):
            if "-h" in action.option_strings:
                continue
            lines += [".TP", _option_label(action), _roff(action.help or "")]
    lines += [".SH FILES", ".TP", "\\fI$XDG_DATA_HOME/vnvdimm\\fR (default \\fI~/.local/share/vnvdimm\\fR)",
              "The state dir: platform.json, the media files, label areas and vnvdimm.log.",
              ".SH SEE ALSO", "\\fBndctl\\fR(1), \\fBdaxctl\\fR(1), \\fBfusermount3\\fR(1); the documentation of the "
              "source (README.md, docs/tutorial.md, docs/tools.md, docs/config.md), installed by mountscripts/install "
              "in \\fIPREFIX/share/doc/vnvdimm\\fR."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- completion

BASH = r'''# bash completion for vnvdimm (generated by `vnvdimm completion bash`)
_vnvdimm() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}
    local cmd= i w
    local -a args=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${COMP_WORDS[i]}
        if [[ -z $cmd ]]; then
            [[ $w == -* ]] || cmd=$w
        elif [[ $w != -* ]]; then
            args+=("$w")
        fi
    done
    if [[ -z $cmd ]]; then
        COMPREPLY=($(compgen -W "@COMMANDS@ --help --version" -- "$cur"))
        return
    fi
    case $prev in
        @PATH_OPTIONS@) COMPREPLY=($(compgen -f -- "$cur")); return ;;
    esac
    local opts=
    case $cmd in
@OPTIONS@
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts --help" -- "$cur"))
    elif [[ ${#args[@]} -eq 0 ]]; then
        case $cmd in
            completion) COMPREPLY=($(compgen -W "bash zsh" -- "$cur")) ;;
            man|preload-path) ;;
            *) COMPREPLY=($(compgen -d -- "$cur")) ;;
        esac
    else
        case $cmd in
            @DEVICE_COMMANDS@)
                local devices=${args[0]}/sys/bus/nd/devices
                [[ -d $devices ]] && COMPREPLY=($(compgen -W "$(ls "$devices" 2>/dev/null)" -- "$cur")) ;;
            run) COMPREPLY=($(compgen -c -- "$cur")) ;;
        esac
    fi
}
complete -F _vnvdimm vnvdimm
'''


def completion(parser: argparse.ArgumentParser, shell: str) -> str:
    subs = _subparsers(parser)
    cases = []
    for name, sub in subs.items():
        opts = " ".join(o for a in _options(sub) for o in a.option_strings if o not in ("-h", "--help"))
        cases.append(f"        {name}) opts={shlex.quote(opts)} ;;")
    script = (BASH.replace("@COMMANDS@", " ".join(subs))
              .replace("@PATH_OPTIONS@", "|".join(sorted(PATH_OPTIONS)))
              .replace("@DEVICE_COMMANDS@", "|".join(sorted(DEVICE_COMMANDS)))
              .replace("@OPTIONS@", "\n".join(cases)))
    if shell == "zsh":
        # zsh runs bash completion functions through bashcompinit.
        return ("#compdef vnvdimm\n# zsh completion for vnvdimm (generated by `vnvdimm completion zsh`)\n"
                "autoload -U +X bashcompinit && bashcompinit\n" + script)
    return script
