"""The rules on ids, LUN numbers, block sizes and image sizes, in one place.

Theory of operation. Four checkers see the same values: the spec parser
(``launcher.spec``), the management commands (``launcher.management``), the
supervisor's disk changes (``launcher.vmcontrol``, ``launcher.slots``) and
the emulator itself (``emulators.config``, its control commands). Each rule
lives here once, with the reason for its bound, and every checker imports
it, so no two checkers can disagree and a bound changes in one line.

The emulator imports this module before it is locked down and the launcher
imports it too, so it uses the standard library only.

Bounds that a wire format fixes live with that format, which is a leaf
module both sides import: controllers per emulator and request queues per
controller in ``launcher.heartbeat.protocol`` (``MAX_CONTROLLERS``,
``MAX_REQUEST_QUEUES``: what a heartbeat reply can carry), and the largest
ring the state store holds in ``launcher.statestore.layout``
(``MAX_QUEUE_SIZE``, the ring size an emulator accepts).
"""

from __future__ import annotations

import re
from typing import Final

ID_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
"""Emulator, controller and disk ids: short, safe in file names, QEMU ids and logs."""
ID_RULE: Final = "1 to 32 characters from a-z, 0-9, _, - (not starting with _ or -)"


def is_id(text: object) -> bool:
    """Whether ``text`` is a valid emulator, controller or disk id."""
    return isinstance(text, str) and ID_PATTERN.fullmatch(text) is not None


MAX_LUN: Final = 255
"""LUNs 0 to 255 on each controller. The state store keeps one LUN slot per
LUN number (``LUN_SLOTS`` of them per controller), so a LUN beyond it would
have no place for its unit attentions and mode settings across a restart.
SCSI's flat space addressing reaches further (``emulators.scsi.lun.FLAT_SPACE_MAX_LUN``);
mplaunch does not offer it."""
LUN_SLOTS: Final = MAX_LUN + 1
LUN_RULE: Final = f"an integer from 0 to {MAX_LUN}"

BLOCK_SIZES: Final = (512, 4096)
"""The logical block sizes a disk may have: what Linux and Windows guests boot from."""
BLOCK_SIZE_RULE: Final = "one of " + ", ".join(map(str, BLOCK_SIZES))

VIRTIO_MAX_QUEUE_SIZE: Final = 32768
"""Virtio 1.2 section 2.7: a split virtqueue holds at most 32768 entries. The
codec and the queue code refuse more; an emulator accepts only rings the
state store can hold (``launcher.statestore.layout.MAX_QUEUE_SIZE``)."""


def image_size_problem(size: int, block_size: int) -> str | None:
    """What is wrong with a disk image of ``size`` bytes, or None.

    A disk is a whole number of blocks, at least one: a partial last block
    could be neither read nor written by the guest.
    """
    if size == 0:
        return f"is empty; a disk image must hold at least one block of {block_size} bytes"
    if size % block_size:
        return f"size {size} bytes is not a multiple of block_size ({block_size})"
    return None


def resize_problem(current: int, new: int, block_size: int) -> str | None:
    """What is wrong with resizing a disk of ``current`` bytes to ``new``, or None.

    Disks only grow: the guest's filesystems may use every block it was
    shown, so a shrink would cut data away under them.
    """
    if new <= 0 or new % block_size:
        return f"size {new} is not a positive multiple of the block size {block_size}"
    if new < current:
        return f"size {new} is smaller than the current {current}: shrinking would lose data"
    return None

EXIT_PROTOCOL: Final = 3
"""The emulator's exit status when the front-end broke the protocol: the
supervisor then blames the message in flight rather than counting a crash.
Here, not in ``emulators.process``, so the launcher reads it without
importing the whole emulator."""
