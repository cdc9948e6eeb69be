"""Migration URIs: ``unix:PATH`` and ``tcp:HOST:PORT``, the forms QEMU's
``migrate`` takes that make sense for a connection mplaunch opens itself."""

from __future__ import annotations

from dataclasses import dataclass

URI_FORMS = "unix:PATH or tcp:HOST:PORT"


class BadUri(ValueError):
    """A URI mplaunch cannot connect to or listen on; says what is allowed."""


@dataclass(frozen=True, slots=True)
class MigrationUri:
    """A parsed URI: ``path`` for unix, ``host`` and ``port`` for tcp."""

    text: str
    path: str | None = None
    host: str | None = None
    port: int | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        return self.text


def parse_uri(text: str) -> MigrationUri:
    """Parse `text`, or raise :class:`BadUri` saying what is wrong."""
    if not isinstance(text, str) or not text:
        raise BadUri(f"empty migration URI: expected {URI_FORMS}")
    if "\0" in text or any(c.isspace() for c in text):
        raise BadUri(f"migration URI {text!r} holds a blank or NUL: expected {URI_FORMS}")
    scheme, sep, rest = text.partition(":")
    if not sep:
        raise BadUri(f"migration URI {text!r} has no scheme: expected {URI_FORMS}")
    if scheme == "unix":
        if not rest:
            raise BadUri(f"migration URI {text!r}: unix: needs a socket path")
        if len(rest.encode()) > 107:  # sun_path holds 108 bytes with the NUL
            raise BadUri(f"migration URI {text!r}: the socket path is longer than 107 bytes")
        return MigrationUri(text, path=rest)
    if scheme == "tcp":
        host, port = _host_port(text, rest)
        return MigrationUri(text, host=host, port=port)
    raise BadUri(f"migration URI {text!r}: scheme {scheme!r} is not supported: "
                 f"expected {URI_FORMS}")


def _host_port(text: str, rest: str) -> tuple[str, int]:
    if rest.startswith("["):  # [v6addr]:port
        close = rest.find("]")
        if close < 0 or rest[close + 1:close + 2] != ":":
            raise BadUri(f"migration URI {text!r}: expected tcp:[ADDRESS]:PORT")
        host, port_text = rest[1:close], rest[close + 2:]
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep or ":" in host:
            raise BadUri(f"migration URI {text!r}: expected tcp:HOST:PORT "
                         "(an IPv6 address goes in brackets)")
    if not host:
        raise BadUri(f"migration URI {text!r}: tcp: needs a host")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise BadUri(f"migration URI {text!r}: port {port_text!r} is not 1 to 65535")
    return host, int(port_text)
