"""Numbers of the vhost-user protocol: request codes, header flags, feature bits.

The values come from the vhost-user specification (QEMU's
docs/interop/vhost-user.rst) and the virtio 1.2 specification.  Only the
front-end-to-back-end request set is listed: mplaunch never opens the
back-end-to-front-end channel.
"""

from __future__ import annotations

import enum
import struct
from typing import Final


class Request(enum.IntEnum):
    """Front-end request codes (vhost-user spec, "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21  # called SET_SLAVE_REQ_FD in older texts
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class HeaderFlag(enum.IntFlag):
    """Bits of the header's flags word (vhost-user spec, "Header")."""

    VERSION_1 = 0x1
    REPLY = 0x4
    NEED_REPLY = 0x8


VERSION_MASK: Final = 0x3
"""Bits 0-1 hold the protocol version; only version 1 exists."""

KNOWN_FLAGS: Final = int(HeaderFlag.VERSION_1 | HeaderFlag.REPLY | HeaderFlag.NEED_REPLY)

HEADER = struct.Struct("<III")
"""request u32, flags u32, size u32, little-endian (the spec's byte order)."""

HEADER_SIZE: Final = HEADER.size

MAX_PAYLOAD_SIZE: Final = 4096
"""No request mplaunch accepts comes near this; a bigger size is an attack."""

MAX_MEM_REGIONS: Final = 8
"""VHOST_MEMORY_BASELINE_NREGIONS: the most regions one SET_MEM_TABLE holds."""

MAX_CONFIG_SIZE: Final = 256
"""The largest config space GET_CONFIG/SET_CONFIG may carry."""

VRING_INDEX_MASK: Final = 0xFF
"""SET_VRING_KICK/CALL/ERR: bits 0-7 of the u64 hold the ring index ..."""

VRING_NOFD_MASK: Final = 0x100
"""... and bit 8 says that no file descriptor comes with the message."""

VRING_F_LOG: Final = 0
"""Bit of SET_VRING_ADDR's flags asking for used-ring dirty logging."""

LOG_MAX_BYTES: Final = 1 << 26
"""The largest dirty log SET_LOG_BASE may map: one bit per 4 KiB page of
2 TiB of guest physical address space, far beyond any guest mplaunch runs,
and small beside the emulator's address-space headroom."""


class Feature(enum.IntEnum):
    """Virtio device feature bits mplaunch knows (bit numbers, not masks)."""

    SCSI_INOUT = 0  # virtio 1.2, 5.6.3
    SCSI_HOTPLUG = 1
    SCSI_CHANGE = 2
    LOG_ALL = 26  # VHOST_F_LOG_ALL: log every guest write (live migration)
    RING_INDIRECT_DESC = 28  # virtio 1.2, 6
    RING_EVENT_IDX = 29
    PROTOCOL_FEATURES = 30  # VHOST_USER_F_PROTOCOL_FEATURES, vhost-user only
    VERSION_1 = 32


class ProtocolFeature(enum.IntEnum):
    """vhost-user protocol feature bits (spec, "Protocol features")."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


def feature_mask(*bits: int) -> int:
    """Return the u64 mask with the given bit numbers set."""
    mask = 0
    for bit in bits:
        mask |= 1 << bit
    return mask


DEFAULT_FEATURES: Final = feature_mask(
    Feature.VERSION_1,
    Feature.PROTOCOL_FEATURES,
    Feature.RING_INDIRECT_DESC,
    Feature.RING_EVENT_IDX,
    Feature.SCSI_HOTPLUG,
    Feature.SCSI_CHANGE,
    Feature.LOG_ALL,
)
"""What the SCSI back-end offers unless told otherwise.  LOG_ALL is acked by
QEMU only while a migration logs (vhost_dev_set_log); without it QEMU blocks
migration."""

DEFAULT_PROTOCOL_FEATURES: Final = feature_mask(
    ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.LOG_SHMFD
)
"""MQ lets QEMU ask how many queues there are; REPLY_ACK lets it ask for acks;
LOG_SHMFD gives the dirty log as a shared memory fd (SET_LOG_BASE), without
which QEMU 7.2 refuses to migrate a VM with a vhost-user device.  QEMU 7.2's
vhost-user-scsi needs nothing else (no CONFIG: QEMU builds the virtio-scsi
config space itself)."""
