"""Uids for the processes mplaunch confines, unique across every VM on the host.

Theory of operation. A uid is one lock file, ``/run/mplaunch/uids/UID.lock``.
Whoever holds an exclusive flock on it owns the uid; the launcher that runs
a process under that uid holds the lock for as long as that process lives
(its ``Lease``), and releases it only after the process is reaped. The
kernel drops a flock when its last descriptor closes, so a launcher that
crashes gives its uids back by itself: a stale lock file is just a file
whose lock anyone can take. Lock files are never removed (unlinking a lock
file while another process has it open would let two owners hold two
inodes of one name).

flock is per open file description, so two ``HostUids`` in one process, or
two mplaunch processes, exclude each other the same way. The spec's
``uid_range`` only says which uids a VM may take from; two VMs with the
same range get disjoint uids.

A uid that is an existing host account's uid, or an existing group's gid,
is never leased: a confined process runs with uid = gid = the leased id, so
it would otherwise act as that user, or with that group's access (Debian's
``libvirt-qemu`` is uid and gid 64055, inside the default range, and its
group may reach the vhost-user sockets). Accounts are looked up at each
take, through the host's name service, so one added later is skipped too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import itertools
import logging
import os
import pwd
from dataclasses import dataclass, field
from pathlib import Path

from launcher import children, holdnames

DEFAULT_UID_DIR = Path("/run/mplaunch/uids")
LOG = logging.getLogger(__name__)


def host_account(ident: int) -> str | None:
    """The host account ``ident`` belongs to ("user NAME" or "group NAME"),
    or None if no user has it as uid and no group as gid."""
    try:
        return f"user {pwd.getpwuid(ident).pw_name}"
    except (KeyError, OverflowError):
        pass
    try:
        return f"group {grp.getgrgid(ident).gr_name}"
    except (KeyError, OverflowError):
        return None


def accounts_in(first: int, last: int) -> dict[int, str]:
    """Every id in ``first``..``last`` that is a host user's uid or a host
    group's gid, with its account (as ``host_account`` names it); one pass
    over the account lists, so a large range costs no more than a small one."""
    found: dict[int, str] = {}
    for group in grp.getgrall():
        if first <= group.gr_gid <= last:
            found[group.gr_gid] = f"group {group.gr_name}"
    for user in pwd.getpwall():  # a user's name wins over its group's
        if first <= user.pw_uid <= last:
            found[user.pw_uid] = f"user {user.pw_name}"
    return dict(sorted(found.items()))


def describe_accounts(accounts: dict[int, str], most: int = 3) -> str:
    """``accounts`` for a message: "64055 (user libvirt-qemu), ... and N more"."""
    shown = [f"{ident} ({name})" for ident, name in list(accounts.items())[:most]]
    more = len(accounts) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


@dataclass
class Lease:
    """One uid held: the lock stays until ``release()`` (or the holder's death)."""

    uid: int
    owner: str
    _fd: int = field(default=-1, repr=False)

    @classmethod
    def from_fd(cls, uid: int, owner: str, fd: int) -> Lease:
        """A lease whose lock fd the VM's holder kept and handed back (flock
        belongs to the open file: this fd holds the uid). The holder still
        keeps its copy, which `release` lets go of too."""
        return cls(uid, owner, fd)

    @property
    def held(self) -> bool:
        return self._fd >= 0

    @property
    def fd(self) -> int:
        """The lock fd; -1 once released."""
        return self._fd

    def keep_in_holder(self) -> None:
        """A copy of the lock in the VM's holder: the uid stays taken host-wide
        while a process of the VM may run under it, even after the launcher
        died (a no-op without a holder)."""
        children.host().hold(holdnames.lease(self.uid), "lease", [self._fd])

    def release(self) -> None:
        """Give the uid back; call it only once no process runs under it. Idempotent."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = -1
            children.host().unhold(holdnames.lease(self.uid))


class HostUids:
    """Leases on uids from ``first``..``last``, exclusive host-wide."""

    def __init__(self, first: int, last: int, folder: Path = DEFAULT_UID_DIR) -> None:
        self.first, self.last = first, last
        self.folder = folder
        #: Why the last ``take`` found no uid (naming the range), or None.
        self.shortage: str | None = None

    def _open_folder(self) -> int:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o755)
        return os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def take(self, owner: str, preferred: int | None = None) -> Lease | None:
        """A lease on a free uid (``preferred`` if it is free), or None if the
        range is used up. ``owner`` (e.g. "vm1/e0") is written into the lock
        file for a human looking at who holds what. A uid or gid of a host
        account is skipped (no lock file is made for it). ``shortage`` then
        says why nothing was found, naming the range; a range made only of
        accounts' ids is logged as an error too."""
        dir_fd = self._open_folder()
        skipped: dict[int, str] = {}
        try:
            first: list[int] = []
            if preferred is not None and self.first <= preferred <= self.last:
                first = [preferred]
            rest = (u for u in range(self.first, self.last + 1) if u != preferred)
            for uid in itertools.chain(first, rest):
                account = host_account(uid)
                if account is not None:
                    skipped[uid] = account
                    continue
                lease = self._try(dir_fd, uid, owner)
                if lease is not None:
                    lease.keep_in_holder()
                    self.shortage = None
                    return lease
        finally:
            os.close(dir_fd)
        self.shortage = self._shortage(skipped)
        if len(skipped) == self.last - self.first + 1:  # a spec error, not a busy host
            LOG.error("%s", self.shortage)
        return None

    def _shortage(self, skipped: dict[int, str]) -> str:
        """Why the last take found nothing, naming the range."""
        span = f"uid_range {self.first}-{self.last}"
        total = self.last - self.first + 1
        if not skipped:
            return f"{span} has no uid left: all {total} are leased"
        if len(skipped) == total:
            return (f"{span} has no uid mplaunch may lease: every one is an existing host "
                    f"account's uid or gid ({describe_accounts(skipped)}); choose a range "
                    "outside the host's accounts")
        return (f"{span} has no uid left: {total - len(skipped)} are leased and "
                f"{len(skipped)} are existing host accounts' uids or gids, never leased "
                f"({describe_accounts(skipped)})")

    @staticmethod
    def _try(dir_fd: int, uid: int, owner: str) -> Lease | None:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(f"{uid}.lock", flags, 0o600, dir_fd=dir_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{owner} pid {os.getpid()}\n".encode(), 0)
        return Lease(uid, owner, fd)

    def holder(self, uid: int) -> str | None:
        """Who holds ``uid`` (the text its holder wrote), or None if it is free."""
        try:
            fd = os.open(self.folder / f"{uid}.lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return os.pread(fd, 256, 0).decode(errors="replace").strip()
            return None
        finally:
            os.close(fd)


class UidPool:
    """The uids of one VM's emulators and spares, leased from ``HostUids``:
    one per live emulator or spare, so no emulator can signal or trace
    another, in this VM or any other."""

    def __init__(self, first: int, last: int, owner: str = "mplaunch",
                 folder: Path = DEFAULT_UID_DIR) -> None:
        self.first, self.last = first, last
        self.owner = owner
        self.host = HostUids(first, last, folder)
        self.leases: dict[int, Lease] = {}

    @property
    def used(self) -> set[int]:
        return set(self.leases)

    def take(self, preferred: int | None = None) -> int | None:
        lease = self.host.take(self.owner, preferred)
        if lease is None:
            return None
        self.leases[lease.uid] = lease
        return lease.uid

    def lease(self, role: str) -> Lease | None:
        """A uid for another confined process of this VM (e.g. "qemu"), held
        host-wide like the others; the caller releases the lease."""
        return self.host.take(f"{self.owner}/{role}")

    def adopt(self, lease: Lease) -> None:
        """A lease a re-attaching launcher got back from the holder, now this
        pool's like one it took (`give_back` releases it). ValueError if the
        pool holds that uid already: two leases on one uid would be one
        released too early."""
        held = self.leases.get(lease.uid)
        if held is not None and held is not lease:
            raise ValueError(f"uid {lease.uid} is leased in this pool already")
        self.leases[lease.uid] = lease

    def give_back(self, uid: int) -> None:
        lease = self.leases.pop(uid, None)
        if lease is not None:
            lease.release()

    def close(self) -> None:
        """Release every lease still held (the VM's teardown)."""
        for uid in list(self.leases):
            self.give_back(uid)
