"""A whole state store as bytes: read at a migration's source, loaded at its
destination (launcher side only: no emulator loads this).

The bytes travel as the file holds them (header, then slots), so the
layout's own checks (magic, version, geometry) are the check of what
arrived: the destination loads only an image whose header is exactly its
own store's. The ring slots are cleared as they are loaded: where each ring
stands travels in QEMU's migration stream (the source's rings were stopped,
GET_VRING_BASE answered, before the image was read), and a slot left valid
by a stop still under way at the source must not be resumed at the
destination. What is kept is the LUNs' state (unit attentions, sense, mode
pages, reservations) and the controllers' waiting events.
"""

from __future__ import annotations

import os

from launcher.statestore.layout import HEADER_SIZE, Layout, StateStore, StateStoreError


def read_image(fd: int) -> bytes:
    """The store behind `fd`, whole; StateStoreError if it is not one."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0)
    if len(data) != size:
        raise StateStoreError(f"state store: read {len(data)} of {size} bytes")
    layout = Layout.read_header(data)
    if layout.size != size:
        raise StateStoreError(f"state store is {size} bytes, its header says {layout.size}")
    return data


def image_problem(fd: int, data: bytes) -> str | None:
    """Why `data` cannot be loaded into the store behind `fd`, or None."""
    try:
        theirs = Layout.read_header(data)
    except StateStoreError as e:
        return f"the source's state store: {e}"
    try:
        ours = Layout.read_header(os.pread(fd, HEADER_SIZE, 0))
    except StateStoreError as e:
        return f"this state store: {e}"
    if theirs != ours:
        return (f"the source's state store has {theirs.controllers} controllers, "
                f"{theirs.queues} queues and {theirs.lun_slots} LUN slots each; this one "
                f"{ours.controllers}, {ours.queues} and {ours.lun_slots}")
    if len(data) != ours.size:
        return f"the source's state store is {len(data)} bytes, this one {ours.size}"
    return None


def load_image(fd: int, data: bytes) -> None:
    """Write `data` (checked by :func:`image_problem`) into the store behind
    `fd`, with every ring slot cleared. Only while no process maps the
    store: the emulator that will read it is started afterwards."""
    problem = image_problem(fd, data)
    if problem is not None:
        raise StateStoreError(problem)
    written = os.pwrite(fd, data, 0)
    if written != len(data):
        raise StateStoreError(f"state store: wrote {written} of {len(data)} bytes")
    store = StateStore(fd)
    try:
        shape = store.layout
        for controller in range(shape.controllers):
            for queue in range(shape.queues):
                store.set_queue_slot(controller, queue, None)
    finally:
        store.close()
