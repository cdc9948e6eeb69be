"""The VM spec: the bad-spec corpus, good specs, path resolution, sizes, fuzzing."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.sizes import format_size, parse_size
from launcher.spec import (
    Accel,
    EmulatorKind,
    GiveUpAction,
    RestartMode,
    SandboxMode,
    Spec,
    SpecError,
    load_spec,
    parse_spec,
    render_value,
)

REPO = Path(__file__).resolve().parents[2]
SPECS = REPO / "tests" / "specs"
IMAGES = SPECS / "images"
BAD = sorted((SPECS / "bad").glob("*.toml"))
EXPECT = "# expect: "


def expected_lines(path: Path) -> list[str]:
    text = path.read_bytes().decode("utf-8", errors="replace")
    return [line[len(EXPECT):] for line in text.splitlines() if line.startswith(EXPECT)]


def problems_of(path: str | Path) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return list(info.value.problems)


# --- the bad-spec corpus ---------------------------------------------------------


def test_bad_corpus_is_large_enough() -> None:
    assert len(BAD) >= 30


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_spec(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = expected_lines(path)
    assert expected, f"{path} has no '{EXPECT}' line"
    monkeypatch.chdir(REPO)
    got = problems_of(path.relative_to(REPO).as_posix())
    assert len(got) == len(set(got)), "a problem was reported twice"
    assert set(got) == set(expected)


def test_every_problem_is_reported_in_file_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    path = "tests/specs/bad/many_problems.toml"
    assert problems_of(path) == expected_lines(REPO / path)


def test_spec_error_str_is_one_line_per_problem() -> None:
    error = SpecError(["a.toml: one", "a.toml: two"])
    assert str(error) == "a.toml: one\na.toml: two"
    assert error.problems == ("a.toml: one", "a.toml: two")


def test_unreadable_file_is_one_problem(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert problems_of(missing) == [f"{missing}: cannot read: No such file or directory"]


def test_duplicate_key_is_a_syntax_problem(tmp_path: Path) -> None:
    spec = tmp_path / "dup.toml"
    spec.write_text('[vm]\nname = "a"\nname = "b"\n')
    (line,) = problems_of(spec)
    assert line.startswith(f"{spec}: Cannot overwrite a value")


def test_non_table_document_is_a_problem() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec([1, 2], Path("x.toml"))  # type: ignore[arg-type]
    assert info.value.problems == ("x.toml: document: must be a TOML table",)


# --- good specs ------------------------------------------------------------------


def test_full_spec_sets_every_field() -> None:
    spec = load_spec(SPECS / "good" / "full.toml")
    good = SPECS / "good"
    assert spec.path == good / "full.toml"
    vm = spec.vm
    assert (vm.name, vm.memory, vm.cpus, vm.accel) == ("full-vm", 1 << 30, 4, Accel.TCG)
    assert vm.kernel == IMAGES / "vmlinuz"
    assert vm.initrd == IMAGES / "initrd.img"
    assert vm.append == "console=ttyS0 quiet"
    assert vm.console == str(IMAGES / "console.log")
    assert vm.run_dir == good / "run"
    assert vm.uid_range == (70000, 70099)
    assert vm.sandbox is SandboxMode.LOG

    first, second = spec.emulators
    assert dataclasses.astuple(first) == (
        "disk-proc", EmulatorKind.SCSI, RestartMode.ALWAYS, 250, 1000, 3, 30,
        GiveUpAction.POWEROFF)
    assert dataclasses.astuple(second) == (
        "lsi_proc", EmulatorKind.LSI, RestartMode.NEVER, 10, 50, 0, 1,
        GiveUpAction.PAUSE)

    assert [c.id for c in spec.controllers_of("disk-proc")] == ["scsi0", "scsi1"]
    assert spec.controller("scsi0").queues == 4
    assert [d.id for d in spec.disks_of("scsi0")] == ["d0", "d1"]
    d0, d1 = spec.disk("d0"), spec.disk("d1")
    assert (d0.lun, d0.image, d0.format, d0.readonly, d0.block_size) == (
        0, IMAGES / "one-block.img", "raw", False, 512)
    assert (d1.lun, d1.image, d1.readonly, d1.block_size) == (
        255, IMAGES / "four-k.img", True, 4096)
    assert spec.emulator("lsi_proc") is second
    with pytest.raises(KeyError):
        spec.emulator("nope")
    with pytest.raises(KeyError):
        spec.controller("nope")


def test_minimal_spec_takes_every_default() -> None:
    spec = load_spec(SPECS / "good" / "minimal.toml")
    vm = spec.vm
    assert vm.name == "minimal"
    assert vm.memory == 512 * 1024 * 1024
    assert vm.cpus == 1
    assert vm.accel is Accel.AUTO
    assert (vm.kernel, vm.initrd, vm.append, vm.console) == (None, None, "", "stdio")
    assert vm.run_dir == Path("/run/mplaunch/minimal")
    assert vm.uid_range == (64000, 64999)
    assert vm.sandbox is SandboxMode.ON
    assert (spec.emulators, spec.controllers, spec.disks) == ((), (), ())


def test_entry_defaults(tmp_path: Path) -> None:
    (tmp_path / "d.img").write_bytes(bytes(1024))
    spec = parse_spec({
        "vm": {"name": "x", "console": "none"},
        "emulator": [{"id": "e"}],
        "controller": [{"id": "c", "emulator": "e"}],
        "disk": [{"id": "d", "controller": "c", "lun": 3, "image": "d.img"}],
    }, tmp_path / "vm.toml")
    assert spec.vm.console == "none"
    assert dataclasses.astuple(spec.emulators[0]) == (
        "e", EmulatorKind.SCSI, RestartMode.ON_FAILURE, 500, 2000, 5, 60, GiveUpAction.PAUSE)
    assert spec.controllers[0].queues == 1
    disk = spec.disks[0]
    assert (disk.format, disk.readonly, disk.block_size) == ("raw", False, 512)


def test_spec_is_frozen() -> None:
    spec = load_spec(SPECS / "good" / "minimal.toml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.vm.cpus = 2  # type: ignore[misc]
    assert not hasattr(spec.vm, "__dict__")  # slotted


def test_block_device_image_is_accepted(tmp_path: Path) -> None:
    devices = [entry.path for entry in os.scandir("/dev")
               if stat.S_ISBLK(os.stat(entry.path).st_mode)]
    if not devices:
        pytest.skip("this host has no block device under /dev")
    spec = parse_spec({
        "vm": {"name": "x"},
        "emulator": [{"id": "e"}],
        "controller": [{"id": "c", "emulator": "e"}],
        "disk": [{"id": "d", "controller": "c", "lun": 0, "image": devices[0],
                  "block_size": 4096}],
    }, tmp_path / "vm.toml")
    assert spec.disks[0].image == Path(devices[0]).resolve()


def test_example_demo_spec_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/demo.toml validates, except for guest files scripts/setup builds."""
    monkeypatch.chdir(REPO)
    demo = "examples/demo.toml"
    try:
        spec = load_spec(demo)
    except SpecError as error:
        for line in error.problems:
            assert line.startswith(f"{demo}: [vm] ") and '= "../build/' in line, line
            assert line.endswith(": no such file"), line
    else:
        assert spec.vm.name == "demo"


