"""Dirty logging in a real emulator process (locked down as in production),
played by a test front-end as QEMU 7.2 plays a migration: SET_LOG_BASE with a
shared memfd, SET_FEATURES with VHOST_F_LOG_ALL, the request ring's log flag.

- With logging on, a read marks exactly the pages of its device-writable
  buffers (response header and data-in) and of the ring's used ring, and a
  write marks no page of its data-out: QEMU copies exactly those again.
- With logging off (LOG_ALL not acked), the same requests mark nothing.
- Through the session keeper, an emulator restarted while the log is on
  logs too (the keeper replays SET_LOG_BASE with its fd and drops the
  answer), and the next exchange with QEMU is not confused by it.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from emulators.vhost_user.codec import encode_request
from emulators.vhost_user.constants import Feature, Request
from emulators.vhost_user.messages import U64, LogDescription, VringAddr
from emulators.virtio.dirtylog import LOG_PAGE_SIZE
from tests.support.emulator_harness import (
    FIRST_REQUEST_QUEUE,
    ControllerRig,
    ControllerSpec,
    Disk,
    EmulatorHarness,
)
from tests.support.keeper_rig import KeeperRig
from tests.support.vhost_frontend import UVA_BASE

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20
MEMORY = 4 * MIB
LOG_BYTES = MEMORY // LOG_PAGE_SIZE // 8  # one bit per page of guest RAM
LOG_OFFSET = 64  # not at the start of its file, as a front-end may
LOG_ALL = 1 << Feature.LOG_ALL
QUEUE = FIRST_REQUEST_QUEUE


class Log:
    """The front-end's side of the log: a memfd it maps and reads."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("test-dirty-log", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, LOG_OFFSET + LOG_BYTES)
        self.map = mmap.mmap(self.fd, LOG_OFFSET + LOG_BYTES)

    def pages(self) -> set[int]:
        words = struct.unpack_from(f"<{LOG_BYTES // 8}Q", self.map, LOG_OFFSET)
        return {64 * w + b for w, word in enumerate(words) for b in range(64) if word >> b & 1}

    def clear(self) -> None:
        self.map[LOG_OFFSET:] = bytes(LOG_BYTES)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def pages(ranges: list[tuple[int, int]]) -> set[int]:
    return {p for gpa, n in ranges if n for p in range(gpa // LOG_PAGE_SIZE,
                                                        (gpa + n - 1) // LOG_PAGE_SIZE + 1)}


def rw10(op: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", op, 0, lba, 0, blocks, 0)


def set_log(rig: ControllerRig, log: Log) -> None:
    """SET_LOG_BASE as QEMU sends it: the fd, and a wait for the answer."""
    frontend = rig.frontend
    data = encode_request(Request.SET_LOG_BASE, LogDescription(LOG_BYTES, LOG_OFFSET),
                          fds=(log.fd,))
    frontend.send_raw(data, (log.fd,))
    answer = frontend.read_reply(Request.SET_LOG_BASE)
    assert isinstance(answer.payload, U64)


def ring_addr(rig: ControllerRig, queue: int, flags: int) -> VringAddr:
    lay = rig.drivers[queue].layout
    return VringAddr(queue, flags, lay.desc_gpa + UVA_BASE, lay.used_gpa + UVA_BASE,
                     lay.avail_gpa + UVA_BASE, lay.used_gpa if flags else 0)


def logging(rig: ControllerRig, on: bool) -> None:
    """vhost_dev_set_log: the features, then every started ring's log flag
    (QEMU asks for a status on both while logging is on)."""
    frontend = rig.frontend
    features = frontend.features | LOG_ALL if on else frontend.features & ~LOG_ALL
    frontend.request(Request.SET_FEATURES, U64(features), need_reply=frontend.reply_ack)
    for queue in range(rig.num_rings):
        frontend.request(Request.SET_VRING_ADDR, ring_addr(rig, queue, int(on)),
                         need_reply=frontend.reply_ack)


def read_and_write(rig: ControllerRig, lba: int) -> tuple[set[int], set[int], set[int]]:
    """A READ and a WRITE on the request queue, in flight together (so no
    buffer of one reuses the other's memory); (the pages of the buffers the
    device wrote, the pages of the used ring, the pages of the write's
    data-out, which the device only read)."""
    read = rig.submit_command(rw10(0x28, lba, 16), queue=QUEUE, data_in=[8192], kick=False)
    data = os.urandom(3 * LOG_PAGE_SIZE)  # its middle page is surely no one else's
    write = rig.submit_command(rw10(0x2A, lba, 24), queue=QUEUE, data_out=[data], kick=False)
    header, data_in_response, data_in = rig.buffers(QUEUE, read)
    write_header, data_out, write_response = rig.buffers(QUEUE, write)
    wrote = pages([data_in_response, data_in, write_response])
    read_only = pages([data_out]) - pages([header, write_header]) - wrote
    rig.frontend.kick(QUEUE)
    assert rig.wait(QUEUE, read)[0] == 108 + 8192
    assert rig.wait(QUEUE, write)[0] == 108
    driver = rig.drivers[QUEUE]
    used = pages([(driver.layout.used_gpa, 6 + 8 * driver.size)])
    return wrote, used, read_only


@pytest.fixture()
def emulator(tmp_path: Path) -> Iterator[EmulatorHarness]:
    spec = ControllerSpec("c0", (Disk(tmp_path / "a.img"),), memory_size=MEMORY)
    with EmulatorHarness.start([spec]) as emu:
        yield emu


def test_logging_marks_exactly_the_pages_the_device_wrote(emulator: EmulatorHarness) -> None:
    rig = emulator.rig
    log = Log()
    try:
        set_log(rig, log)
        read_and_write(rig, 0)  # LOG_ALL not acked yet: nothing is logged
        assert log.pages() == set()
        logging(rig, True)
        wrote, used, read_only = read_and_write(rig, 8)
        assert wrote and used and read_only  # the test sees something either way
        assert log.pages() == wrote | used
        assert not log.pages() & read_only
        log.clear()
        logging(rig, False)
        read_and_write(rig, 16)
        assert log.pages() == set()
    finally:
        log.close()
    status, err = emulator.stop()
    assert status == 0 and "Traceback" not in err and "beyond" not in err


def test_a_new_log_replaces_the_old_one(emulator: EmulatorHarness) -> None:
    rig = emulator.rig
    old, new = Log(), Log()
    try:
        set_log(rig, old)
        logging(rig, True)
        set_log(rig, new)  # as after a log resize: QEMU sends the new one
        wrote, used, _ = read_and_write(rig, 24)
        assert new.pages() == wrote | used
        assert old.pages() == set()
    finally:
        old.close()
        new.close()
    status, err = emulator.stop()
    assert status == 0 and "Traceback" not in err


def test_a_ring_log_address_beyond_the_log_logs_no_page_of_it(
    emulator: EmulatorHarness,
) -> None:
    """A front-end whose log is too small for its own used ring: the used ring
    is not marked (nothing is written outside the log), the buffers still are,
    and the emulator says so once."""
    rig = emulator.rig
    log = Log()
    try:
        set_log(rig, log)
        logging(rig, True)
        far = replace(ring_addr(rig, QUEUE, 1), log_guest_addr=MEMORY)  # past the log's end
        rig.frontend.request(Request.SET_VRING_ADDR, far, need_reply=rig.frontend.reply_ack)
        wrote, _, _ = read_and_write(rig, 32)
        assert log.pages() == wrote
    finally:
        log.close()
    status, err = emulator.stop()
    assert status == 0 and "Traceback" not in err
    assert err.count("beyond the front-end's dirty log") == 1


def test_a_log_its_fd_cannot_hold_ends_the_connection_not_the_process(
    emulator: EmulatorHarness,
) -> None:
    """Straight to the emulator (no keeper to refuse it first): a log larger
    than its file cannot be mapped; the front-end's error ends the connection
    with the protocol-error status, never with a traceback or a crash."""
    rig = emulator.rig
    fd = os.memfd_create("short-log")
    try:
        os.ftruncate(fd, 4096)
        data = encode_request(Request.SET_LOG_BASE, LogDescription(8192, 0), fds=(fd,))
        rig.frontend.send_raw(data, (fd,))
    finally:
        os.close(fd)
    assert emulator.wait_exit() == 3
    assert "cannot map the dirty log" in emulator.stderr()
    assert "Traceback" not in emulator.stderr()


def test_an_emulator_restarted_while_logging_logs_too(tmp_path: Path) -> None:
    spec = ControllerSpec("c0", (Disk(tmp_path / "a.img"),), memory_size=MEMORY)
    rig = KeeperRig.start([spec], tmp_path)
    log = Log()
    try:
        c0 = rig.rigs[0]
        set_log(c0, log)
        logging(c0, True)
        wrote, used, _ = read_and_write(c0, 0)
        assert log.pages() == wrote | used
        rig.replace_emulator()  # the keeper replays the log, LOG_ALL, the flags
        log.clear()
        wrote, used, _ = read_and_write(c0, 8)
        assert log.pages() == wrote | used
        # The replayed SET_LOG_BASE's answer never reaches QEMU: its next
        # exchanges get their own answers.
        assert c0.frontend.request(Request.GET_FEATURES) is not None
        set_log(c0, log)
        logging(c0, False)
        log.clear()
        read_and_write(c0, 16)
        assert log.pages() == set()
        assert not rig.refusals
    finally:
        rig.close()
        log.close()
