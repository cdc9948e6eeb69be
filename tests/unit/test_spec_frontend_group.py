"""``[vm] frontend_group``, and a ``uid_range`` read against the host's accounts."""

from __future__ import annotations

import grp
import pwd
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.spec import SpecError, parse_spec

LIBVIRT_QEMU = "libvirt-qemu"  # Debian's libvirt: QEMU's user and group, uid and gid 64055


def vm(**fields: object) -> dict[str, object]:
    return {"vm": {"name": "f", "memory": "64M", **fields}}


def libvirt_qemu() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(LIBVIRT_QEMU)
    except KeyError:
        pytest.skip(f"needs the host account {LIBVIRT_QEMU!r} (libvirt-daemon-system makes it)")


def problems(tmp_path: Path, **fields: object) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(vm(**fields), tmp_path / "vm.toml")
    return list(info.value.problems)


def test_absent_means_root_only(tmp_path: Path) -> None:
    assert parse_spec(vm(), tmp_path / "vm.toml").vm.frontend_group is None


@pytest.mark.parametrize("group", ["daemon", 1])
def test_an_existing_group_is_kept_as_given(tmp_path: Path, group: object) -> None:
    assert parse_spec(vm(frontend_group=group), tmp_path / "vm.toml").vm.frontend_group \
        == str(group)


def test_debians_libvirt_group(tmp_path: Path) -> None:
    libvirt_qemu()
    spec = parse_spec(vm(frontend_group=LIBVIRT_QEMU), tmp_path / "vm.toml")
    assert (spec.vm.frontend_group, spec.vm.management_group) == (LIBVIRT_QEMU, None)


@pytest.mark.parametrize(("group", "rule"), [
    ("no-such-group-here", "no such group on this host"),
    (2**40, "no such group on this host"),
    (True, "must be a group name or number"),
    ("", "must be a group name or number"),
    (["daemon"], "must be a group name or number"),
])
def test_unknown_and_malformed_groups_are_refused(tmp_path: Path, group: object,
                                                  rule: str) -> None:
    [line] = problems(tmp_path, frontend_group=group)
    assert line.startswith(f"{tmp_path / 'vm.toml'}: [vm] frontend_group = ")
    assert line.endswith(f": {rule}")


def test_check_names_the_file_field_and_value(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "vm.toml"
    spec.write_text('[vm]\nname = "f"\nconsole = "none"\nfrontend_group = "no-such-group-x"\n'
                    f'run_dir = "{tmp_path / "run"}"\n')
    assert main(["--check", str(spec)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f'{spec}: [vm] frontend_group = "no-such-group-x": no such group on this host']
    spec.write_text(spec.read_text().replace("no-such-group-x", "daemon"))
    assert main(["--check", str(spec)]) == 0
    assert grp.getgrnam("daemon")  # the group the second check accepted


# --- uid_range and the host's accounts -------------------------------------------


def test_a_range_of_host_accounts_only_is_refused(tmp_path: Path) -> None:
    user = libvirt_qemu()
    uid = user.pw_uid
    [line] = problems(tmp_path, uid_range=f"{uid}-{uid}")
    assert line == (f'{tmp_path / "vm.toml"}: [vm] uid_range = "{uid}-{uid}": holds no uid '
                    f"mplaunch may lease: each one is the uid or gid of a host account ({uid} "
                    f"(user {LIBVIRT_QEMU})), and those are never leased; choose a range "
                    "outside the host's accounts")


def test_accounts_count_against_the_emulators(tmp_path: Path) -> None:
    uid = libvirt_qemu().pw_uid
    data = {"vm": {"name": "f", "memory": "64M", "uid_range": f"{uid - 1}-{uid}"},
            "emulator": [{"id": "e0"}, {"id": "e1"}],
            "controller": [{"id": "c0", "emulator": "e0"}, {"id": "c1", "emulator": "e1"}]}
    with pytest.raises(SpecError) as info:
        parse_spec(data, tmp_path / "vm.toml")
    assert info.value.problems == (
        f'{tmp_path / "vm.toml"}: [vm] uid_range = "{uid - 1}-{uid}": holds 1 uid(s) mplaunch '
        "may lease but there are 2 [[emulator]] tables; each emulator needs its own uid, and "
        f"the uids and gids of host accounts are never leased ({uid} (user {LIBVIRT_QEMU}))",)
    data["emulator"] = data["emulator"][:1]  # type: ignore[index]
    data["controller"] = [{"id": "c0", "emulator": "e0"}]
    assert parse_spec(data, tmp_path / "vm.toml").vm.uid_range == (uid - 1, uid)


def test_the_default_range_holds_libvirts_account_and_is_still_valid(tmp_path: Path) -> None:
    uid = libvirt_qemu().pw_uid
    spec = parse_spec(vm(), tmp_path / "vm.toml")
    assert spec.vm.uid_range[0] <= uid <= spec.vm.uid_range[1]  # skipped by the pool


def test_libvirts_user_may_be_qemu_user_inside_the_default_range(tmp_path: Path) -> None:
    """Its uid and gid are accounts', never leased: no emulator can share them."""
    libvirt_qemu()
    spec = parse_spec(vm(qemu_user=LIBVIRT_QEMU), tmp_path / "vm.toml")
    assert spec.vm.qemu_user == LIBVIRT_QEMU