# --- relative paths --------------------------------------------------------------


def write_spec_with_image(folder: Path) -> Path:
    (folder / "disks").mkdir(parents=True)
    (folder / "disks" / "a.img").write_bytes(bytes(4096))
    (folder / "logs").mkdir()
    spec = folder / "vm.toml"
    spec.write_text(
        '[vm]\nname = "rel"\nconsole = "logs/console.txt"\nrun_dir = "run"\n'
        '[[emulator]]\nid = "e"\n[[controller]]\nid = "c"\nemulator = "e"\n'
        '[[disk]]\nid = "d"\ncontroller = "c"\nlun = 0\nimage = "disks/a.img"\n')
    return spec


def test_relative_paths_are_relative_to_the_spec_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec_path = write_spec_with_image(tmp_path / "vmdir")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    by_relative = load_spec("../vmdir/vm.toml")
    by_absolute = load_spec(spec_path)
    assert by_relative == by_absolute
    folder = spec_path.parent.resolve()
    assert by_relative.path == folder / "vm.toml"
    assert by_relative.disks[0].image == folder / "disks" / "a.img"
    assert by_relative.vm.console == str(folder / "logs" / "console.txt")
    assert by_relative.vm.run_dir == folder / "run"


def test_relative_path_problems_quote_the_path_as_given(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec_path = write_spec_with_image(tmp_path / "vmdir")
    (spec_path.parent / "disks" / "a.img").unlink()
    monkeypatch.chdir(tmp_path)
    assert problems_of("vmdir/vm.toml") == [
        'vmdir/vm.toml: [[disk]] #0 (id "d") image = "disks/a.img": no such file']


def test_absolute_image_path_is_kept(tmp_path: Path) -> None:
    image = tmp_path / "abs.img"
    image.write_bytes(bytes(512))
    spec = parse_spec({
        "vm": {"name": "x"},
        "emulator": [{"id": "e"}],
        "controller": [{"id": "c", "emulator": "e"}],
        "disk": [{"id": "d", "controller": "c", "lun": 0, "image": str(image)}],
    }, Path("/nonexistent/vm.toml"))
    assert spec.disks[0].image == image.resolve()


# --- sizes and value rendering ----------------------------------------------------


@pytest.mark.parametrize(("text", "size"), [
    ("0", 0), ("1", 1), ("512", 512), ("4K", 4096), ("4k", 4096), ("512M", 512 << 20),
    ("1G", 1 << 30), ("2T", 2 << 40), ("0010M", 10 << 20), (1048576, 1 << 20), (0, 0),
])
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", [
    "", "M", "1.5G", "-1", "12MB", "1 G", " 1G", "1G ", "1P", "1_000", "0x10", "1" * 21,
    -1, True, None, 1.0, [1],
])
def test_parse_size_rejects(text: Any) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_format_size() -> None:
    assert [format_size(n) for n in (0, 1, 1024, 64 << 20, 1 << 40, 1536)] == [
        "0", "1", "1K", "64M", "1T", "1536"]


