"""The mpqemu relay: keeps the proxy's link whole while remotes come and go.

(Public API first; the body follows.)
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class RelayStats:
    """Counters for status and tests."""

    forwarded: int = 0
    """Messages passed from the proxy to a remote, or replies back."""
    replayed: int = 0
    """Messages of the record sent to a new remote."""
    resent: int = 0
    """Pending requests sent again to a new remote."""
    answered_locally: int = 0
    """Pending BAR writes answered to the proxy as done, without a remote."""
    faults: int = 0
    """Remote faults reported (on_remote_fault calls)."""


class MpqemuRelay:
    """Relays one controller's mpqemu link between the VMM's proxy and the
    current remote process."""

    def __init__(
        self,
        name: str,
        proxy: socket.socket,
        on_proxy_closed: Callable[[str], None],
        on_remote_fault: Callable[[str], None],
    ) -> None:
        """`proxy`: mplaunch's end of the proxy's socketpair (the relay owns it
        from now on). `on_proxy_closed(reason)`: the proxy closed the link or
        broke the protocol; the relay is closed. `on_remote_fault(reason)`: the
        attached remote sent something malformed or unexpected, or its link
        ended; the relay has detached it (kill it and attach a new one).
        Must be built inside a running asyncio loop."""
        raise NotImplementedError

    @property
    def attached(self) -> bool:
        """Whether a remote is attached."""
        raise NotImplementedError

    @property
    def waiting_for_reply(self) -> bool:
        """Whether the proxy waits for a reply (its vCPU is blocked on it)."""
        raise NotImplementedError

    def attach(self, remote: socket.socket) -> None:
        """Relay to `remote` (the relay owns the socket from now on): replay the
        record, re-send or answer the pending request, then forward both ways."""
        raise NotImplementedError

    def detach(self) -> None:
        """The remote is gone or being replaced: stop relaying to it and close
        its socket. The proxy's messages are recorded and held until the next
        attach; the proxy keeps waiting for its reply. No-op when detached."""
        raise NotImplementedError

    def close(self) -> None:
        """Close both links and every fd the record holds. Idempotent."""
        raise NotImplementedError
