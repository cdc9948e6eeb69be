"""The vhost-user error tree.

::

    VhostUserError                 anything this package raises on purpose
     +-- LocalProtocolError        we tried to build a message the protocol forbids
     +-- RemoteProtocolError       the peer sent bytes that break the framing or syntax
          +-- SessionError         the peer sent a well-formed message that makes no
                                   sense in the session's current state

A `RemoteProtocolError` (and so a `SessionError`) means the peer cannot be
trusted any more: the connection is torn down, and restarting the backend does
not help because the same peer would send the same bytes again.  A
`LocalProtocolError` is a bug on our side.

Every error carries the request it concerns (when one was known) so a log line
can name it.
"""

from __future__ import annotations

from .constants import Request


class VhostUserError(Exception):
    """Base class of every error raised on purpose by the vhost-user package."""

    def __init__(self, message: str, request: Request | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request

    def __str__(self) -> str:
        if self.request is None:
            return self.message
        return f"{self.request.name}: {self.message}"


class LocalProtocolError(VhostUserError):
    """We tried to encode a message that the vhost-user protocol forbids."""


class RemoteProtocolError(VhostUserError):
    """The peer broke the framing or the syntax of a message."""


class SessionError(RemoteProtocolError):
    """The peer sent a well-formed message that is wrong in the current state."""
