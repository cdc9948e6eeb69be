"""virtio-scsi wire layer: header parsing, splits, LUN addressing, TMFs, events, UAs."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from emulators.scsi import sense as S
from emulators.scsi.backend import FdBackend
from emulators.scsi.lun import LogicalUnit, LunState
from emulators.scsi.virtio_scsi import (
    EVENTS_MISSED,
    EventQueueState,
    EventType,
    Response,
    TmfSubtype,
    VirtioScsiTarget,
    decode_lun,
    encode_event,
    encode_lun_field,
)

from .test_scsi_support import RESP_SIZE, Rig, cdb10, make_disk, parse_reply

MiB = 1 << 20
TUR = bytes(6)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path, size=MiB, fill=os.urandom(MiB))


def chop(data: bytes, cuts: list[int]) -> list[memoryview]:
    out = []
    prev = 0
    for c in [*cuts, len(data)]:
        out.append(memoryview(bytearray(data[prev:c])))
        prev = c
    return out


def test_header_and_data_split_across_views(rig: Rig) -> None:
    payload = os.urandom(2048)
    header = encode_lun_field(0) + bytes(11) + cdb10(0x2A, 8, 4).ljust(32, b"\0")
    readable = chop(header + payload, [5, 20, 40, 51 + 100, 51 + 1500])
    resp = bytearray(RESP_SIZE)
    used = rig.target.handle_request(readable, [memoryview(resp)])
    r = parse_reply(used, resp, b"")
    assert r.status == 0 and r.response == 0 and r.resid == 0
    assert os.pread(rig.fd, 2048, 8 * 512) == payload

    # Response header and data-in split at odd places, sharing a view.
    header = encode_lun_field(0) + bytes(11) + cdb10(0x28, 8, 4).ljust(32, b"\0")
    back = bytearray(RESP_SIZE + 2048 + 100)
    views = [memoryview(back)[:7], memoryview(back)[7:150], memoryview(back)[150:]]
    used = rig.target.handle_request([memoryview(bytearray(header))], views)
    r = parse_reply(used, back, b"")
    assert r.status == 0 and r.resid == 100 and used == RESP_SIZE + 2048
    assert bytes(back[RESP_SIZE:RESP_SIZE + 2048]) == payload


def test_split_sense_is_written(rig: Rig) -> None:
    header = encode_lun_field(0) + bytes(11) + cdb10(0x28, 1 << 31, 1).ljust(32, b"\0")
    back = bytearray(RESP_SIZE)
    views = [memoryview(back)[:3], memoryview(back)[3:20], memoryview(back)[20:]]
    used = rig.target.handle_request([memoryview(bytearray(header))], views)
    r = parse_reply(used, back, b"")
    assert used == RESP_SIZE and r.is_sense(S.LBA_OUT_OF_RANGE) and r.sense_len == 18


def test_response_buffer_too_small(rig: Rig) -> None:
    header = encode_lun_field(0) + bytes(11) + TUR.ljust(32, b"\0")
    small = bytearray(RESP_SIZE - 1)
    assert rig.target.handle_request([memoryview(bytearray(header))], [memoryview(small)]) == 0
    assert small == bytearray(RESP_SIZE - 1)
    assert rig.target.handle_request([memoryview(bytearray(header))], []) == 0


def test_short_request_header(rig: Rig) -> None:
    resp = bytearray(RESP_SIZE)
    used = rig.target.handle_request([memoryview(bytearray(20))], [memoryview(resp)])
    assert used == RESP_SIZE and parse_reply(used, resp, b"").response == Response.FAILURE
    used = rig.target.handle_request([], [memoryview(resp)])
    assert parse_reply(used, resp, b"").response == Response.FAILURE


def test_bad_target_and_bad_lun_byte0(rig: Rig) -> None:
    for field in (bytes((1, 1, 0x40, 0, 0, 0, 0, 0)), bytes((0, 0, 0x40, 0, 0, 0, 0, 0)),
                  bytes((2, 0, 0x40, 0, 0, 0, 0, 0))):
        r = rig.cmd(cdb10(0xA0, 0, 0), lun_field=field)
        assert r.response == Response.BAD_TARGET and r.status == 0


def test_lun_decoding() -> None:
    assert decode_lun(encode_lun_field(0)) == (0, 0)
    assert decode_lun(encode_lun_field(300, 2)) == (2, 300)
    assert decode_lun(bytes((1, 0, 0, 5, 0, 0, 0, 0))) == (0, 5)  # peripheral, bus 0
    assert decode_lun(bytes((1, 0, 0x01, 5, 0, 0, 0, 0)))[1] == -1  # type: ignore[index]
    assert decode_lun(bytes((1, 0, 0x40, 5, 0, 0, 1, 0)))[1] == -1  # type: ignore[index]
    assert decode_lun(bytes((0, 0, 0x40, 5, 0, 0, 0, 0))) is None


def test_peripheral_addressing_reaches_the_lun(tmp_path: Path) -> None:
    rig = Rig(tmp_path, luns=(0, 5))
    r = rig.cmd(TUR, lun_field=bytes((1, 0, 0, 5, 0, 0, 0, 0)))
    assert r.status == 0 and r.response == 0


def test_missing_lun(tmp_path: Path) -> None:
    rig = Rig(tmp_path, luns=(0,))
    r = rig.cmd(struct.pack(">BBBHB", 0x12, 0, 0, 96, 0), data_in_len=96, lun=4)
    assert r.status == 0 and r.data[0] == 0x7F and r.data[8:16] == b"MPLAUNCH"
    r = rig.cmd(struct.pack(">BBBHB", 0x12, 1, 0, 96, 0), data_in_len=96, lun=4)
    assert r.is_sense(S.LUN_NOT_SUPPORTED)
    assert rig.cmd(TUR, lun=4).is_sense(S.LUN_NOT_SUPPORTED)
    assert rig.cmd(cdb10(0x28, 0, 1), data_in_len=512, lun=4).is_sense(S.LUN_NOT_SUPPORTED)
    r = rig.cmd(bytes((0x03, 0, 0, 0, 18, 0)), data_in_len=18, lun=4)
    assert r.status == 0 and (r.data[2], r.data[12]) == (5, 0x25)
    r = rig.cmd(bytes((0x12, 0, 0, 0, 96, 0)), data_in_len=96,
                lun_field=bytes((1, 0, 0x40, 0, 0, 0, 0, 9)))
    assert r.data[0] == 0x7F


# -- unit attentions --------------------------------------------------------------------


def test_initial_unit_attention_only_when_asked(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fresh = Rig(tmp_path / "a", initial_ua=True)
    # INQUIRY, REPORT LUNS do not report or consume it.
    assert fresh.cmd(struct.pack(">BBBHB", 0x12, 0, 0, 36, 0), data_in_len=36).status == 0
    rl = struct.pack(">BBBxxxIBB", 0xA0, 0, 0, 64, 0, 0)
    assert fresh.cmd(rl, data_in_len=64).status == 0
    assert fresh.cmd(TUR).is_sense(S.UA_POWER_ON_RESET)
    assert fresh.cmd(TUR).status == 0
    restarted = Rig(tmp_path / "b", initial_ua=False)
    assert restarted.cmd(TUR).status == 0


def test_request_sense_reports_and_clears_ua(tmp_path: Path) -> None:
    rig = Rig(tmp_path, initial_ua=True)
    r = rig.cmd(bytes((0x03, 0, 0, 0, 18, 0)), data_in_len=18)
    assert r.status == 0 and (r.data[2], r.data[12], r.data[13]) == (6, 0x29, 0)
    assert rig.cmd(TUR).status == 0


def test_ua_order_and_reset_supersedes(rig: Rig) -> None:
    st = rig.lu().state
    st.raise_ua(S.UA_CAPACITY_CHANGED)
    st.raise_ua(S.UA_REPORTED_LUNS_CHANGED)
    st.raise_ua(S.UA_CAPACITY_CHANGED)  # not queued twice
    r1, r2, r3 = rig.cmd(TUR), rig.cmd(cdb10(0x28, 0, 1), data_in_len=512), rig.cmd(TUR)
    assert r1.is_sense(S.UA_CAPACITY_CHANGED) and r2.is_sense(S.UA_REPORTED_LUNS_CHANGED)
    assert r3.status == 0
    st.raise_ua(S.UA_CAPACITY_CHANGED)
    st.raise_ua(S.UA_BUS_DEVICE_RESET)
    assert rig.cmd(TUR).is_sense(S.UA_BUS_DEVICE_RESET)
    assert rig.cmd(TUR).status == 0


def test_ua_queue_is_bounded() -> None:
    st = LunState()
    for ascq in range(20):
        st.raise_ua(S.Sense(S.SenseKey.UNIT_ATTENTION, 0x2A, ascq))
    assert len(st.pending_ua) == 8 and st.pending_ua[-1] == (0x2A << 8) | 19


def test_ua_before_unknown_opcode(tmp_path: Path) -> None:
    rig = Rig(tmp_path, initial_ua=True)
    assert rig.cmd(bytes((0x3B,)) + bytes(9)).is_sense(S.UA_POWER_ON_RESET)
    assert rig.cmd(bytes((0x3B,)) + bytes(9)).is_sense(S.INVALID_OPCODE)


def test_capacity_change_ua_and_event(rig: Rig) -> None:
    os.ftruncate(rig.fd, 2 * MiB)
    assert rig.lu().refresh_capacity() is True
    assert rig.lu().refresh_capacity() is False
    rig.target.events.capacity_changed(0)
    assert rig.cmd(TUR).is_sense(S.UA_CAPACITY_CHANGED)
    r = rig.cmd(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), data_in_len=32)
    assert struct.unpack_from(">Q", r.data)[0] == 2 * MiB // 512 - 1
    buf = bytearray(16)
    assert rig.target.events.fill([memoryview(buf)]) == 16
    assert struct.unpack("<I8sI", buf) == (3, bytes((1, 0, 0, 0, 0, 0, 0, 0)), 0x092A)


def test_hotplug_raises_reported_luns_changed(tmp_path: Path) -> None:
    rig = Rig(tmp_path, luns=(0,))
    fd = make_disk(tmp_path, MiB, "extra")
    rig.target.scsi.add_lun(1, LogicalUnit(FdBackend(fd), "extra", LunState.fresh(False)))
    assert rig.cmd(TUR, lun=1).status == 0  # the new LUN itself has nothing pending
    rl = struct.pack(">BBBxxxIBB", 0xA0, 0, 0, 64, 0, 0)
    r = rig.cmd(rl, data_in_len=64)  # REPORT LUNS clears REPORTED LUNS DATA HAS CHANGED
    assert r.status == 0 and r.data[3] == 16
    assert rig.cmd(TUR).status == 0
    rig.target.scsi.remove_lun(1)
    assert rig.cmd(TUR).is_sense(S.UA_REPORTED_LUNS_CHANGED)
    assert rig.cmd(TUR, lun=1).is_sense(S.LUN_NOT_SUPPORTED)


# -- control queue --------------------------------------------------------------------


def tmf(target: VirtioScsiTarget, subtype: int, field: bytes) -> int:
    req = struct.pack("<II8sQ", 0, subtype, field, 99)
    resp = bytearray(1)
    assert target.handle_control([memoryview(bytearray(req))], [memoryview(resp)]) == 1
    return resp[0]


def test_tmfs(tmp_path: Path) -> None:
    rig = Rig(tmp_path, luns=(0, 1))
    t = rig.target
    f0 = encode_lun_field(0)
    for sub in (TmfSubtype.ABORT_TASK, TmfSubtype.ABORT_TASK_SET, TmfSubtype.CLEAR_TASK_SET,
                TmfSubtype.QUERY_TASK, TmfSubtype.QUERY_TASK_SET):
        assert tmf(t, sub, f0) == 0  # FUNCTION COMPLETE: nothing is ever pending
    assert rig.cmd(TUR).status == 0  # none of them raised a UA
    assert tmf(t, TmfSubtype.CLEAR_ACA, f0) == Response.FUNCTION_REJECTED
    assert tmf(t, 42, f0) == Response.FUNCTION_REJECTED
    assert tmf(t, TmfSubtype.LOGICAL_UNIT_RESET, f0) == 0
    assert rig.cmd(TUR, lun=1).status == 0
    assert rig.cmd(TUR).is_sense(S.UA_BUS_DEVICE_RESET)
    assert tmf(t, TmfSubtype.I_T_NEXUS_RESET, f0) == 0
    assert rig.cmd(TUR).is_sense(S.UA_I_T_NEXUS_LOSS)
    assert rig.cmd(TUR, lun=1).is_sense(S.UA_I_T_NEXUS_LOSS)
    assert tmf(t, TmfSubtype.LOGICAL_UNIT_RESET, encode_lun_field(9)) == Response.INCORRECT_LUN
    assert tmf(t, TmfSubtype.ABORT_TASK, encode_lun_field(0, 3)) == Response.BAD_TARGET


def test_async_notification(rig: Rig) -> None:
    for ctype in (1, 2):
        req = struct.pack("<I8sI", ctype, encode_lun_field(0), 0xFF)
        resp = bytearray(5)
        n = rig.target.handle_control([memoryview(bytearray(req))], [memoryview(resp)])
        assert n == 5 and struct.unpack("<IB", resp) == (0, 0)
    req = struct.pack("<I8sI", 1, encode_lun_field(0, 4), 0xFF)
    resp = bytearray(5)
    rig.target.handle_control([memoryview(bytearray(req))], [memoryview(resp)])
    assert resp[4] == Response.BAD_TARGET


def test_control_garbage(rig: Rig) -> None:
    t = rig.target
    resp = bytearray(8)
    assert t.handle_control([], [memoryview(resp)]) == 0
    assert t.handle_control([memoryview(bytearray(b"\x07\0\0\0"))], [memoryview(resp)]) == 0
    assert t.handle_control([memoryview(bytearray(8))], [memoryview(resp)]) == 1
    assert resp[0] == Response.FAILURE
    assert t.handle_control([memoryview(bytearray(24))], []) == 0


# -- events ---------------------------------------------------------------------------


def test_event_encoding() -> None:
    ev = encode_event(EventType.TRANSPORT_RESET, 1, 5)
    assert ev == struct.pack("<I8sI", 1, bytes((1, 0, 0, 5, 0, 0, 0, 0)), 1)
    ev = encode_event(EventType.TRANSPORT_RESET, 2, 300)
    assert ev[4:8] == bytes((1, 0, 0x41, 0x2C))


def test_event_queue_overflow_sets_missed() -> None:
    q = EventQueueState(capacity=2)
    assert not q.pending()
    q.lun_added(1)
    q.lun_removed(2)
    q.lun_added(3)  # dropped
    out = []
    for _ in range(3):
        buf = bytearray(16)
        out.append((q.fill([memoryview(buf)]), struct.unpack("<I8sI", buf)))
    assert out[0][0] == 16 and out[0][1][0] == EVENTS_MISSED | 1 and out[0][1][2] == 1
    assert out[1][1][0] == 1 and out[1][1][2] == 2 and out[1][1][1][3] == 2
    assert out[2][0] == 0 and not q.pending()
    q.push(EventType.PARAM_CHANGE, 0x092A, 0)
    assert q.fill([memoryview(bytearray(8))]) == 0 and q.pending()  # too small: kept
    q.missed = True
    q._pending.clear()
    buf = bytearray(16)
    assert q.fill([memoryview(buf)]) == 16 and struct.unpack_from("<I", buf)[0] == EVENTS_MISSED


# -- state layout ----------------------------------------------------------------------


def test_lun_state_pack_roundtrip() -> None:
    st = LunState.fresh(True)
    st.raise_ua(S.UA_CAPACITY_CHANGED)
    st.set_sense(S.LBA_OUT_OF_RANGE)
    st.write_cache_enabled = False
    st.reservation_key = 0x1122334455667788
    blob = st.pack()
    assert LunState.unpack(blob) == st
    assert len(blob) == len(LunState().pack())
    with pytest.raises(ValueError):
        LunState.unpack(b"XXXX" + blob[4:])
    with pytest.raises(ValueError):
        LunState.unpack(blob[:10])


def test_state_change_callback(rig: Rig) -> None:
    seen: list[bytes] = []
    rig.lu().on_change = lambda st: seen.append(st.pack())
    rig.lu().state.raise_ua(S.UA_CAPACITY_CHANGED)
    rig.cmd(TUR)
    assert seen and LunState.unpack(seen[-1]).pending_ua == ()


def test_internal_bug_becomes_hardware_error(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> None:
        raise ZeroDivisionError("bug")

    monkeypatch.setitem(rig.target.scsi._handlers, 0x00, broken)
    r = rig.cmd(TUR)
    assert r.is_sense(S.INTERNAL_TARGET_FAILURE) and r.response == 0
    assert any("internal failure" in rec.getMessage() for rec in caplog.records)
    monkeypatch.setattr(rig.target, "_run", broken)
    r = rig.cmd(TUR)
    assert r.is_sense(S.INTERNAL_TARGET_FAILURE) and r.used == RESP_SIZE


def test_target_run_time_changes_queue_events(tmp_path: Path) -> None:
    rig = Rig(tmp_path, luns=(0,))
    t = rig.target
    fd = make_disk(tmp_path, MiB, "hot")
    t.add_lun(5, LogicalUnit(FdBackend(fd), "hot", LunState.fresh(False)))
    os.ftruncate(fd, 2 * MiB)
    assert t.refresh_capacity(5) is True and t.refresh_capacity(0) is False
    t.remove_lun(5)
    got = []
    while t.events.pending():
        buf = bytearray(16)
        assert t.events.fill([memoryview(buf)]) == 16
        event, field, reason = struct.unpack("<I8sI", buf)
        got.append((event, field[3], reason))
    assert got == [(1, 5, 1), (3, 5, 0x092A), (1, 5, 2)]
    assert rig.cmd(TUR).is_sense(S.UA_REPORTED_LUNS_CHANGED)


def test_cdb_longer_than_cdb_size(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    t = VirtioScsiTarget(rig.lus, cdb_size=10, sense_size=32)

    def run(cdb: bytes) -> tuple[int, bytes]:
        header = encode_lun_field(0) + bytes(11) + cdb[:10].ljust(10, b"\0")
        resp = bytearray(12 + 32)
        data = bytearray(512)
        writable = [memoryview(resp), memoryview(data)]
        used = t.handle_request([memoryview(bytearray(header))], writable)
        r = parse_reply(used, resp, bytes(data))
        assert r.status in (0, 2)
        return r.status, r.sense
    status, sense = run(struct.pack(">BBQIBB", 0x88, 0, 0, 1, 0, 0))
    assert status == 2 and (sense[2], sense[12]) == (5, 0x20)
    status, _ = run(cdb10(0x28, 0, 1))
    assert status == 0
