"""contrib/mplaunch@.service keeps what re-attach needs from systemd: a
crash-restart of mplaunch must find the VM's holder, QEMU and emulators
still running and its run folder still there, and take them over rather
than boot the guest again (docs/recovery.md, "When mplaunch dies")."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "contrib" / "mplaunch@.service"


def unit_sections(text: str) -> dict[str, dict[str, list[str]]]:
    """Each section's settings, every value of a key in order (systemd lets
    a key repeat). Comments and blank lines are skipped; a line ending in a
    backslash goes on on the next one."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"a setting before any section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a setting: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service() -> dict[str, list[str]]:
    return unit_sections(UNIT.read_text())["Service"]


def test_the_parser_reads_repeated_keys_and_continued_lines() -> None:
    parsed = unit_sections("# c\n[Service]\nA=1\n; c\nA=2\nB=x \\\n  y\n")
    assert parsed == {"Service": {"A": ["1", "2"], "B": ["x y"]}}


def test_only_mplaunch_is_signalled_so_a_restart_reattaches() -> None:
    # The default (control-group) would SIGTERM the holder and, through its
    # parent-death signal, QEMU and the emulators whenever mplaunch exits.
    s = service()
    assert s["KillMode"] == ["process"]
    assert s["Restart"] == ["on-failure"]
    # mplaunch stops the VM in order on SIGTERM; it is the only process told.
    assert s.get("KillSignal", ["SIGTERM"]) == ["SIGTERM"]


def test_the_run_folder_outlives_a_restart() -> None:
    # A RuntimeDirectory= is removed when the unit stops, a crash-restart
    # included, unless preserved: the holder's socket and vm-state.json live
    # in the run folder.
    s = service()
    if "RuntimeDirectory" in s:
        assert s.get("RuntimeDirectoryPreserve") in (["yes"], ["restart"]), s


def test_mplaunch_is_the_main_process_and_the_only_one_that_notifies() -> None:
    # The holder, QEMU and the emulators share the unit's cgroup; only
    # mplaunch's READY=1 and watchdog pings count.
    s = service()
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    (start,) = s["ExecStart"]
    argv = start.split()
    assert Path(argv[0].lstrip("-@:+!")).name == "mplaunch", start
    # --backends-only VMs are never re-attached (docs/recovery.md).
    assert "--backends-only" not in argv
    assert argv[-1] == "/etc/mplaunch/%i.toml"


def test_the_section_the_unit_points_to_exists() -> None:
    comments = " ".join(line.lstrip("#").strip() for line in UNIT.read_text().splitlines())
    assert 'docs/recovery.md, "When mplaunch dies"' in comments
    headings = [line for line in (REPO / "docs" / "recovery.md").read_text().splitlines()
                if line.startswith("#")]
    assert "## When mplaunch dies" in headings
