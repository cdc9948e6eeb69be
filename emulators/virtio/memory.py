"""Guest RAM: the one checked door.

Theory of operation
-------------------
The frontend (QEMU) describes guest RAM with a table of regions (vhost-user
SET_MEM_TABLE): each region has a guest physical address range, the virtual
address where QEMU itself mapped it (``userspace_addr``, used by
SET_VRING_ADDR), and a file descriptor plus the offset of the region inside
that file. The emulator maps each region's file and from then on every access
to guest memory goes through :class:`GuestMemory`, which checks that the whole
range lies inside one region before handing out bytes or a memoryview.
Nothing else in the emulator computes raw offsets into guest RAM.

Addresses come from a guest we do not trust, so every computation is done on
Python integers (no wrap-around) and compared with the region bounds; a range
that falls outside raises :class:`GuestMemoryError` with the address and
length.

The memoryview rule
-------------------
:meth:`GuestMemory.view` returns a memoryview that aliases guest RAM (this
is what lets preadv/pwritev move data straight into the guest's buffers).
While any such view is alive, its mmap cannot be unmapped. Views are meant
to live for one request: drop them (or call ``release()``) once the request is
complete. :meth:`GuestMemory.close` unmaps every region whose views are all
gone and leaves the rest to be unmapped by the runtime when their last view is
released; it returns how many regions were left that way, so a caller that
expects zero can tell it leaked a view.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from emulators.virtio.errors import GuestMemoryError

__all__ = ["MAX_REGIONS", "GuestMemory", "MemoryRegion", "RegionBuffer", "buffer_address"]

#: What can back a region: anything writable that memoryview accepts.
RegionBuffer = bytearray | memoryview | mmap.mmap

#: vhost-user's VHOST_MEMORY_BASELINE_NREGIONS: the frontend sends at most
#: this many regions unless the configure-mem-slots protocol feature says more.
MAX_REGIONS = 8

_U64_LIMIT = 1 << 64
_c_char_from_buffer = ctypes.c_char.from_buffer
_addressof = ctypes.addressof
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One guest RAM region as vhost-user SET_MEM_TABLE describes it.

    ``fd`` is the opaque descriptor of the file backing the region (-1 when
    the region is backed by a test buffer).
    """

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    fd: int = -1

    def __post_init__(self) -> None:
        for name in ("guest_phys_addr", "memory_size", "userspace_addr", "mmap_offset"):
            value = getattr(self, name)
            if not 0 <= value < _U64_LIMIT:
                raise GuestMemoryError(f"region {name} {value:#x} is not a u64")
        if self.memory_size == 0:
            raise GuestMemoryError(f"region at gpa {self.guest_phys_addr:#x} has size 0")
        # An end of exactly 2**64 would still be fine, one past is a wrap.
        if self.guest_phys_addr + self.memory_size > _U64_LIMIT:
            raise GuestMemoryError(
                "region wraps the guest physical address space",
                self.guest_phys_addr,
                self.memory_size,
            )
        if self.userspace_addr + self.memory_size > _U64_LIMIT:
            raise GuestMemoryError(
                "region wraps the frontend's address space",
                self.userspace_addr,
                self.memory_size,
            )
        if self.mmap_offset + self.memory_size > _U64_LIMIT:
            raise GuestMemoryError(
                "region's file range wraps", self.mmap_offset, self.memory_size
            )

    @property
    def gpa_end(self) -> int:
        """One past the last guest physical address of the region."""
        return self.guest_phys_addr + self.memory_size

    @property
    def uva_end(self) -> int:
        """One past the last frontend virtual address of the region."""
        return self.userspace_addr + self.memory_size


def buffer_address(buffer: RegionBuffer) -> int:
    """The address of a writable, non-empty buffer's first byte.

    The ctypes object that tells it is dropped at once, so the buffer holds
    no export afterwards (an mmap under it can still be closed)."""
    probe = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(probe)
    finally:
        del probe


def _check_disjoint(regions: Sequence[MemoryRegion], start: str, end: str, what: str) -> None:
    ordered = sorted(regions, key=lambda r: getattr(r, start))
    for prev, cur in zip(ordered, ordered[1:], strict=False):
        if getattr(cur, start) < getattr(prev, end):
            raise GuestMemoryError(
                f"regions overlap in {what}", getattr(cur, start), cur.memory_size
            )


