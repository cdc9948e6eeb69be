from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.vm import Mplaunch, ensure_guest_built, need_qemu, stop_launchers


@pytest.fixture(scope="session")
def guest() -> None:
    """Skip (saying what is missing) without QEMU; build the test guest once."""
    missing = need_qemu()
    if missing:
        pytest.skip(missing)
    ensure_guest_built()


@pytest.fixture
def launchers() -> Iterator[list[Mplaunch]]:
    """Every mplaunch a test starts (append them); whatever of them, or of
    what they were seen to start, still runs at the end is killed."""
    started: list[Mplaunch] = []
    yield started
    stop_launchers(started)


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[None]:
    """libvirtd and virtlogd answering (started if they were not, and then
    stopped at the end of the session); skip, naming what is missing,
    without them."""
    from tests.support.libvirtd import need_libvirt, running_daemons

    missing = need_libvirt()
    if missing:
        pytest.skip(missing)
    with running_daemons():
        yield
