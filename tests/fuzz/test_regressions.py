"""What the fuzz harnesses found, each kept as a plain test (the input that
found it is in tests/fuzz/corpus/NAME/crash-*)."""

from __future__ import annotations

import json

import pytest

from emulators.virtio.errors import RecoveryError
from emulators.virtio.state import MemoryQueueState, resume
from launcher.management.protocol import Rejected, ServerConnection

COUNTER_LIMIT = 1 << 63  # no queue hands out a submission number this high


@pytest.mark.parametrize("number", ["1e999", "-1e400", "1.8e308"])
def test_qmp_refuses_a_number_no_reply_can_carry(number: str) -> None:
    """An id of 1e999 parsed as inf, which the reply that echoes it could not
    encode: the connection's task died with ValueError and no answer."""
    conn = ServerConnection({})
    conn.greeting()
    conn.receive_data(f'{{"execute": "qmp_capabilities", "id": {number}}}'.encode())
    event = conn.next_event()
    assert isinstance(event, Rejected) and "JSON parse error" in event.desc
    reply = json.loads(conn.send_rejection(event))
    assert reply["error"]["class"] == "GenericError"


@pytest.mark.parametrize("where", ["last", "in_flight"])
def test_resume_refuses_a_counter_with_no_room(where: str) -> None:
    """A stored submission number at the u64 limit made the successor's next
    pop fail with ValueError (its word cannot hold one more) instead of the
    queue refusing the saved progress."""
    state = MemoryQueueState(4)
    state.last_avail_idx = 1
    if where == "last":
        state.last_counter = 2**64 - 1
    else:
        state.last_counter = 1
        state.set_counter(2, COUNTER_LIMIT)
    with pytest.raises(RecoveryError, match="submission number"):
        resume(state, 0)
    state.set_counter(2, 0)
    state.set_counter(1, COUNTER_LIMIT - 1)
    state.last_counter = COUNTER_LIMIT - 1
    assert resume(state, 0).rerun == (1,)


@pytest.mark.parametrize("levels", [600, 5000])
def test_qmp_refuses_nesting_deeper_than_a_recursive_walk(levels: int) -> None:
    """600 nested arrays parse (json's limit is Python's recursion limit) but
    the depth check walked them recursively: RecursionError escaped and the
    connection's task died with no answer."""
    conn = ServerConnection({})
    conn.greeting()
    arg = "[" * levels + "]" * levels
    conn.receive_data(f'{{"execute": "x", "arguments": {{"a": {arg}}}}}'.encode())
    event = conn.next_event()
    assert isinstance(event, Rejected) and "nesting too deep" in event.desc


@pytest.mark.parametrize("extra", [0, 1])
def test_qmp_depth_limit_is_where_it_was(extra: int) -> None:
    conn = ServerConnection({}, max_depth=4)
    conn.greeting()
    # The command object is level 1, its arguments level 2.
    arg = "[" * (2 + extra) + "]" * (2 + extra)
    conn.receive_data(f'{{"execute": "qmp_capabilities", "arguments": {{"a": {arg}}}}}'.encode())
    event = conn.next_event()
    assert isinstance(event, Rejected)
    assert ("nesting too deep" in event.desc) == bool(extra), event.desc
