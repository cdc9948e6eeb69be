"""Scatter-gather helpers over lists of memoryviews into guest memory.

A descriptor chain hands the target its buffers as memoryviews straight into
guest RAM. Headers and data need not start or end on a buffer boundary, so
everything here works on (list of views, byte offset, byte length) and
returns sub-views: data moves between the disk and the guest with
preadv/pwritev on these, never through an intermediate copy. Only small
things (headers, parameter lists, generated INQUIRY data) are copied.
"""

from __future__ import annotations

from collections.abc import Sequence


def iov_len(views: Sequence[memoryview]) -> int:
    """Total byte length of ``views``."""
    total = 0
    for v in views:
        total += v.nbytes
    return total


def iov_slice(views: Sequence[memoryview], offset: int, length: int) -> list[memoryview]:
    """Sub-views covering bytes ``[offset, offset + length)`` of ``views``.

    Stops early (returns fewer bytes) when the views end first; callers
    compare against :func:`iov_len` of the result when it matters.
    """
    out: list[memoryview] = []
    if length <= 0:
        return out
    for v in views:
        n = v.nbytes
        if offset >= n:
            offset -= n
            continue
        take = n - offset
        if take >= length:
            out.append(v[offset:offset + length] if (offset or take != length) else v)
            return out
        out.append(v[offset:] if offset else v)
        length -= take
        offset = 0
    return out


def iov_skip(views: Sequence[memoryview], offset: int) -> list[memoryview]:
    """The views that follow the first ``offset`` bytes."""
    out: list[memoryview] = []
    for v in views:
        n = v.nbytes
        if offset >= n:
            offset -= n
            continue
        out.append(v[offset:] if offset else v)
        offset = 0
    return out


def gather(views: Sequence[memoryview], offset: int, length: int) -> bytes:
    """Copy at most ``length`` bytes from ``offset`` into one bytes object."""
    return b"".join(bytes(v) for v in iov_slice(views, offset, length))


def scatter(
    data: bytes | bytearray | memoryview, views: Sequence[memoryview], offset: int = 0
) -> int:
    """Copy ``data`` into ``views`` from ``offset``; returns the bytes copied.

    Copies as much as fits: the guest's buffer may be shorter than the data
    (allocation-length truncation happens before, this is the last guard).
    """
    src = memoryview(data)
    done = 0
    total = src.nbytes
    for v in iov_slice(views, offset, total):
        n = v.nbytes
        v[:] = src[done:done + n]
        done += n
    return done
