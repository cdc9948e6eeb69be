"""The holder protocol's decoder: every rule refuses its own input."""

from __future__ import annotations

import json
from typing import Any

import pytest

from launcher.holder import protocol as p


def raw(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


SPAWN = {"type": "spawn", "tag": "qemu", "argv": ["/bin/true"], "env": [],
         "fds": [], "passed": 0}


def spawn(**change: Any) -> bytes:
    return raw({**SPAWN, **change})


@pytest.mark.parametrize("msg", [
    p.Hello(p.VERSION), p.Put("disk0", "image", 2), p.Drop("disk0"),
    p.Spawn("emu", ("/usr/bin/python3", "-c", "pass"), (("A", "b"),),
            (p.Placement(3, 0, "disk0"), p.Placement(4, 0)), 1),
    p.Spawned(7), p.Signal(7, 9), p.Shutdown(), p.Ok(), p.Failed("no"), p.Refused("busy"),
    p.Exit(7, "emu", 9, 1.5), p.Handover("disk0", 2),
    p.Welcome(1, 3, 2.0, (p.Entry("a", "b", 1),), (p.Child(4, "q", 1.0),),
              (p.Exit(5, "e", 0, 2.0),)),
])
def test_round_trip(msg: p.Message) -> None:
    assert p.decode(p.encode(msg), p.fd_count(msg)) == msg


@pytest.mark.parametrize("data,nfds,rule", [
    (b"x" * (p.MAX_MESSAGE + 1), 0, "bytes >"),
    (raw({"type": "ok"}), p.HOLDER_MAX_FDS + 1, "fds with one message"),
    (b"{not json", 0, "not JSON"),
    (b"[1]", 0, "not a JSON object"),
    (raw({"type": "nope"}), 0, "unknown message type"),
    (raw({"type": "ok", "extra": 1}), 0, "has fields"),
    (raw({"type": "hello", "version": "1"}), 0, "version"),
    (raw({"type": "hello", "version": True}), 0, "version"),
    (raw({"type": "put", "name": "../x", "kind": "k", "nfds": 1}), 1, "name"),
    (raw({"type": "put", "name": "x" * 129, "kind": "k", "nfds": 1}), 1, "name"),
    (raw({"type": "put", "name": "x", "kind": "", "nfds": 1}), 1, "kind"),
    (raw({"type": "put", "name": "x", "kind": "k", "nfds": 0}), 0, "fd count"),
    (raw({"type": "put", "name": "x", "kind": "k", "nfds": 2}), 1, "came with 1 fds"),
    (raw({"type": "ok"}), 1, "came with 1 fds"),
    (raw({"type": "drop", "name": 3}), 0, "name"),
    (spawn(tag="a b"), 0, "tag"),
    (spawn(argv=[]), 0, "argv has not"),
    (spawn(argv=["/bin/x"] * (p.MAX_ARGV + 1)), 0, "argv is not a list"),
    (spawn(argv=["true"]), 0, "absolute path"),
    (spawn(argv=["/bin/x", "a\0b"]), 0, "without NUL"),
    (spawn(argv=["/bin/x", "a" * (p.MAX_ARG + 1)]), 0, "argument"),
    (spawn(env=[["1X", "v"]]), 0, "env name"),
    (spawn(env=[["X", "v", "w"]]), 0, "env entry"),
    (spawn(env=[["X"]]), 0, "pair"),
    (spawn(env=[["X", 3]]), 0, "env value"),
    (spawn(fds=[{"target": 3, "index": 0, "name": "a"},
                {"target": 3, "index": 1, "name": "a"}]), 0, "two fds placed"),
    (spawn(fds=[{"target": p.MAX_CHILD_FD + 1, "index": 0, "name": "a"}]), 0, "child fd"),
    (spawn(fds=[{"target": 3, "index": -1, "name": "a"}]), 0, "fd index"),
    (spawn(fds=[{"target": 3, "index": 0}]), 0, "has fields"),
    (spawn(fds=[{"target": 3, "index": 1, "name": None}], passed=1), 1, "passed fd 1"),
    (spawn(passed=1), 0, "came with 0 fds"),
    (raw({"type": "signal", "pid": 0, "sig": 9}), 0, "pid"),
    (raw({"type": "signal", "pid": 5, "sig": 65}), 0, "signal"),
    (raw({"type": "spawned", "pid": 5}), 0, "came with 0 fds"),
    (raw({"type": "exit", "pid": 5, "tag": "t", "status": 0x10000, "time": 1.0}), 0,
     "wait status"),
    (raw({"type": "exit", "pid": 5, "tag": "t", "status": 0, "time": -1}), 0, "exit time"),
    (raw({"type": "failed", "message": "x" * (p.MAX_TEXT + 1)}), 0, "message"),
    (raw({"type": "welcome", "version": 1, "pid": 1, "started": 1.0, "children": [],
          "exits": [], "inventory": [{"name": "a", "kind": "k", "nfds": 1}] * 2}), 0, "twice"),
    (raw({"type": "welcome", "version": 1, "pid": 1, "started": 1.0, "children": [],
          "exits": [], "inventory": [{"name": "a", "kind": "k"}]}), 0, "has fields"),
    (raw({"type": "welcome", "version": 1, "pid": 1, "started": 1.0, "inventory": [],
          "exits": [], "children": [{}] * (p.MAX_ENTRIES + 1)}), 0, "children is not a list"),
])
def test_each_rule_refuses(data: bytes, nfds: int, rule: str) -> None:
    with pytest.raises(p.ProtocolError, match=rule):
        p.decode(data, nfds)


def test_an_oversized_message_is_not_encoded() -> None:
    with pytest.raises(p.ProtocolError, match="bytes >"):
        p.encode(p.Spawn("t", ("/x",) + ("a" * p.MAX_ARG,) * (p.MAX_ARGV - 1)))
