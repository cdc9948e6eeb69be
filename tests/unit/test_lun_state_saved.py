"""Every change of a LUN's state is saved before the command that made it ends.

A successor emulator knows only what the state store holds: a unit
attention consumed but not saved would be raised twice, a sense not saved
would be lost to the guest's REQUEST SENSE, a write cache setting not saved
would change how writes are synced. So the copy the owner saves
(``LogicalUnit.on_change``) must equal the live state after every command,
task management function and LUN change, whatever the order.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulators.scsi import sense as S
from emulators.scsi.backend import FdBackend
from emulators.scsi.lun import LogicalUnit, LunState
from emulators.scsi.virtio_scsi import TmfSubtype, encode_lun_field

from .test_scsi_support import Rig, cdb10, make_disk

TUR = bytes(6)
REQUEST_SENSE = bytes((0x03, 0, 0, 0, 252, 0))
REQUEST_SENSE_DESC = bytes((0x03, 1, 0, 0, 252, 0))
BAD_OPCODE = bytes((0xFF,)) + bytes(9)
INQUIRY_BAD_FIELD = bytes((0x12, 0x00, 0x80, 0, 96, 0))  # page code without EVPD
READ_PAST_END = cdb10(0x28, 1 << 30, 1)
READ_OK = cdb10(0x28, 0, 1)
WRITE_OK = cdb10(0x2A, 0, 1)
REPORT_LUNS = struct.pack(">BBBBBBIBB", 0xA0, 0, 0, 0, 0, 0, 4096, 0, 0)
MODE_SENSE_CACHING = bytes((0x1A, 0x08, 0x08, 0, 252, 0))

COMMANDS = st.sampled_from([
    ("cdb", TUR), ("cdb", REQUEST_SENSE), ("cdb", REQUEST_SENSE_DESC), ("cdb", BAD_OPCODE),
    ("cdb", INQUIRY_BAD_FIELD), ("cdb", READ_PAST_END), ("cdb", READ_OK), ("cdb", WRITE_OK),
    ("cdb", REPORT_LUNS), ("wce", b""), ("tmf", TmfSubtype.LOGICAL_UNIT_RESET),
    ("tmf", TmfSubtype.I_T_NEXUS_RESET), ("tmf", TmfSubtype.ABORT_TASK),
    ("hotplug", b""), ("resize", b""),
])


class SavingRig(Rig):
    """The rig with each LUN's saves recorded, as the controller makes them."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path, luns=(0, 1), initial_ua=True)
        self.tmp_path = tmp_path
        self.saved: dict[int, bytes] = {}
        for n, lu in self.lus.items():
            self.watch(n, lu)

    def watch(self, n: int, lu: LogicalUnit) -> None:
        self.saved[n] = lu.state.pack()
        lu.on_change = lambda state, n=n: self.saved.__setitem__(n, state.pack())

    def check(self) -> None:
        for n, lu in self.target.scsi.luns.items():
            assert self.saved[n] == lu.state.pack(), f"LUN {n}: a change was not saved"

    def toggle_write_cache(self, lun: int) -> None:
        page = self.cmd(MODE_SENSE_CACHING, data_in_len=252, lun=lun)
        if page.status != 0:
            return  # a unit attention came first: that is a change too
        length = page.data[0] + 1
        params = bytearray(page.data[:length])
        params[0] = 0  # mode data length is reserved in MODE SELECT
        params[4 + params[3] + 2] ^= 0x04  # WCE of the caching page
        select = bytes((0x15, 0x10, 0, 0, len(params), 0))
        self.cmd(select, bytes(params), lun=lun)

    def tmf(self, subtype: int, lun: int) -> None:
        req = struct.pack("<II8sQ", 0, subtype, encode_lun_field(lun), 99)
        self.target.handle_control([memoryview(bytearray(req))], [memoryview(bytearray(1))])

    def hotplug(self) -> None:
        """LUN 5 comes and goes: the others get REPORTED LUNS CHANGED."""
        if 5 in self.target.scsi.luns:
            lu = self.target.remove_lun(5)
            assert isinstance(lu.backend, FdBackend)
            os.close(lu.backend.fd)
            del self.saved[5]
            return
        fd = make_disk(self.tmp_path, 1 << 20, "disk5")
        lu = LogicalUnit(FdBackend(fd, 512, False), "disk-5", LunState.fresh(False))
        self.watch(5, lu)
        self.target.add_lun(5, lu)

    def resize(self, lun: int) -> None:
        fd = self.fds[lun]
        os.ftruncate(fd, os.fstat(fd).st_size + (1 << 20))
        self.target.refresh_capacity(lun)


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(COMMANDS, st.sampled_from([0, 1])), min_size=1, max_size=25))
def test_the_saved_state_follows_every_change(
    tmp_path_factory: object, steps: list[tuple[tuple[str, object], int]]
) -> None:
    tmp = tmp_path_factory.mktemp("luns")  # type: ignore[attr-defined]
    rig = SavingRig(tmp)
    try:
        for (kind, arg), lun in steps:
            if kind == "cdb":
                assert isinstance(arg, bytes)
                rig.cmd(arg, data_in_len=4096 if arg[0] in (0x28, 0xA0) else 252, lun=lun)
            elif kind == "wce":
                rig.toggle_write_cache(lun)
            elif kind == "tmf":
                assert isinstance(arg, int)
                rig.tmf(arg, lun)
            elif kind == "hotplug":
                rig.hotplug()
            else:
                rig.resize(lun)
            rig.check()
    finally:
        for lu in rig.target.scsi.luns.values():
            assert isinstance(lu.backend, FdBackend)
            os.close(lu.backend.fd)


def test_a_failed_command_saves_its_whole_sense(tmp_path: Path) -> None:
    """The sense a REQUEST SENSE returns after a restart is the one the failed
    command set, field pointer included (it was not saved at all before)."""
    rig = SavingRig(tmp_path)
    rig.cmd(TUR)  # takes the power-on attention
    rig.cmd(TUR, lun=1)
    reply = rig.cmd(INQUIRY_BAD_FIELD)
    assert reply.is_sense(S.INVALID_FIELD_IN_CDB)
    restored = LunState.unpack(rig.saved[0])
    assert restored.sense == S.INVALID_FIELD_IN_CDB.at(2)
    assert restored == rig.lu(0).state
    for lu in rig.target.scsi.luns.values():
        assert isinstance(lu.backend, FdBackend)
        os.close(lu.backend.fd)
