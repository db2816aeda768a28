"""The man page and the shell completion are generated from the argument parsers: every command
and option is in them, the page renders, and bash completes commands, options, paths and the
devices of a mount as a user types them."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from tooltest import VNVDIMM, clean_env

from vnvdimm import cli


def vnvdimm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VNVDIMM, *args], capture_output=True, text=True, timeout=60, env=clean_env())


def every_option() -> dict[str, list[str]]:
    parser = cli.build_parser()
    return {name: [o for a in sub._actions for o in a.option_strings if o not in ("-h", "--help")]
            for name, sub in cli.subcommands(parser).choices.items()}


def test_help_points_at_the_docs() -> None:
    res = vnvdimm("--help")
    assert res.returncode == 0 and "man vnvdimm" in res.stdout and "docs/tutorial.md" in res.stdout
    assert "vnvdimm completion bash" in res.stdout


def test_the_man_page_names_every_command_and_option() -> None:
    res = vnvdimm("man")
    assert res.returncode == 0, res.stderr
    page = res.stdout
    assert page.startswith(".TH VNVDIMM 1 ")
    for command, options in every_option().items():
        assert f'.SS "vnvdimm {command}'.replace("-", "\\-") in page, command
        for option in options:
            assert option.replace("-", "\\-") in page, (command, option)
    if shutil.which("groff") is not None:
        rendered = subprocess.run(["groff", "-man", "-Tutf8", "-ww"], input=page, capture_output=True, text=True,
                                  timeout=60)
        assert rendered.returncode == 0 and rendered.stderr == "", rendered.stderr
        assert "inject-error" in rendered.stdout.replace("\u2010", "-")


def complete(line: str, shell_script: str, cwd: str | None = None) -> list[str]:
    """What bash's completion offers for `line` (the cursor at its end) with the script loaded."""
    words = line.split(" ")
    program = (shell_script + "\nCOMP_WORDS=(" + " ".join(f"'{w}'" for w in words) + ")\n"
               f"COMP_CWORD={len(words) - 1}\n_vnvdimm\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    res = subprocess.run(["bash", "--norc", "-c", program], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert res.returncode == 0, res.stderr
    return sorted(w for w in res.stdout.splitlines() if w)


@pytest.fixture(scope="module")
def bash_script() -> str:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    res = vnvdimm("completion", "bash")
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_bash_completes_commands_and_options(bash_script: str, tmp_path) -> None:
    assert complete("vnvdimm st", bash_script) == ["status"]
    assert complete("vnvdimm i", bash_script) == ["inject-error"]
    assert set(complete("vnvdimm ", bash_script)) == {*every_option(), "--help", "--version"}
    for command, options in every_option().items():
        assert set(options) <= set(complete(f"vnvdimm {command} -", bash_script)), command
    assert complete("vnvdimm mount --st", bash_script) == ["--state-dir"]
    assert complete("vnvdimm completion ", bash_script) == ["bash", "zsh"]
    (tmp_path / "lab.toml").write_text("")
    (tmp_path / "mnt").mkdir()
    assert complete("vnvdimm mount --config la", bash_script, cwd=str(tmp_path)) == ["lab.toml"]
    assert complete("vnvdimm mount m", bash_script, cwd=str(tmp_path)) == ["mnt"]  # directories only


def test_bash_completes_the_devices_of_the_mount_named(bash_script: str, mnt) -> None:  # type: ignore[no-untyped-def]
    assert complete(f"vnvdimm inject-error {mnt.root} name", bash_script) == ["namespace0.0", "namespace1.0"]
    assert "dax1.0" in complete(f"vnvdimm wait {mnt.root} --timeout 5 d", bash_script)


def test_zsh_loads_the_completion(tmp_path) -> None:
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed")
    script = tmp_path / "_vnvdimm"
    script.write_text(vnvdimm("completion", "zsh").stdout)
    res = subprocess.run(["zsh", "-f", "-c", f"autoload -U compinit && compinit -u && source {script} && "
                                             "print -r -- ${_comps[vnvdimm]}"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "_bash_complete -F _vnvdimm", res.stdout + res.stderr


def test_completion_needs_a_shell_it_knows() -> None:
    res = vnvdimm("completion", "fish")
    assert res.returncode == 2 and "invalid choice" in res.stderr
