from __future__ import annotations

import pytest

from tests.support.vm import ensure_guest_built, need_qemu


@pytest.fixture(scope="session")
def guest() -> None:
    """Skip (saying what is missing) without QEMU; build the test guest once."""
    missing = need_qemu()
    if missing:
        pytest.skip(missing)
    ensure_guest_built()
