"""mpctl's parsing and rendering (the live-socket paths are in the integration tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher import mpctl


def test_vm_names_and_paths(tmp_path: Path) -> None:
    assert mpctl.socket_path("demo", tmp_path) == tmp_path / "demo" / "mplaunch.sock"
    assert mpctl.socket_path("./x.sock", tmp_path) == Path("./x.sock")


def test_find_vms_lists_folders_with_a_socket(tmp_path: Path) -> None:
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mplaunch.sock").touch()
    (tmp_path / "empty").mkdir()
    assert mpctl.find_vms(tmp_path) == [("a", tmp_path / "a" / "mplaunch.sock"),
                                        ("b", tmp_path / "b" / "mplaunch.sock")]
    assert mpctl.find_vms(tmp_path / "missing") == []


def test_table_alignment_and_empty_cells() -> None:
    text = mpctl.format_table([{"a": "x", "b": None}, {"a": "longer", "b": [1, 2]}],
                              [("A", "a"), ("B", "b")])
    assert text == "A       B\nx       -\nlonger  1,2\n"


def test_emulators_and_disks_render() -> None:
    text = mpctl.render_emulators([{"id": "e", "kind": "lsi", "pid": 1, "uid": 1001,
                                    "state": "running",
                                    "uptime_s": 3725, "restarts": 2, "last_exit": "SIGKILL",
                                    "controllers": ["c0", "c1"], "disks": [],
                                    "heartbeat_rtt_ms": 0.25, "inflight": 0,
                                    "version": "0.1.0"}])
    assert text.splitlines()[1].split() == ["e", "lsi", "1", "1001", "running", "1:02:05", "2",
                                            "SIGKILL", "c0,c1", "-", "0.2", "0", "0.1.0"]
    disks = mpctl.render_disks([{"id": "d", "controller": "c", "lun": 1, "size": 3 << 30,
                                 "readonly": True, "block_size": 4096, "emulator": "e",
                                 "image": "/i"}])
    assert disks.splitlines()[1].split() == ["d", "c", "1", "3G", "yes", "4096", "e", "/i"]


def test_event_lines() -> None:
    line = mpctl.render_event({"event": "EMULATOR_EXIT", "data": {
        "id": "e", "pid": 9, "signal": "SIGKILL", "status": None, "reason": "killed after hang"},
        "timestamp": {"seconds": 0, "microseconds": 5}})
    assert line == ('1970-01-01T00:00:00.000005Z EMULATOR_EXIT id=e pid=9 signal=SIGKILL '
                    'status=- reason="killed after hang"\n')
    assert mpctl.render_event({"event": "STOP"}) == "STOP\n"


@pytest.mark.parametrize(("argv", "command", "arguments"), [
    (["status", "vm"], "query-status", None),
    (["emulators", "vm"], "query-emulators", None),
    (["disks", "vm"], "query-disks", None),
    (["quit", "vm"], "quit", None),
    (["restart", "vm", "e0"], "emulator-restart", {"id": "e0"}),
    (["disk-remove", "vm", "d1"], "disk-remove", {"id": "d1"}),
    (["disk-resize", "vm", "d1", "2G"], "disk-resize", {"id": "d1", "size": "2G"}),
    (["disk-resize", "vm", "d1", "4096"], "disk-resize", {"id": "d1", "size": 4096}),
    (["disk-add", "vm", "d2", "--controller", "c", "--lun", "2", "--image", "/x.img",
      "--block-size", "4096"], "disk-add",
     {"id": "d2", "controller": "c", "lun": 2, "image": "/x.img", "readonly": False,
      "block_size": 4096}),
])
def test_subcommands_map_to_qmp(argv: list[str], command: str,
                                arguments: dict[str, object] | None) -> None:
    args = mpctl.build_parser().parse_args(argv)
    assert mpctl._request(args) == (command, arguments)


def test_relative_images_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    monkeypatch.chdir(tmp_path)
    args = mpctl.build_parser().parse_args(
        ["disk-add", "vm", "d2", "--controller", "c", "--lun", "2", "--image", "x.img"])
    assert mpctl._request(args)[1]["image"] == str(tmp_path / "x.img")  # type: ignore[index]


def test_usage_mistakes_exit_2() -> None:
    with pytest.raises(SystemExit) as info:
        mpctl.main(["disk-add", "vm", "d2", "--lun", "x"])
    assert info.value.code == 2
