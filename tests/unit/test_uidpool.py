"""Host-wide uids: one holder per uid across processes, given back on release or death."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from launcher.uidpool import HostUids, UidPool


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
    host = HostUids(1000, 1000, tmp_path)
    lease = host.take("x")
    assert lease is not None and lease.held and host.take("y") is None
    lease.release()
    lease.release()
    assert not lease.held
    again = host.take("y")
    assert again is not None and again.uid == 1000


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
