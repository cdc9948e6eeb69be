"""The liveness lock's semantics, with threads of this process standing in
for the serving emulator and its standby: a robust mutex is released by the
kernel when the thread that holds it ends, whichever process it is in."""

from __future__ import annotations

import _thread
import os
import threading
from collections.abc import Iterator

import pytest

from launcher.statestore import liveness

TIMEOUT_S = 5.0


@pytest.fixture
def page() -> Iterator[int]:
    fd = liveness.create()
    yield fd
    os.close(fd)


@pytest.fixture
def wake() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


def wait_done(watch: liveness.DeathWatch, wake_r: int) -> None:
    while not watch.done:
        os.read(wake_r, 1)


KEPT: list[liveness.LivenessLock] = []
"""Every mapping a thread took the lock through stays mapped: glibc links a
held robust mutex into its thread's list, through the page."""


def kept(fd: int) -> liveness.LivenessLock:
    lock = liveness.LivenessLock(fd)
    KEPT.append(lock)
    return lock


def holder_thread(fd: int) -> tuple[threading.Event, threading.Event]:
    """A thread that takes the lock, says so, and ends when told: its end
    is the owner's death."""
    taken, end = threading.Event(), threading.Event()

    def run() -> None:
        assert kept(fd).take() is liveness.Taken.HELD
        taken.set()
        end.wait(TIMEOUT_S)

    _thread.start_new_thread(run, ())
    assert taken.wait(TIMEOUT_S)
    return taken, end


def test_a_new_page_is_sound_and_free(page: int, wake: tuple[int, int]) -> None:
    lock = kept(page)
    assert lock.sound()
    watch = liveness.DeathWatch(lock, wake[1])
    wait_done(watch, wake[0])
    assert watch.outcome is liveness.Outcome.FREE  # nobody held it: no news
    assert lock.take() is liveness.Taken.HELD and lock.held


def test_a_live_holder_keeps_it(page: int) -> None:
    _, end = holder_thread(page)
    assert kept(page).take() is liveness.Taken.BUSY
    end.set()


def test_the_holders_end_wakes_the_watch_with_its_death(page: int,
                                                        wake: tuple[int, int]) -> None:
    _, end = holder_thread(page)
    watch = liveness.DeathWatch(kept(page), wake[1])
    os.set_blocking(wake[0], False)
    with pytest.raises(BlockingIOError):
        os.read(wake[0], 1)  # the holder lives: no word yet
    os.set_blocking(wake[0], True)
    end.set()  # the holder thread ends holding the lock
    wait_done(watch, wake[0])
    assert watch.outcome is liveness.Outcome.DIED and watch.seen_ns > 0
    # Consistent and free again: the next process takes it for the next standby.
    assert kept(page).take() is liveness.Taken.HELD


def test_a_dead_owner_leaves_it_to_the_next_taker(page: int) -> None:
    _, end = holder_thread(page)
    end.set()
    lock = kept(page)
    for _ in range(1000):  # until the thread has ended
        taken = lock.take()
        if taken is not liveness.Taken.BUSY:
            break
        threading.Event().wait(0.005)
    assert taken is liveness.Taken.HELD


def test_a_scribbled_page_is_not_used(page: int, wake: tuple[int, int]) -> None:
    os.pwrite(page, b"\xff" * 4, liveness.MUTEX_KIND_OFFSET)
    lock = kept(page)
    assert not lock.sound()
    assert lock.take() is liveness.Taken.BROKEN
    watch = liveness.DeathWatch(lock, wake[1])
    wait_done(watch, wake[0])
    assert watch.outcome is liveness.Outcome.BROKEN


def test_a_short_page_is_refused() -> None:
    fd = os.memfd_create("short")
    try:
        with pytest.raises(ValueError):
            liveness.LivenessLock(fd)
    finally:
        os.close(fd)
