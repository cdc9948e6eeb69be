"""Hostile input: random CDBs, headers, splits and control requests never raise,
always produce a well-formed response, and never reach the internal-failure path."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulators.scsi.cdb import COMMANDS
from emulators.scsi.virtio_scsi import encode_lun_field

from .test_scsi_support import RESP_SIZE, Rig, parse_reply

SUPPORTED = sorted({c.opcode for c in COMMANDS})
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Rig:
    path: Path = tmp_path_factory.mktemp("fuzz")
    return Rig(path, size=64 * 1024, luns=(0, 2), initial_ua=True)


@pytest.fixture(autouse=True)
def no_internal_failures(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="emulators.scsi")


def assert_no_internal_failure(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[0].getMessage()


def check_reply(used: int, resp: bytes | bytearray, data_in_len: int) -> None:
    r = parse_reply(used, resp, b"")
    assert used == 0 or RESP_SIZE <= used <= RESP_SIZE + data_in_len
    assert r.response in (0, 3, 9)
    assert r.status in (0, 2)
    assert 0 <= r.resid <= max(data_in_len, 4096)
    if r.status == 2:
        assert r.sense_len == 18 and r.sense[0] == 0x70 and r.sense[7] == 10
        assert r.key_asc_ascq != (4, 0x44, 0), "internal target failure"
    else:
        assert r.sense_len == 0


cdbs = st.builds(
    lambda op, rest: bytes((op,)) + rest,
    st.one_of(st.sampled_from(SUPPORTED), st.integers(0, 255)),
    st.binary(min_size=31, max_size=31),
)


@FUZZ
@given(
    cdb=cdbs,
    lun=st.sampled_from([0, 1, 2, 300]),
    data_out=st.binary(max_size=1200),
    data_in_len=st.sampled_from([0, 1, 17, 512, 4096]),
)
def test_random_cdbs(
    rig: Rig, caplog: pytest.LogCaptureFixture, cdb: bytes, lun: int, data_out: bytes,
    data_in_len: int,
) -> None:
    header = encode_lun_field(lun) + struct.pack("<QBBB", 1, 0, 0, 0) + cdb
    resp = bytearray(RESP_SIZE)
    data = bytearray(data_in_len)
    readable = [memoryview(bytearray(header))]
    if data_out:
        readable.append(memoryview(bytearray(data_out)))
    writable = [memoryview(resp)] + ([memoryview(data)] if data_in_len else [])
    used = rig.target.handle_request(readable, writable)
    check_reply(used, resp, data_in_len)
    assert_no_internal_failure(caplog)


@FUZZ
@given(
    raw=st.binary(max_size=200),
    cuts=st.lists(st.integers(0, 200), max_size=5),
    wcuts=st.lists(st.integers(0, 300), max_size=4),
    wlen=st.integers(0, 300),
)
def test_random_headers_and_splits(
    rig: Rig, caplog: pytest.LogCaptureFixture, raw: bytes, cuts: list[int], wcuts: list[int],
    wlen: int,
) -> None:
    points = sorted({c for c in cuts if c <= len(raw)})
    readable = []
    prev = 0
    for p in [*points, len(raw)]:
        readable.append(memoryview(bytearray(raw[prev:p])))
        prev = p
    back = bytearray(wlen)
    wpoints = sorted({c for c in wcuts if c <= wlen})
    writable = []
    prev = 0
    for p in [*wpoints, wlen]:
        writable.append(memoryview(back)[prev:p])
        prev = p
    used = rig.target.handle_request(readable, writable)
    if wlen < RESP_SIZE:
        assert used == 0 and back == bytearray(wlen)
    else:
        check_reply(used, back, wlen - RESP_SIZE)
    assert_no_internal_failure(caplog)


@FUZZ
@given(raw=st.binary(max_size=40), wlen=st.integers(0, 8))
def test_random_control_requests(
    rig: Rig, caplog: pytest.LogCaptureFixture, raw: bytes, wlen: int
) -> None:
    resp = bytearray(wlen)
    used = rig.target.handle_control([memoryview(bytearray(raw))], [memoryview(resp)])
    assert 0 <= used <= wlen and used in (0, 1, 5)
    if used:
        assert resp[used - 1] in (0, 3, 9, 10, 11, 12)
    assert_no_internal_failure(caplog)
