"""The request fast path gives what the checked path gives.

Three fast pieces, each held against the general code it shortcuts, on
random and hostile input: ``walk_split`` against ``walk_chain`` (same
buffers, or None wherever the checked walker refuses or the shape is not
the usual one), ``SplitQueue.pop_split``/``push_used_batch`` against
``pop_all``/``push_used_many`` (same chains, same ring and state bytes), and
``VirtioScsiTarget.handle_split`` (``scsi.fastpath.serve_rw``) against
``handle_request`` (same used length, response, data and disk, LUN state).
"""

from __future__ import annotations

import ctypes
import os
import struct
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulators.scsi.backend import FdBackend
from emulators.scsi.fastpath import CHECKED, serve_rw
from emulators.scsi.lun import LogicalUnit, LunState
from emulators.scsi.sense import LBA_OUT_OF_RANGE, UA_POWER_ON_RESET
from emulators.scsi.virtio_scsi import VirtioScsiTarget, encode_lun_field
from emulators.virtio.chain import DescriptorChain, walk_chain, walk_split
from emulators.virtio.errors import ChainError, ChainFault
from emulators.virtio.memory import GuestMemory, MemoryRegion
from tests.support.driver import TestDriver, queue_for

OUT, IN = 51, 108  # virtio-scsi's request and response headers (cdb 32, sense 96)
RAM = 1 << 16
DESC = struct.Struct("<QIHH")
TABLE, INDIRECT_TABLE = 0x0, 0x200