def test_render_value_is_toml_style() -> None:
    assert render_value("a\"b\\c\n\x01") == '"a\\"b\\\\c\\n\\u0001"'
    assert render_value(True) == "true"
    assert render_value(False) == "false"
    assert render_value(-3) == "-3"
    assert render_value(float("inf")) == "inf"
    assert render_value([1, "x", [True]]) == '[1, "x", [true]]'
    assert render_value({"a": 1, "b c": []}) == '{ a = 1, "b c" = [] }'
    assert render_value(list(range(20))) == "[0, 1, 2, 3, 4, 5, 6, 7, ...]"
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    assert render_value(deep) == "[[[[...]]]]"


# --- fuzzing: any TOML-shaped input gives a Spec or a SpecError ---------------------

KEYS = ["vm", "emulator", "controller", "disk", "name", "memory", "cpus", "accel", "kernel",
        "initrd", "append", "console", "run_dir", "uid_range", "sandbox", "id", "kind",
        "restart", "heartbeat_ms", "hang_timeout_ms", "restart_burst", "restart_window_s",
        "on_give_up", "emulator", "queues", "controller", "lun", "image", "format",
        "readonly", "block_size", "x"]
WORDS = ["", "e", "c", "d", "demo", "scsi", "lsi", "tcg", "stdio", "none", "raw",
         "512M", "1G", "64000-64999", "65000-66000", "../images/one-block.img",
         "../images/odd.img", "../images", "\0", "on", "pause", "always", "-x", "A"]
scalars = st.one_of(
    st.booleans(), st.integers(min_value=-5, max_value=5000),
    st.sampled_from([512, 4096, -(2**70), 2**64, 2**31, 0.0, 1.5, float("nan")]),
    st.sampled_from(WORDS), st.text(alphabet="ab-_\n\"\\\0\x7f", max_size=4))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    max_leaves=8)
tables = st.dictionaries(st.sampled_from(KEYS), values, max_size=8)
arrays = st.lists(tables, max_size=3) | values
documents = st.fixed_dictionaries({}, optional={
    "vm": tables | values, "emulator": arrays, "controller": arrays, "disk": arrays,
    "a b": tables | arrays})


@settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_parse_spec_never_raises_anything_else(data: dict[str, Any]) -> None:
    where = SPECS / "good" / "fuzz.toml"
    try:
        result = parse_spec(data, where)
    except SpecError as error:
        assert error.problems
        assert all(line.startswith(f"{where}: ") for line in error.problems)
        assert all("\n" not in line for line in error.problems)
    else:
        assert isinstance(result, Spec)


VALID: dict[str, Any] = {
    "vm": {"name": "fz", "kernel": "../images/vmlinuz", "append": "quiet"},
    "emulator": [{"id": "e0"}, {"id": "e1"}],
    "controller": [{"id": "c0", "emulator": "e0"}, {"id": "c1", "emulator": "e1"}],
    "disk": [{"id": "d0", "controller": "c0", "lun": 0, "image": "../images/one-block.img"},
             {"id": "d1", "controller": "c1", "lun": 0, "image": "../images/four-k.img",
              "block_size": 4096}],
}
PLACES = [("vm", None)] + [(kind, i) for kind in ("emulator", "controller", "disk")
                           for i in (0, 1)]


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(PLACES), st.sampled_from(KEYS), values)
def test_one_changed_field_gives_a_spec_or_problems_naming_it(
        place: tuple[str, int | None], key: str, value: Any) -> None:
    """Deep checks (cross-references, file checks) see random values too."""
    data: dict[str, Any] = {kind: [dict(t) for t in v] if isinstance(v, list) else dict(v)
                            for kind, v in VALID.items()}
    kind, index = place
    table: dict[str, Any] = data[kind] if index is None else data[kind][index]
    table[key] = value
    where = SPECS / "good" / "fuzz.toml"
    try:
        parse_spec(data, where)
    except SpecError as error:
        assert error.problems
        assert all(line.startswith(f"{where}: [") for line in error.problems)


