"""What vnvdimm's FUSE loop (vnvdimm/fuse/libfuse.py) takes from mfusepy beyond its documented
API: the loop stands in for mfusepy.FUSE's constructor, so every private member it relies on
must still be there, and every attribute that constructor sets for the binding's callback
wrappers must be set by the loop too. A failure here names the member: check the new
mfusepy against libfuse.py before widening pyproject.toml's bound."""

from __future__ import annotations

import ast
import inspect
import textwrap
from importlib.metadata import version
from pathlib import Path

import mfusepy

from vnvdimm.fuse import libfuse

VERSION = version("mfusepy")
BOUND_HINT = "vnvdimm.fuse.libfuse relies on it: check the new mfusepy before widening pyproject.toml's bound"


def assigned_attributes(function: object) -> set[str]:
    """The names `self.X = ...` assigns in a function's source (plain and tuple targets)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))  # type: ignore[arg-type]
    names: set[str] = set()
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            for leaf in target.elts if isinstance(target, ast.Tuple) else [target]:
                if isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name) and leaf.value.id == "self":
                    names.add(leaf.attr)
    return names


def test_every_private_member_the_loop_names_exists() -> None:
    fuse_init_sets = assigned_attributes(mfusepy.FUSE.__init__)
    missing = []
    for member in libfuse.MFUSEPY_PRIVATE_MEMBERS:
        owner_name, _, attr = member.rpartition(".")
        owner = getattr(mfusepy, owner_name) if owner_name else mfusepy
        if not (hasattr(owner, attr) or (owner is mfusepy.FUSE and attr in fuse_init_sets)):
            missing.append(member)
    assert not missing, f"mfusepy {VERSION} lacks {missing}: {BOUND_HINT}"


def test_the_loop_sets_what_the_binding_constructor_sets() -> None:
    """The binding's callback wrappers (getattr_fuse_3, readdir, ...) read what FUSE.__init__
    sets on the instance; the loop replaces that constructor, so it must set each one. (The
    name-mangled critical-exception slot is only read by the binding's _wrapper, which the
    loop replaces with its own.)"""
    needed = {name for name in assigned_attributes(mfusepy.FUSE.__init__) if not name.startswith("__")}
    named = {m.removeprefix("FUSE.") for m in libfuse.MFUSEPY_PRIVATE_MEMBERS if m.startswith("FUSE.")}
    set_by_loop = assigned_attributes(libfuse.Loop.__init__)
    assert needed <= named, f"mfusepy {VERSION}'s FUSE.__init__ now sets {needed - named}: {BOUND_HINT}"
    assert needed <= set_by_loop, f"Loop.__init__ does not set {needed - set_by_loop} (mfusepy's FUSE.__init__ does)"


def test_the_shapes_the_loop_uses() -> None:
    assert mfusepy.fuse_version_major == 3, "the loop registers the binding's *_fuse_3 wrappers"
    fields = {name for name, *_ in mfusepy.fuse_operations._fields_}
    direct = set(libfuse._DIRECT_CALLBACKS)
    assert direct <= fields, f"struct fuse_operations lacks {direct - fields}: {BOUND_HINT}"
    assert hasattr(mfusepy.fuse_file_info, "fh") and hasattr(mfusepy.fuse_context, "fuse"), BOUND_HINT
    assert dict(mfusepy.FUSE.OPTIONS).get("foreground") == "-f", BOUND_HINT
    options = list(mfusepy.FUSE._normalize_fuse_options(attr_timeout=1.5, negative_timeout=0, debug=True))
    assert options == ["attr_timeout=1.5", "negative_timeout=0", "debug"], BOUND_HINT
    for name in fields - direct - {"init"}:  # the binding's wrapper for every other callback
        wrapper = getattr(mfusepy.FUSE, name + "_fuse_3", None) or getattr(mfusepy.FUSE, name, None)
        assert wrapper is not None or not hasattr(mfusepy.Operations, name), \
            f"mfusepy.FUSE has no wrapper for {name}: {BOUND_HINT}"


def test_the_installed_version_is_within_the_bound() -> None:
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert '"mfusepy>=3.1.1,<3.2"' in pyproject
    release = tuple(int(part) for part in VERSION.split(".")[:3])
    assert (3, 1, 1) <= release < (3, 2), f"mfusepy {VERSION} is outside the bound tested"