class GuestMemory:
    """Checked access to guest RAM made of one or more regions.

    Build it with :meth:`from_fds` (production: maps each region's file) or
    :meth:`from_buffers` (tests: any writable buffers). All addresses are
    guest physical addresses unless a method says otherwise.
    """

    __slots__ = (
        "_regions", "_starts", "_ends", "_views", "_maps", "_closed", "_single", "_hosts"
    )

    def __init__(
        self,
        regions: Sequence[MemoryRegion],
        buffers: Sequence[RegionBuffer],
        *,
        max_regions: int = MAX_REGIONS,
        _maps: Sequence[mmap.mmap] = (),
    ) -> None:
        if len(regions) != len(buffers):
            raise GuestMemoryError(f"{len(regions)} regions but {len(buffers)} buffers")
        if not 0 < len(regions) <= max_regions:
            raise GuestMemoryError(f"{len(regions)} regions; allowed 1 to {max_regions}")
        _check_disjoint(regions, "guest_phys_addr", "gpa_end", "guest physical addresses")
        _check_disjoint(regions, "userspace_addr", "uva_end", "frontend virtual addresses")
        pairs = sorted(zip(regions, buffers, strict=True), key=lambda p: p[0].guest_phys_addr)
        views: list[memoryview] = []
        for region, buf in pairs:
            view = memoryview(buf).cast("B")
            if view.readonly:
                raise GuestMemoryError(
                    "region buffer is read-only", region.guest_phys_addr, region.memory_size
                )
            if len(view) < region.memory_size:
                raise GuestMemoryError(
                    f"region buffer holds only {len(view):#x} bytes",
                    region.guest_phys_addr,
                    region.memory_size,
                )
            views.append(view[: region.memory_size])
        self._regions = tuple(r for r, _ in pairs)
        self._starts = [r.guest_phys_addr for r in self._regions]
        self._ends = [r.gpa_end for r in self._regions]
        self._views = views
        self._maps = list(_maps)
        self._closed = False
        # Fast path: almost every VM small enough for this project has guest
        # RAM below 3 GiB in one or two regions; one region skips bisect.
        self._single = len(self._regions) == 1
        self._hosts: list[int] | None = None  # each region's address here, once asked

    # ------------------------------------------------------------------
    # construction

    @classmethod
    def from_buffers(
        cls,
        regions: Sequence[MemoryRegion],
        buffers: Sequence[RegionBuffer],
        *,
        max_regions: int = MAX_REGIONS,
    ) -> GuestMemory:
        """Guest memory over caller-owned writable buffers (e.g. bytearrays)."""
        return cls(regions, buffers, max_regions=max_regions)

    @classmethod
    def from_fds(
        cls, regions: Sequence[MemoryRegion], *, max_regions: int = MAX_REGIONS
    ) -> GuestMemory:
        """Map each region's ``fd`` shared, read-write, at its ``mmap_offset``.

        mmap wants a page-aligned file offset, so the mapping starts at the
        page holding ``mmap_offset`` and the view skips the head. The fds stay
        owned by the caller (mmap keeps its own duplicate); close them when
        convenient.
        """
        if not 0 < len(regions) <= max_regions:
            raise GuestMemoryError(f"{len(regions)} regions; allowed 1 to {max_regions}")
        maps: list[mmap.mmap] = []
        buffers: list[memoryview] = []
        try:
            for region in regions:
                if region.fd < 0:
                    raise GuestMemoryError(
                        "region has no fd", region.guest_phys_addr, region.memory_size
                    )
                skip = region.mmap_offset % mmap.ALLOCATIONGRANULARITY
                try:
                    m = mmap.mmap(
                        region.fd,
                        region.memory_size + skip,
                        flags=mmap.MAP_SHARED,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE,
                        offset=region.mmap_offset - skip,
                    )
                except (OSError, ValueError, OverflowError) as exc:
                    raise GuestMemoryError(
                        f"cannot map region: {exc}", region.guest_phys_addr, region.memory_size
                    ) from exc
                maps.append(m)
                buffers.append(memoryview(m)[skip:])
            memory = cls(regions, buffers, max_regions=max_regions, _maps=maps)
        except BaseException:
            for view in buffers:
                view.release()
            for m in maps:
                # A slice may still be referenced by the traceback's frames.
                with contextlib.suppress(BufferError):
                    m.close()
            raise
        # The constructor made its own slices; drop ours so close() can unmap.
        for view in buffers:
            view.release()
        return memory

    # ------------------------------------------------------------------
    # introspection

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        """The region table, sorted by guest physical address."""
        return self._regions

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------
    # translation

    def uva_to_gpa(self, uva: int, length: int) -> int:
        """Translate a frontend virtual address range (SET_VRING_ADDR) to a GPA.

        The whole ``[uva, uva + length)`` range must lie in one region.
        """
        self._check_open(uva, length)
        if uva < 0 or length < 0:
            raise GuestMemoryError("negative address or length", uva, length)
        for region in self._regions:
            if region.userspace_addr <= uva and uva + length <= region.uva_end:
                return region.guest_phys_addr + (uva - region.userspace_addr)
        raise GuestMemoryError("frontend address not in any region", uva, length)

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable memoryview of ``[gpa, gpa + length)``, inside one region.

        A zero length is allowed (an empty view) when ``gpa`` is inside a
        region or at its end. See the module docstring for how long a view
        may be kept.
        """
        if self._single:
            start = self._starts[0]
            off = gpa - start
            if gpa >= start and length >= 0 and gpa + length <= self._ends[0]:
                return self._views[0][off : off + length]
        else:
            i = bisect.bisect_right(self._starts, gpa) - 1
            if i >= 0 and length >= 0 and gpa + length <= self._ends[i]:
                off = gpa - self._starts[i]
                return self._views[i][off : off + length]
        self._check_open(gpa, length)
        raise GuestMemoryError("range not inside one guest memory region", gpa, length)

    def main_view(self) -> tuple[int, memoryview]:
        """``(first gpa, view)`` of the largest region (the only one, usually).

        For the request fast path (:func:`emulators.virtio.chain.walk_split`),
        which slices buffers inside this region out of the view itself
        instead of calling :meth:`view` per descriptor, and calls :meth:`view`
        for any other. It owes the same checks :meth:`view` makes: ``0 <=
        gpa - start`` and ``gpa - start + length <= len(view)``, on Python
        integers. The view is released by :meth:`close`; drop it with the
        queue that holds it.
        """
        self._check_open(0, 0)
        i = max(range(len(self._views)), key=lambda k: len(self._views[k]))
        return self._starts[i], self._views[i]

    def gpa_of(self, view: memoryview) -> int:
        """The guest physical address of a non-empty view this memory handed
        out (the dirty log needs it for buffers whose address the request
        path did not keep). GuestMemoryError for any other buffer."""
        hosts = self._hosts
        if hosts is None:
            self._check_open(0, 0)
            hosts = self._hosts = [buffer_address(v) for v in self._views]
        probe = _c_char_from_buffer(view)
        where = _addressof(probe)
        del probe  # no export left on the view
        length = len(view)
        if self._single:
            off = where - hosts[0]
            if off >= 0 and self._starts[0] + off + length <= self._ends[0]:
                return self._starts[0] + off
        else:
            for host, start, end in zip(hosts, self._starts, self._ends, strict=True):
                off = where - host
                if off >= 0 and start + off + length <= end:
                    return start + off
        raise GuestMemoryError("buffer is not a view of guest memory", where, length)

    def views(self, gpa: int, length: int) -> list[memoryview]:
        """Views covering ``[gpa, gpa + length)``, which may span adjacent regions.

        Regions are adjacent when one ends exactly where the next starts; any
        hole in between is an error. An empty range gives an empty list.
        """
        if length == 0:
            self.view(gpa, 0)  # still validates the address
            return []
        if self._single or length < 0:
            return [self.view(gpa, length)]
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0 or gpa >= self._ends[i]:
            self._check_open(gpa, length)
            raise GuestMemoryError("range not inside guest memory", gpa, length)
        out: list[memoryview] = []
        addr, left = gpa, length
        while True:
            chunk = min(left, self._ends[i] - addr)
            off = addr - self._starts[i]
            out.append(self._views[i][off : off + chunk])
            addr += chunk
            left -= chunk
            if not left:
                return out
            i += 1
            if i >= len(self._starts) or self._starts[i] != addr:
                raise GuestMemoryError("range crosses a hole in guest memory", gpa, length)

    # ------------------------------------------------------------------
    # copies

    def read(self, gpa: int, n: int) -> bytes:
        """Copy ``n`` bytes out of guest memory (may span adjacent regions)."""
        parts = self.views(gpa, n)
        if len(parts) == 1:
            return parts[0].tobytes()
        return b"".join(parts)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory (may span adjacent regions)."""
        src = memoryview(data).cast("B")
        pos = 0
        for part in self.views(gpa, len(src)):
            part[:] = src[pos : pos + len(part)]
            pos += len(part)

    def read_u16(self, gpa: int) -> int:
        """Little-endian u16 (virtio 1.x rings are little-endian)."""
        return int(_U16.unpack_from(self.view(gpa, 2))[0])

    def read_u32(self, gpa: int) -> int:
        return int(_U32.unpack_from(self.view(gpa, 4))[0])

    def read_u64(self, gpa: int) -> int:
        return int(_U64.unpack_from(self.view(gpa, 8))[0])

    def write_u16(self, gpa: int, value: int) -> None:
        _U16.pack_into(self.view(gpa, 2), 0, value)

    def write_u32(self, gpa: int, value: int) -> None:
        _U32.pack_into(self.view(gpa, 4), 0, value)

    def write_u64(self, gpa: int, value: int) -> None:
        _U64.pack_into(self.view(gpa, 8), 0, value)

    # ------------------------------------------------------------------
    # teardown

    def close(self) -> int:
        """Stop access and unmap; return how many regions are still mapped.

        A region stays mapped while a view returned earlier is alive (the
        mmap refuses to close under an exported buffer); it is unmapped when
        the last such view is released. After close every access raises
        :class:`GuestMemoryError`.
        """
        if self._closed:
            return 0
        self._closed = True
        for view in self._views:
            view.release()
        self._views = []
        self._starts = []
        self._ends = []
        self._single = False
        self._hosts = None
        deferred = 0
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                deferred += 1
        self._maps = []
        return deferred

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self, gpa: int, length: int) -> None:
        if self._closed:
            raise GuestMemoryError("guest memory is closed", gpa, length)