def _where(view: memoryview) -> tuple[int, int]:
    """(address, length) of a view: the same buffer, not just the same bytes."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view)), view.nbytes


def _memory(layout: str) -> GuestMemory:
    if layout == "one":
        return GuestMemory.from_buffers([MemoryRegion(0, RAM, 0, 0)], [bytearray(RAM)])
    half = RAM // 2
    second = half if layout == "adjacent" else half + 0x1000  # else: a hole
    return GuestMemory.from_buffers(
        [MemoryRegion(0, half, 0, 0), MemoryRegion(second, half, 1 << 30, 0)],
        [bytearray(half), bytearray(half)],
    )


_descriptor = st.tuples(
    st.sampled_from([0x1000, 0x3000, 0x7FE0, 0x7FF8, 0xFFF0, 0x20000, INDIRECT_TABLE]),
    st.sampled_from([0, 1, 16, 32, OUT, IN, 4096, 0xFFFF_FFFF]),
    st.integers(0, 7),
    st.integers(0, 9),
)


@st.composite
def _tables(draw: st.DrawFn) -> tuple[list[tuple[int, int, int, int]], ...]:
    """A descriptor table and an indirect table: random descriptors, or (most
    often) a chain of the usual shape, direct or indirect, with up to two
    fields of its descriptors then overwritten at random. Its head first."""
    table = draw(st.lists(_descriptor, min_size=8, max_size=8))
    indirect_table = draw(st.lists(_descriptor, min_size=4, max_size=4))
    head = draw(st.integers(0, 7))
    if draw(st.integers(0, 3)):
        n_out, n_in = draw(st.integers(0, 1)), draw(st.integers(0, 1))
        lengths = [OUT] + [4096] * n_out + [IN] + [512] * n_in
        writes = [0] * (1 + n_out) + [2] * (1 + n_in)
        addrs = [0x1000 + 0x1000 * i for i in range(len(lengths))]
        if draw(st.booleans()):  # indirect: entries 0.. of the table at the head
            slots = list(range(len(lengths)))
            target = indirect_table
            table[head] = (INDIRECT_TABLE, 16 * len(lengths), 4, 0)
        else:
            slots = draw(st.permutations(range(8)))[: len(lengths)]
            target = table
            head = slots[0]
        for k, slot in enumerate(slots):
            last = k == len(slots) - 1
            nxt = 0 if last else slots[k + 1]
            target[slot] = (addrs[k], lengths[k], writes[k] | (0 if last else 1), nxt)
        for _ in range(draw(st.integers(0, 2))):  # mostly one of the chain's own
            where, i = draw(st.one_of(
                st.sampled_from([(target, slot) for slot in slots]),
                st.sampled_from([(table, head), *((table, k) for k in range(8)),
                                 *((indirect_table, k) for k in range(4))]),
            ))
            field = draw(st.sampled_from([0, 1, 2, 2, 3]))
            value = draw(st.integers(0, 7)) if field == 2 else draw(_descriptor)[field]
            desc = list(where[i])
            desc[field] = value
            where[i] = (desc[0], desc[1], desc[2], desc[3])
    return [(head, 0, 0, 0)], table, indirect_table


@settings(max_examples=800, deadline=None)
@given(
    layout=st.sampled_from(["one", "one", "adjacent", "hole"]),
    tables=_tables(),
    indirect=st.booleans(),
    max_indirect=st.sampled_from([2, 1024, 1024]),
)
def test_walk_split_is_walk_chain_or_none(
    layout: str,
    tables: tuple[list[tuple[int, int, int, int]], ...],
    indirect: bool,
    max_indirect: int,
) -> None:
    (head, *_), table, indirect_table = tables[0][0], tables[1], tables[2]
    memory = _memory(layout)
    for base, descs in ((TABLE, table), (INDIRECT_TABLE, indirect_table)):
        for i, desc in enumerate(descs):
            memory.write(base + 16 * i, DESC.pack(*desc))
    view = memory.view(TABLE, 16 * 8)
    try:
        general: DescriptorChain | None = walk_chain(
            memory, view, 8, head, indirect=indirect, max_indirect=max_indirect
        )
    except ChainError:
        general = None
    fast = walk_split(
        memory, memory.main_view(), view, 8, head, OUT, IN, indirect, max_indirect
    )
    if fast is None:
        return
    assert general is not None, "the fast walker took a chain the checked one refuses"
    got_head, out_hdr, data_out, out_len, in_hdr, data_in, in_len = fast
    assert got_head == head
    assert [_where(v) for v in general.readable] == [_where(v) for v in [out_hdr, *data_out]]
    assert [_where(v) for v in general.writable] == [_where(v) for v in [in_hdr, *data_in]]
    assert (general.readable_len, general.writable_len) == (OUT + out_len, IN + in_len)


_HEAD = (0x1000, OUT, 1, 1)
_RESP = (0x2000, IN, 3, 2)
_DATA = (0x3000, 512, 2, 0)


@pytest.mark.parametrize(
    ("case", "table", "indirect_table", "fault"),
    [
        ("loop", [_HEAD, _RESP, (0x3000, 512, 3, 1)], [], ChainFault.LOOP),
        ("next out of range", [_HEAD, (0x2000, IN, 3, 9)], [], ChainFault.NEXT_OUT_OF_RANGE),
        ("readable after writable", [_HEAD, _RESP, (0x3000, 512, 0, 0)], [],
         ChainFault.READABLE_AFTER_WRITABLE),
        ("indirect with next", [(INDIRECT_TABLE, 48, 5, 1)], [_HEAD, _RESP, _DATA],
         ChainFault.INDIRECT_WITH_NEXT),
        ("indirect bad length", [(INDIRECT_TABLE, 40, 4, 0)], [_HEAD, _RESP, _DATA],
         ChainFault.INDIRECT_BAD_LENGTH),
        ("indirect nested", [(INDIRECT_TABLE, 32, 4, 0)], [(INDIRECT_TABLE, 32, 4, 0)],
         ChainFault.INDIRECT_NESTED),
        ("indirect out of memory", [(RAM - 16, 48, 4, 0)], [], ChainFault.INDIRECT_OUT_OF_MEMORY),
        ("indirect loop", [(INDIRECT_TABLE, 48, 4, 0)], [_HEAD, _RESP, (0x3000, 512, 3, 1)],
         ChainFault.LOOP),
        ("buffer out of memory", [_HEAD, (RAM - 8, IN, 2, 0)], [],
         ChainFault.BUFFER_OUT_OF_MEMORY),
        ("short header", [(0x1000, OUT - 1, 1, 1), _RESP, _DATA], [], None),
        ("header and data in one", [(0x1000, OUT + 512, 1, 1), (0x2000, IN, 2, 0)], [], None),
        ("no response", [(0x1000, OUT, 0, 0)], [], None),
        ("zero-length data", [_HEAD, (0x4000, 0, 1, 2), (0x2000, IN, 2, 0)], [], None),
        ("indirect after data", [_HEAD, (INDIRECT_TABLE, 32, 4, 0)],
         [(0x2000, IN, 3, 1), _DATA], None),
    ],
)
def test_hostile_and_unusual_chains_go_to_the_checked_walker(
    case: str,
    table: list[tuple[int, int, int, int]],
    indirect_table: list[tuple[int, int, int, int]],
    fault: ChainFault | None,
) -> None:
    memory = _memory("one")
    for base, descs in ((TABLE, table), (INDIRECT_TABLE, indirect_table)):
        for i, desc in enumerate(descs):
            memory.write(base + 16 * i, DESC.pack(*desc))
    view = memory.view(TABLE, 16 * 8)
    assert walk_split(memory, memory.main_view(), view, 8, 0, OUT, IN, True, 1024) is None
    if fault is None:  # legal, just not the usual shape
        walk_chain(memory, view, 8, 0, indirect=True)
    else:
        with pytest.raises(ChainError) as caught:
            walk_chain(memory, view, 8, 0, indirect=True)
        assert caught.value.fault is fault, case


def test_buffers_across_regions_go_to_the_checked_walker() -> None:
    memory = _memory("adjacent")
    for i, desc in enumerate([_HEAD, _RESP, (RAM // 2 - 256, 512, 2, 0)]):
        memory.write(16 * i, DESC.pack(*desc))
    view = memory.view(TABLE, 16 * 8)
    assert walk_split(memory, memory.main_view(), view, 8, 0, OUT, IN, True, 1024) is None
    assert len(walk_chain(memory, view, 8, 0, indirect=True).writable) == 3  # two views


@settings(max_examples=150, deadline=None)
@given(
    out_sizes=st.lists(st.integers(1, 3000), max_size=3),
    in_sizes=st.lists(st.integers(1, 3000), max_size=3),
    indirect=st.booleans(),
    extra=st.sampled_from([0, 1, -1]),
)
def test_pop_split_and_push_batch_match_the_general_queue(
    out_sizes: list[int], in_sizes: list[int], indirect: bool, extra: int
) -> None:
    """The usual shapes take the fast path; a header one byte off does not,
    and both come out as pop_all/push_used_many would have it."""
    fast_mem, slow_mem = _memory("one"), _memory("one")
    fast_driver = TestDriver(fast_mem, 32, 0x1000)
    slow_driver = TestDriver(slow_mem, 32, 0x1000)  # (it clears its rings: before the copy)
    heads = [
        fast_driver.add_chain(
            [bytes(range(OUT + extra))] + [b"o" * n for n in out_sizes],
            [IN, *in_sizes],
            indirect=indirect,
        )
        for _ in range(3)
    ]
    slow_mem.write(0, fast_mem.read(0, RAM))
    fast_q = queue_for(fast_driver, indirect=True)
    slow_q = queue_for(slow_driver, indirect=True)
    fast, slow = fast_q.pop_split(OUT, IN), slow_q.pop_all()
    assert len(fast) == len(slow) == 3
    for got, want in zip(fast, slow, strict=True):
        assert isinstance(want, DescriptorChain)
        if extra:
            assert isinstance(got, DescriptorChain)  # the checked walker's answer
            assert [v.tobytes() for v in got.readable] == [v.tobytes() for v in want.readable]
            continue
        assert type(got) is tuple
        _, out_hdr, data_out, _, in_hdr, data_in, _ = got
        assert [v.tobytes() for v in [out_hdr, *data_out]] == [
            v.tobytes() for v in want.readable
        ]
        assert [v.nbytes for v in [in_hdr, *data_in]] == [v.nbytes for v in want.writable]
    lengths = [7, 0, 0xFFFF_FFFF]
    fast_q.push_used_batch(list(reversed(heads)), lengths)
    slow_q.push_used_many(list(zip(reversed(heads), lengths, strict=True)))
    assert fast_mem.read(0, RAM) == slow_mem.read(0, RAM)
    assert (fast_q.used_idx, fast_q.inflight) == (slow_q.used_idx, slow_q.inflight) == (3, 0)


# -- SCSI --------------------------------------------------------------------

BLOCKS = 128


class _Side:
    """One target over its own copy of the disk."""

    def __init__(self, image: bytes, readonly: bool, wce: bool, ua: bool, sense: bool) -> None:
        fd, path = tempfile.mkstemp(prefix="fastpath-")
        os.unlink(path)
        os.pwrite(fd, image, 0)
        self.fd = fd
        state = LunState.fresh(initial_unit_attention=ua)
        state.write_cache_enabled = wce
        if sense:
            state.set_sense(LBA_OUT_OF_RANGE)
        self.lu = LogicalUnit(FdBackend(fd, 512, readonly), "d", state)
        self.target = VirtioScsiTarget({0: self.lu})

    def disk(self) -> bytes:
        return os.pread(self.fd, BLOCKS * 512, 0)

    def close(self) -> None:
        os.close(self.fd)


_ops = st.sampled_from([0x28, 0x2A, 0x88, 0x8A, 0x28, 0x2A, 0x08, 0xA8, 0x00, 0x12])
_lun_fields = st.sampled_from([
    *[encode_lun_field(0)] * 6, encode_lun_field(1),
    bytes((1, 0, 0, 0, 0, 0, 0, 0)), bytes((1, 1, 0x40, 0, 0, 0, 0, 0)),
    bytes((2, 0, 0x40, 0, 0, 0, 0, 0)), bytes((1, 0, 0x40, 0, 0, 0, 0, 1)),
])


def _header(lun_field: bytes, op: int, flags: int, lba: int, blocks: int, control: int) -> bytes:
    if op in (0x88, 0x8A):
        cdb = struct.pack(">BBQIBB", op, flags, lba, blocks, 0, control)
    else:
        cdb = struct.pack(">BBIBHB", op, flags, lba & 0xFFFF_FFFF, 0, blocks & 0xFFFF, control)
    return lun_field + struct.pack("<QBBB", 9, 0, 0, 0) + cdb.ljust(32, b"\0")


def _views(data: bytes, cuts: int) -> list[memoryview]:
    if not data:
        return []
    at = len(data) // 2 if cuts and len(data) > 1 else len(data)
    parts = [data[:at], data[at:]] if at < len(data) else [data]
    return [memoryview(bytearray(p)) for p in parts]


@settings(max_examples=500, deadline=None)
@given(
    op=_ops,
    flags=st.sampled_from([0] * 6 + [0x08, 0x10, 0x20, 0xE0, 0xFF]),
    lba=st.one_of(st.integers(0, BLOCKS - 12), st.integers(BLOCKS - 12, BLOCKS + 4),
                  st.just(1 << 40)),
    blocks=st.one_of(st.integers(1, 12), st.integers(1, 12), st.just(0), st.just(1 << 20)),
    control=st.sampled_from([0] * 5 + [4, 0x80]),
    lun_field=_lun_fields,
    out_len=st.sampled_from([0, 512, 1024, 4096, 6144, 6144]),
    in_len=st.sampled_from([0, 512, 1024, 4096, 6144, 6144]),
    cuts=st.integers(0, 1),
    readonly=st.sampled_from([False] * 4 + [True]),
    wce=st.sampled_from([True] * 4 + [False]),
    ua=st.sampled_from([False] * 4 + [True]),
    sense=st.sampled_from([False] * 4 + [True]),
    image_seed=st.integers(0, 255),
    usual=st.integers(0, 10),
)
def test_handle_split_matches_handle_request(
    op: int, flags: int, lba: int, blocks: int, control: int, lun_field: bytes,
    out_len: int, in_len: int, cuts: int, readonly: bool, wce: bool, ua: bool,
    sense: bool, image_seed: int, usual: int,
) -> None:
    """``usual`` below 10 makes it a request the fast path serves, except for
    the one field it names (8, 9: none), which keeps its random value."""
    if usual < 10:
        keep = usual
        flags = flags if keep == 0 else 0
        control = control if keep == 1 else 0
        lun_field = lun_field if keep == 2 else encode_lun_field(0)
        ua, sense = (ua, sense) if keep == 3 else (False, False)
        readonly, wce = (readonly, wce) if keep == 4 else (False, True)
        if keep != 5:
            blocks = min(max(blocks, 1), 12)
            lba = min(lba, BLOCKS - blocks)
        if keep != 6:
            least = min(blocks, 12) * 512
            in_len, out_len = max(in_len, least), max(out_len, least)
    image = bytes((i * 7 + image_seed) & 0xFF for i in range(BLOCKS * 512))
    header = _header(lun_field, op, flags, lba, blocks, control)
    payload = bytes((i * 13 + 1) & 0xFF for i in range(out_len))
    fast, slow = (_Side(image, readonly, wce, ua, sense) for _ in range(2))
    try:
        results = []
        for side, split in ((fast, True), (slow, False)):
            hdr = memoryview(bytearray(header))
            dout = _views(payload, cuts)
            resp = memoryview(bytearray(b"\xee" * IN))
            din = _views(b"\xdd" * in_len, cuts)
            if split:
                used = side.target.handle_split((0, hdr, dout, out_len, resp, din, in_len))
            else:
                used = side.target.handle_request([hdr, *dout], [resp, *din])
            results.append((
                used, resp.tobytes(), [v.tobytes() for v in din], side.disk(),
                side.lu.state.pack(),
            ))
        assert results[0] == results[1]
    finally:
        fast.close()
        slow.close()


def test_common_read_and_write_take_the_fast_path() -> None:
    side = _Side(bytes(range(256)) * (BLOCKS * 2), False, True, False, False)
    try:
        data = memoryview(bytearray(4096))
        resp = memoryview(bytearray(IN))
        hdr = memoryview(bytearray(_header(encode_lun_field(0), 0x28, 0, 8, 8, 0)))
        used = serve_rw(side.target.scsi.luns, hdr, [], 0, resp, [data], 4096)
        assert used == IN + 4096
        assert data.tobytes() == side.disk()[8 * 512 : 16 * 512]
        assert struct.unpack_from("<IIHBB", resp) == (0, 0, 0, 0, 0)
        hdr = memoryview(bytearray(_header(encode_lun_field(0), 0x8A, 0, 100, 1, 0)))
        block = memoryview(bytearray(b"w" * 512))
        assert serve_rw(side.target.scsi.luns, hdr, [block], 512, resp, [], 0) == IN
        assert side.disk()[100 * 512 : 101 * 512] == b"w" * 512
    finally:
        side.close()


def test_unusual_requests_go_to_the_checked_path_and_get_its_sense() -> None:
    side = _Side(bytes(BLOCKS * 512), False, True, True, False)
    try:
        luns = side.target.scsi.luns
        resp = memoryview(bytearray(IN))
        data = memoryview(bytearray(512))
        read = memoryview(bytearray(_header(encode_lun_field(0), 0x28, 0, BLOCKS, 1, 0)))
        assert serve_rw(luns, read, [], 0, resp, [data], 512) == CHECKED  # unit attention
        used = side.target.handle_split((0, read, [], 0, resp, [data], 512))
        assert used == IN and resp[12 + 12] == UA_POWER_ON_RESET.asc
        assert serve_rw(luns, read, [], 0, resp, [data], 512) == CHECKED  # past the end
        side.target.handle_split((0, read, [], 0, resp, [data], 512))
        sense_len, _, _, status, _ = struct.unpack_from("<IIHBB", resp)
        assert status == 2 and sense_len and resp[12 + 12] == LBA_OUT_OF_RANGE.asc
    finally:
        side.close()
