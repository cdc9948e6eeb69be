"""Virtio transport pieces of the emulator: guest memory, split queues, chains.

Pure code: nothing here opens, polls or signals anything. The vhost-user
layer builds a :class:`GuestMemory` from SET_MEM_TABLE, a :class:`SplitQueue`
per ring from SET_VRING_NUM/BASE/ADDR, and drives it on each kick.
"""

from emulators.virtio.chain import BadChain, DescriptorChain, gather, split_buffers, walk_chain
from emulators.virtio.errors import (
    ChainError,
    ChainFault,
    GuestMemoryError,
    QueueConfigError,
    QueueError,
    QueueFault,
    RecoveryError,
    VirtioError,
)
from emulators.virtio.memory import MAX_REGIONS, GuestMemory, MemoryRegion
from emulators.virtio.splitqueue import SplitQueue, vring_need_event
from emulators.virtio.state import (
    BufferQueueState,
    MemoryQueueState,
    QueueState,
    ResumePlan,
    inflight_heads_oldest_first,
    required_size,
    resume,
)

__all__ = [
    "MAX_REGIONS",
    "BadChain",
    "BufferQueueState",
    "ChainError",
    "ChainFault",
    "DescriptorChain",
    "GuestMemory",
    "GuestMemoryError",
    "MemoryQueueState",
    "MemoryRegion",
    "QueueConfigError",
    "QueueError",
    "QueueFault",
    "QueueState",
    "RecoveryError",
    "ResumePlan",
    "SplitQueue",
    "VirtioError",
    "gather",
    "inflight_heads_oldest_first",
    "required_size",
    "resume",
    "split_buffers",
    "vring_need_event",
    "walk_chain",
]
