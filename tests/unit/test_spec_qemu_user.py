"""``[vm] qemu_user``: a fixed, unprivileged user for QEMU."""

from __future__ import annotations

import pwd
from pathlib import Path

import pytest

from launcher.spec import SpecError, parse_spec


def vm(tmp_path: Path, **fields: object) -> dict[str, object]:
    return {"vm": {"name": "q", "memory": "64M", **fields}}


def test_absent_means_a_leased_uid(tmp_path: Path) -> None:
    assert parse_spec(vm(tmp_path), tmp_path / "vm.toml").vm.qemu_user is None


@pytest.mark.parametrize("user", ["nobody", 65534])
def test_an_existing_unprivileged_user_is_taken(tmp_path: Path, user: object) -> None:
    spec = parse_spec(vm(tmp_path, qemu_user=user), tmp_path / "vm.toml")
    assert spec.vm.qemu_user == str(user)


@pytest.mark.parametrize(("user", "rule"), [
    ("root", "must not be root"),
    (0, "must not be root"),
    ("no-such-user-here", "no such user on this host"),
    (True, "must be a user name or number"),
    ("", "must be a user name or number"),
])
def test_root_unknown_and_malformed_users_are_refused(tmp_path: Path, user: object,
                                                      rule: str) -> None:
    with pytest.raises(SpecError, match=rf"\[vm\] qemu_user = .*: {rule}"):
        parse_spec(vm(tmp_path, qemu_user=user), tmp_path / "vm.toml")


def test_a_user_inside_uid_range_is_taken(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool never leases an existing account's uid, so QEMU's fixed uid
    may lie inside the range emulators take from."""
    fake = pwd.struct_passwd(("tenant", "x", 64500, 1, "", "/", "/bin/false"))
    monkeypatch.setattr(pwd, "getpwnam", lambda name: fake)
    assert parse_spec(vm(tmp_path, qemu_user="tenant"), tmp_path / "vm.toml").vm.qemu_user \
        == "tenant"


def test_a_primary_gid_inside_uid_range_without_a_group_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No group has that gid, so the pool could lease it to an emulator: the
    emulator would run with QEMU's group."""
    fake = pwd.struct_passwd(("tenant", "x", 64500, 64501, "", "/", "/bin/false"))
    monkeypatch.setattr(pwd, "getpwnam", lambda name: fake)
    with pytest.raises(SpecError, match="its primary gid 64501 is inside uid_range "
                                        "64000-64999 and no group has it"):
        parse_spec(vm(tmp_path, qemu_user="tenant"), tmp_path / "vm.toml")
