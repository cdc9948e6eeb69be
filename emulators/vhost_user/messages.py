"""Payload structures of vhost-user messages.

Every payload is a frozen, slotted dataclass that checks its own field
ranges when built (so we cannot encode nonsense) and knows its wire form
(`pack`) and how to read it back (`unpack`, which trusts the caller to have
checked the size: the codec does that before it calls).  File descriptors
are never part of a payload: they travel beside it in `Message.fds`, in the
order the payload describes (one per memory region, say).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from .errors import LocalProtocolError

_U32_MAX = 0xFFFF_FFFF
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF


def _check_range(name: str, value: int, maximum: int) -> None:
    if not 0 <= value <= maximum:
        raise LocalProtocolError(f"{name}={value:#x} does not fit in its field")


@dataclass(frozen=True, slots=True)
class U64:
    """A single u64: features, acks, counts."""

    value: int

    SIZE: ClassVar[int] = 8
    _S: ClassVar[struct.Struct] = struct.Struct("<Q")

    def __post_init__(self) -> None:
        _check_range("value", self.value, _U64_MAX)

    def pack(self) -> bytes:
        return self._S.pack(self.value)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        return cls(*cls._S.unpack(data))


@dataclass(frozen=True, slots=True)
class VringState:
    """Ring index and a number (size, base, enable flag) for the SET/GET_VRING_* family."""

    index: int
    num: int

    SIZE: ClassVar[int] = 8
    _S: ClassVar[struct.Struct] = struct.Struct("<II")

    def __post_init__(self) -> None:
        _check_range("index", self.index, _U32_MAX)
        _check_range("num", self.num, _U32_MAX)

    def pack(self) -> bytes:
        return self._S.pack(self.index, self.num)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        return cls(*cls._S.unpack(data))


@dataclass(frozen=True, slots=True)
class VringAddr:
    """SET_VRING_ADDR: the ring's parts, as front-end (QEMU) virtual addresses."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int

    SIZE: ClassVar[int] = 40
    _S: ClassVar[struct.Struct] = struct.Struct("<IIQQQQ")

    def __post_init__(self) -> None:
        _check_range("index", self.index, _U32_MAX)
        _check_range("flags", self.flags, _U32_MAX)
        for name in ("desc_user_addr", "used_user_addr", "avail_user_addr", "log_guest_addr"):
            _check_range(name, getattr(self, name), _U64_MAX)

    def pack(self) -> bytes:
        return self._S.pack(
            self.index,
            self.flags,
            self.desc_user_addr,
            self.used_user_addr,
            self.avail_user_addr,
            self.log_guest_addr,
        )

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        return cls(*cls._S.unpack(data))


@dataclass(frozen=True, slots=True)
class VringFd:
    """SET_VRING_KICK/CALL/ERR: a ring index, and whether an fd comes along."""

    index: int
    no_fd: bool = False

    SIZE: ClassVar[int] = 8
    _S: ClassVar[struct.Struct] = struct.Struct("<Q")

    def __post_init__(self) -> None:
        _check_range("index", self.index, 0xFF)

    def pack(self) -> bytes:
        return self._S.pack(self.index | (0x100 if self.no_fd else 0))

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        (value,) = cls._S.unpack(data)
        # The codec has already refused bits above 8.
        return cls(index=value & 0xFF, no_fd=bool(value & 0x100))


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One guest RAM region: where the guest sees it, where QEMU maps it, and
    where it starts inside the fd that comes with it."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    SIZE: ClassVar[int] = 32
    _S: ClassVar[struct.Struct] = struct.Struct("<QQQQ")

    def __post_init__(self) -> None:
        for name in ("guest_phys_addr", "memory_size", "userspace_addr", "mmap_offset"):
            _check_range(name, getattr(self, name), _U64_MAX)

    def pack(self) -> bytes:
        return self._S.pack(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        return cls(*cls._S.unpack(data))


@dataclass(frozen=True, slots=True)
class MemoryTable:
    """SET_MEM_TABLE: u32 count, u32 padding, then the regions."""

    regions: tuple[MemoryRegion, ...]

    _S: ClassVar[struct.Struct] = struct.Struct("<II")

    def __post_init__(self) -> None:
        if len(self.regions) > 8:
            raise LocalProtocolError(f"{len(self.regions)} memory regions, at most 8 allowed")

    def pack(self) -> bytes:
        return self._S.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        count, _padding = cls._S.unpack_from(data)
        size = MemoryRegion.SIZE
        return cls(
            tuple(
                MemoryRegion.unpack(data[8 + i * size : 8 + (i + 1) * size]) for i in range(count)
            )
        )


@dataclass(frozen=True, slots=True)
class SingleMemoryRegion:
    """ADD_MEM_REG / REM_MEM_REG: u64 padding, then one region."""

    region: MemoryRegion

    SIZE: ClassVar[int] = 40

    def pack(self) -> bytes:
        return bytes(8) + self.region.pack()

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        return cls(MemoryRegion.unpack(data[8:40]))


@dataclass(frozen=True, slots=True)
class LogDescription:
    """SET_LOG_BASE: size and offset of the dirty log inside the fd that comes along."""

    mmap_size: int
    mmap_offset: int

    SIZE: ClassVar[int] = 16
    _S: ClassVar[struct.Struct] = struct.Struct("<QQ")

    def __post_init__(self) -> None:
        _check_range("mmap_size", self.mmap_size, _U64_MAX)
        _check_range("mmap_offset", self.mmap_offset, _U64_MAX)

    def pack(self) -> bytes:
        return self._S.pack(self.mmap_size, self.mmap_offset)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        return cls(*cls._S.unpack(data))


@dataclass(frozen=True, slots=True)
class Config:
    """GET_CONFIG / SET_CONFIG: offset, size, flags, then `size` bytes of config space."""

    offset: int
    flags: int
    data: bytes

    HEADER: ClassVar[struct.Struct] = struct.Struct("<III")

    def __post_init__(self) -> None:
        _check_range("offset", self.offset, _U32_MAX)
        _check_range("flags", self.flags, _U32_MAX)
        if len(self.data) > 256:
            raise LocalProtocolError(f"config payload of {len(self.data)} bytes, at most 256")

    def pack(self) -> bytes:
        return self.HEADER.pack(self.offset, len(self.data), self.flags) + self.data

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        offset, _size, flags = cls.HEADER.unpack_from(data)
        return cls(offset=offset, flags=flags, data=bytes(data[12:]))


@dataclass(frozen=True, slots=True)
class RawPayload:
    """Bytes of a request mplaunch frames but does not model (it refuses them)."""

    data: bytes

    def pack(self) -> bytes:
        return self.data

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        return cls(bytes(data))


Payload = (
    U64
    | VringState
    | VringAddr
    | VringFd
    | MemoryTable
    | SingleMemoryRegion
    | LogDescription
    | Config
    | RawPayload
    | None
)
"""What a message carries; None for the requests that have no payload."""
