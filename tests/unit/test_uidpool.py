"""Host-wide uids: one holder per uid across processes, given back on release or death."""

from __future__ import annotations

import grp
import logging
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.uidpool import HostUids, UidPool, accounts_in, describe_accounts, host_account


def test_two_pools_with_one_range_take_disjoint_uids(tmp_path: Path) -> None:
    a = UidPool(64000, 64003, owner="vm-a", folder=tmp_path)
    b = UidPool(64000, 64003, owner="vm-b", folder=tmp_path)
    got_a = [a.take(64000), a.take(64001)]
    got_b = [b.take(64000), b.take(64001)]
    assert got_a == [64000, 64001]
    assert got_b == [64002, 64003]  # the preferred ones are vm-a's
    assert b.take() is None  # the range is used up, host-wide
    assert HostUids(64000, 64003, tmp_path).holder(64000) == f"vm-a pid {os.getpid()}"
    a.give_back(64000)
    assert HostUids(64000, 64003, tmp_path).holder(64000) is None
    assert b.take() == 64000
    a.close()
    b.close()
    assert {HostUids(64000, 64003, tmp_path).holder(u) for u in range(64000, 64004)} == {None}


def test_a_lease_is_released_once(tmp_path: Path) -> None:
    host = HostUids(7100, 7100, tmp_path)
    lease = host.take("x")
    assert lease is not None and lease.held and host.take("y") is None
    lease.release()
    lease.release()
    assert not lease.held
    again = host.take("y")
    assert again is not None and again.uid == 7100


def test_a_dead_holders_uids_are_free_again(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from launcher.uidpool import HostUids;"
        f"h = HostUids(5000, 5001, Path({str(tmp_path)!r})); l = h.take('dead-vm');"
        "print(l.uid, flush=True); time.sleep(30)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "5000"
        lease = HostUids(5000, 5001, tmp_path).take("live-vm", preferred=5000)
        assert lease is not None and lease.uid == 5001
        lease.release()
    finally:
        holder.kill()
        holder.wait()
    # The lock file is still there; its lock died with its holder.
    assert (tmp_path / "5000.lock").exists()
    lease = HostUids(5000, 5001, tmp_path).take("live-vm", preferred=5000)
    assert lease is not None and lease.uid == 5000


def test_a_pool_leases_uids_for_other_roles_from_the_same_range(tmp_path: Path) -> None:
    pool = UidPool(7000, 7001, owner="vm-a", folder=tmp_path)
    assert pool.take() == 7000
    lease = pool.lease("qemu")
    assert lease is not None and lease.uid == 7001
    assert HostUids(7000, 7001, tmp_path).holder(7001) == f"vm-a/qemu pid {os.getpid()}"
    assert pool.take() is None and pool.lease("qemu") is None
    lease.release()
    pool.close()


# --- the host's own accounts ---------------------------------------------------

LIBVIRT_QEMU = "libvirt-qemu"  # Debian's libvirt: user and group 64055, in the default range


def libvirt_qemu_uid() -> int:
    try:
        return pwd.getpwnam(LIBVIRT_QEMU).pw_uid
    except KeyError:
        pytest.skip(f"needs the host account {LIBVIRT_QEMU!r} (libvirt-daemon-system makes it)")


def test_the_uid_of_a_host_account_is_never_leased(tmp_path: Path) -> None:
    uid = libvirt_qemu_uid()
    assert host_account(uid) == f"user {LIBVIRT_QEMU}"
    pool = UidPool(uid - 1, uid + 1, owner="vm-a", folder=tmp_path)
    assert pool.take(preferred=uid) == uid - 1  # the preferred one is an account's
    assert pool.lease("qemu") is not None and pool.take() is None
    assert pool.used == {uid - 1} and not (tmp_path / f"{uid}.lock").exists()
    assert pool.host.shortage == (
        f"uid_range {uid - 1}-{uid + 1} has no uid left: 2 are leased and 1 are existing "
        f"host accounts' uids or gids, never leased ({uid} (user {LIBVIRT_QEMU}))")
    pool.close()


def test_the_gid_of_a_host_group_is_never_leased(tmp_path: Path) -> None:
    """An emulator runs with gid = its uid: the gid of a group would give it
    that group's access (Debian's libvirt-qemu group reaches the vhost-user
    sockets)."""
    users = {u.pw_uid for u in pwd.getpwall()}
    gids = sorted(g.gr_gid for g in grp.getgrall() if g.gr_gid not in users and g.gr_gid > 0)
    if not gids:
        pytest.skip("needs a host group whose gid is no user's uid")
    gid = gids[0]
    assert host_account(gid) == f"group {grp.getgrgid(gid).gr_name}"
    host = HostUids(gid, gid, tmp_path)
    assert host.take("x") is None and not (tmp_path / f"{gid}.lock").exists()


def test_a_range_of_accounts_only_is_an_error_naming_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uid = libvirt_qemu_uid()
    host = HostUids(uid, uid, tmp_path)
    with caplog.at_level(logging.ERROR, logger="launcher.uidpool"):
        assert host.take("vm-a/e0") is None
    expected = (f"uid_range {uid}-{uid} has no uid mplaunch may lease: every one is an "
                f"existing host account's uid or gid ({uid} (user {LIBVIRT_QEMU})); choose a "
                "range outside the host's accounts")
    assert host.shortage == expected
    assert [r.getMessage() for r in caplog.records] == [expected]


def test_a_range_used_up_by_leases_says_so_without_an_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    host = HostUids(7000, 7000, tmp_path)
    lease = host.take("vm-a/e0")
    assert lease is not None and host.shortage is None
    with caplog.at_level(logging.ERROR, logger="launcher.uidpool"):
        assert host.take("vm-a/e1") is None
    assert host.shortage == "uid_range 7000-7000 has no uid left: all 1 are leased"
    assert caplog.records == []
    lease.release()


def test_accounts_in_a_range() -> None:
    uid = libvirt_qemu_uid()
    assert accounts_in(uid - 10, uid + 10) == {uid: f"user {LIBVIRT_QEMU}"}
    assert accounts_in(65534, 65534) == {65534: f"user {pwd.getpwuid(65534).pw_name}"}
    assert describe_accounts({1: "user a", 2: "user b", 3: "group c", 4: "group d"}) == \
        "1 (user a), 2 (user b), 3 (group c) and 1 more"
