"""The trust boundary in code: what an emulator may import from the launcher.

The launcher and the emulators share three wire formats: the state-store
layout, the control-channel protocol and the seccomp profiles (with the
module that compiles them). Those are leaves: they import the standard
library only (and libseccomp's binding, for the compiler), never
``emulators`` nor another ``launcher`` module. An emulator imports nothing
else of ``launcher``. The launcher may import ``emulators`` (its limits,
its exit codes): the rule binds the side that runs confined.

Read from the source tree with ast, every import counted, those inside
functions too. tests/integration/test_emulator_imports.py checks the same
rule on a real interpreter's sys.modules.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LEAVES = frozenset({
    "launcher.statestore.layout",
    "launcher.statestore.liveness",
    "launcher.heartbeat.protocol",
    "launcher.sandbox.profiles",
    "launcher.sandbox.seccomp",
})
#: Packages a leaf's import runs the __init__ of: they must import nothing.
LEAF_PACKAGES = frozenset({"launcher", "launcher.statestore", "launcher.heartbeat",
                           "launcher.sandbox"})
#: Beyond the standard library, what a leaf may load.
THIRD_PARTY = {"launcher.sandbox.seccomp": {"pyseccomp"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources(package: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def imports(name: str, path: Path) -> set[str]:
    """Every module `path` imports, absolute, at any depth of its code."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            if prefix == "__future__":
                continue
            out.add(prefix)
            # "from pkg import mod" may name a submodule
            out.update(f"{prefix}.{alias.name}" for alias in node.names)
    return out


def project(modules: set[str], known: set[str]) -> set[str]:
    return {m for m in modules if m in known}


def test_the_leaves_import_the_standard_library_only() -> None:
    known = set(sources("launcher")) | set(sources("emulators"))
    for leaf in LEAVES | LEAF_PACKAGES:
        path = sources(leaf.split(".")[0])[leaf]
        found = imports(leaf, path)
        assert not project(found, known), f"{leaf} imports {sorted(project(found, known))}"
        foreign = {m.split(".")[0] for m in found} - set(sys.stdlib_module_names)
        foreign -= {"launcher", "emulators"}  # names of `from x import y` resolved above
        assert foreign <= THIRD_PARTY.get(leaf, set()), f"{leaf} imports {sorted(foreign)}"


def test_the_leaf_packages_run_nothing_on_import() -> None:
    for package in LEAF_PACKAGES:
        path = sources("launcher")[package]
        tree = ast.parse(path.read_text())
        assert not [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)], package


def test_emulators_import_only_the_leaves_of_the_launcher() -> None:
    launcher = set(sources("launcher"))
    for name, path in sources("emulators").items():
        used = project(imports(name, path), launcher) - LEAF_PACKAGES
        assert used <= LEAVES, f"{name} imports {sorted(used - LEAVES)}"


def test_the_checker_sees_a_violation() -> None:
    """The rule's own test: a relative import and one inside a function count."""
    tree_imports = imports("launcher.statestore.layout", ROOT / "launcher/statestore/layout.py")
    assert "struct" in tree_imports
    sample = ROOT / "launcher/sandbox/jail.py"
    assert "launcher.sandbox.seccomp" in imports("launcher.sandbox.jail", sample)