def test_unchanged_fuzz_base_is_valid() -> None:
    spec = parse_spec(VALID, SPECS / "good" / "fuzz.toml")
    assert [d.image.name for d in spec.disks] == ["one-block.img", "four-k.img"]


# --- what management may touch -------------------------------------------------


def test_image_dirs_default_to_the_spec_folder_and_its_disks_folders(tmp_path: Path) -> None:
    (tmp_path / "d.img").write_bytes(bytes(1024))
    spec = parse_spec({
        "vm": {"name": "x"},
        "emulator": [{"id": "e"}],
        "controller": [{"id": "c", "emulator": "e"}],
        "disk": [{"id": "d", "controller": "c", "lun": 0, "image": str(IMAGES / "four-k.img"),
                  "readonly": True}],
    }, tmp_path / "vm.toml")
    assert spec.vm.image_dirs == (tmp_path.resolve(), IMAGES)
    assert (spec.vm.devices, spec.vm.management_group) == ((), None)


def test_image_dirs_devices_and_group_as_given(tmp_path: Path) -> None:
    spec = parse_spec({"vm": {"name": "x", "image_dirs": [str(IMAGES), "."],
                              "management_group": "daemon"}}, tmp_path / "vm.toml")
    assert spec.vm.image_dirs == (IMAGES, tmp_path.resolve())
    assert spec.vm.management_group == "daemon"


# --- kind "lsi" ------------------------------------------------------------------


def lsi_spec(tmp_path: Path, append: str = "console=ttyS0", accel: str = "tcg") -> Spec:
    (tmp_path / "d.img").write_bytes(bytes(1024))
    (tmp_path / "vmlinuz").write_bytes(b"k")
    return parse_spec({
        "vm": {"name": "x", "accel": accel, "kernel": "vmlinuz", "append": append},
        "emulator": [{"id": "py"}, {"id": "lsi-a", "kind": "lsi"}],
        "controller": [{"id": "c", "emulator": "py"}, {"id": "l", "emulator": "lsi-a"}],
        "disk": [{"id": "d", "controller": "l", "lun": 6, "image": "d.img"}],
    }, tmp_path / "vm.toml")


def test_lsi_helpers(tmp_path: Path) -> None:
    from launcher.spec import LSI_MAX_TARGET

    spec = lsi_spec(tmp_path)
    assert spec.kind_of_controller("c") is EmulatorKind.SCSI
    assert spec.kind_of_controller("l") is EmulatorKind.LSI
    assert [e.id for e in spec.emulators_of_kind(EmulatorKind.LSI)] == ["lsi-a"]
    assert spec.has_lsi and not load_spec(SPECS / "good" / "minimal.toml").has_lsi
    assert spec.disk("d").lun == LSI_MAX_TARGET
    with pytest.raises(KeyError):
        spec.kind_of_controller("nope")


def test_lsi_polling_warning_under_tcg_only(tmp_path: Path) -> None:
    from launcher.spec import lsi_polling_warning

    spec = lsi_spec(tmp_path)
    line = lsi_polling_warning(spec, Accel.TCG, "vm.toml")
    assert line == (
        'vm.toml: [vm] append = "console=ttyS0": warning: the guest runs under TCG and its '
        "kernel command line lacks irqpoll: interrupts of the lsi emulators' controllers "
        "(x-pci-proxy-dev) reach a guest only through KVM irqfds, so every SCSI command "
        'would time out; add "irqpoll nolapic noapic" to append')
    assert lsi_polling_warning(spec, Accel.KVM) is None
    assert str(spec.path) in (lsi_polling_warning(spec, Accel.TCG) or "")
    polling = lsi_spec(tmp_path, "console=ttyS0 irqpoll nolapic noapic")
    assert lsi_polling_warning(polling, Accel.TCG) is None
    # A word that merely contains it is not the parameter.
    assert lsi_polling_warning(lsi_spec(tmp_path, "noirqpoll"), Accel.TCG) is not None
    assert lsi_polling_warning(load_spec(SPECS / "good" / "full.toml"), Accel.TCG) is not None
    assert lsi_polling_warning(load_spec(SPECS / "good" / "minimal.toml"), Accel.TCG) is None
