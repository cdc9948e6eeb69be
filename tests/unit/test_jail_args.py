"""The jail's command line and its choice of how to run COMMAND (no process
is started: the confining steps themselves are proven in
tests/integration/test_sandbox_hostile.py and test_qemu_unprivileged.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from launcher.sandbox.jail import UNLIMITED, JailError, JailSpec, load_program, parse


@pytest.mark.parametrize("spec", [
    JailSpec(64000, 64000, (5, 7), 1 << 31),
    JailSpec(64001, 64002, (), 1 << 30, new_root=True),
    JailSpec(64003, 64003, (9,), UNLIMITED, nproc=1024, dev=("null", "kvm"),
             view=("/usr", "/lib")),
    JailSpec(64004, 64004, (3, 4), 1 << 32, nproc=128, dev=("null",), view=("/usr",),
             no_spawn=True),
])
def test_the_command_line_carries_every_setting(spec: JailSpec) -> None:
    argv = spec.argv(["/usr/bin/true", "--x"])
    assert argv[:4] == [sys.executable, "-I", "-m", "launcher.sandbox.jail"]
    assert parse(argv[4:]) == (spec, ["/usr/bin/true", "--x"])


def test_no_spawn_is_a_flag_and_off_by_default() -> None:
    argv = JailSpec(64000, 64000, (), 1, no_spawn=True).argv(["/bin/true"])
    assert argv[argv.index("--") - 1] == "--no-spawn"
    assert "--no-spawn" not in JailSpec(64000, 64000, (), 1).argv(["/bin/true"])
    assert not parse(JailSpec(64000, 64000, (), 1).argv(["/bin/true"])[4:])[0].no_spawn


def test_root_is_refused_by_the_parser() -> None:
    with pytest.raises(JailError, match="root"):
        parse(JailSpec(0, 0, (), 1).argv(["/bin/true"])[4:])


def test_only_this_interpreter_runs_in_process() -> None:
    """--new-root runs COMMAND in the jail's interpreter: anything else is refused."""
    with pytest.raises(JailError, match="runs only"):
        load_program(["/bin/sh", "-c", "true"])
    with pytest.raises(JailError, match="runs only"):
        load_program([sys.executable, "-m", "emulators"])  # not isolated


def test_a_module_is_loaded_with_its_main_code() -> None:
    program = load_program([sys.executable, "-I", "-m", "emulators", "CONFIG", "on"])
    assert program.argv[1:] == ["CONFIG", "on"]
    assert program.argv[0].endswith("emulators/__main__.py")
    assert "emulators.process" in sys.modules  # loaded before the root goes away


def test_a_script_is_compiled_and_its_imports_loaded(tmp_path: Path) -> None:
    script = tmp_path / "payload.py"
    script.write_text("import colorsys\n\ndef f():\n    from json import decoder\n")
    program = load_program([sys.executable, "-I", str(script), "a"])
    assert program.argv == [str(script), "a"] and program.spec is None
    assert "colorsys" in sys.modules and "json.decoder" in sys.modules
