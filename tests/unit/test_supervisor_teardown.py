"""A child of the VM that does not end when cancelled is named, with where it
waits, instead of a stop that hangs without a word."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from launcher import supervisor


def test_a_child_that_outlives_its_cancel_is_named(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(supervisor, "CANCEL_REPORT_S", 0.05)

    async def slow_cleanup() -> None:
        await asyncio.sleep(0.3)  # a cleanup that takes its time

    async def stubborn() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await slow_cleanup()
            raise

    async def quick() -> None:
        await asyncio.sleep(10)

    async def test() -> None:
        slow = asyncio.create_task(stubborn(), name="stubborn child")
        fast = asyncio.create_task(quick(), name="quick child")
        await asyncio.sleep(0)
        for task in (slow, fast):
            task.cancel()
        await supervisor._report_stragglers([slow, fast])
        for task in (slow, fast):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    with caplog.at_level(logging.ERROR):
        asyncio.run(test())
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1, lines
    where = lines[0].split("waits at")[1]
    assert "'stubborn child'" in lines[0] and "stubborn" in where
    # down to the innermost await, not just the task's own frame
    assert where.index("stubborn") < where.index("slow_cleanup") < where.index("sleep"), where
