"""``mpctl``: drive running mplaunch VMs from a shell, in the manner of virsh.

Each subcommand connects to a VM's management socket with QEMU's own QMP
client library, runs one command and prints the answer: a readable table by
default, JSON with ``--json`` (for scripts). A VM is named by its name (its
socket is ``RUN_DIR/NAME/mplaunch.sock``) or by a socket path.

Exit status: 0 on success, 1 when the command failed or the VM could not be
reached (the message names which), 2 for a usage mistake.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, Runstate

from emulators.limits import BLOCK_SIZES
from launcher.sizes import format_size
from launcher.spec import DEFAULT_RUN_ROOT

SOCKET_NAME = "mplaunch.sock"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class MpctlError(Exception):
    """A failure to report on one line and exit 1."""


def socket_path(vm: str, run_dir: Path) -> Path:
    """``vm`` as a socket path: a path if it has a slash, else a name under ``run_dir``."""
    if "/" in vm:
        return Path(vm)
    return run_dir / vm / SOCKET_NAME


def find_vms(run_dir: Path) -> list[tuple[str, Path]]:
    """(name, socket) of every VM folder under ``run_dir`` holding a socket."""
    try:
        found = sorted(run_dir.glob(f"*/{SOCKET_NAME}"))
    except OSError:
        return []
    return [(sock.parent.name, sock) for sock in found]


# --- rendering ------------------------------------------------------------------

def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, list | tuple):
        return ",".join(_cell(v) for v in value) or "-"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Rows as aligned text; ``columns`` are (header, key). Missing members show '-'."""
    cells = [[header for header, _ in columns]]
    cells += [[_cell(row.get(key)) for _, key in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in cells]
    return "\n".join(lines) + "\n"


EMULATOR_COLUMNS = (
    ("ID", "id"), ("KIND", "kind"), ("PID", "pid"), ("UID", "uid"), ("STATE", "state"),
    ("UPTIME", "uptime"), ("RESTARTS", "restarts"), ("LAST EXIT", "last_exit"),
    ("CONTROLLERS", "controllers"), ("DISKS", "disks"), ("RTT MS", "heartbeat_rtt_ms"),
    ("INFLIGHT", "inflight"), ("VERSION", "version"),
)
DISK_COLUMNS = (
    ("ID", "id"), ("CONTROLLER", "controller"), ("LUN", "lun"), ("SIZE", "size"),
    ("RO", "readonly"), ("BLOCK", "block_size"), ("EMULATOR", "emulator"), ("IMAGE", "image"),
)
LIST_COLUMNS = (("NAME", "name"), ("STATUS", "status"), ("SOCKET", "socket"))


def _duration(seconds: object) -> object:
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return seconds
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


def render_emulators(emulators: list[dict[str, Any]]) -> str:
    rows = [{**e, "uptime": _duration(e.get("uptime_s"))} for e in emulators]
    return format_table(rows, EMULATOR_COLUMNS)


def render_disks(disks: list[dict[str, Any]]) -> str:
    rows = [{**d, "size": format_size(d["size"]) if isinstance(d.get("size"), int) else None}
            for d in disks]
    return format_table(rows, DISK_COLUMNS)


def render_status(status: dict[str, Any]) -> str:
    return "".join(f"{key}: {_cell(value)}\n" for key, value in status.items())


def render_event(event: dict[str, Any]) -> str:
    """One line: UTC time, event name, data as key=value."""
    stamp = event.get("timestamp", {})
    when = ""
    if isinstance(stamp, dict) and isinstance(stamp.get("seconds"), int):
        moment = datetime.datetime.fromtimestamp(
            stamp["seconds"] + stamp.get("microseconds", 0) / 1e6, datetime.UTC)
        when = moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ") + " "
    data = event.get("data") or {}
    fields = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) and ' ' in v else _cell(v)}"
                      for k, v in data.items())
    return f"{when}{event.get('event')}{' ' + fields if fields else ''}\n"


# --- talking to a VM --------------------------------------------------------------

async def _session(sock: Path, timeout: float,
                   body: Callable[[QMPClient], Awaitable[Any]]) -> Any:
    client = QMPClient("mpctl")
    try:
        await asyncio.wait_for(client.connect(str(sock)), timeout)
    except ConnectError as exc:
        cause = exc.exc if exc.exc is not None else exc
        if isinstance(cause, FileNotFoundError):
            raise MpctlError(f"{sock}: no such VM socket (is the VM running?)") from None
        if isinstance(cause, PermissionError):
            raise MpctlError(f"{sock}: permission denied (root or the socket's group only)") \
                from None
        raise MpctlError(f"{sock}: cannot connect: {cause}") from None
    except TimeoutError:
        raise MpctlError(f"{sock}: no answer within {timeout:g} s") from None
    try:
        return await body(client)
    except ExecuteError as exc:
        raise MpctlError(f"{exc.error_class}: {exc}") from None
    except ExecInterruptedError:
        raise MpctlError(f"{sock}: the VM closed the connection") from None
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


def _execute(name: str, arguments: dict[str, Any] | None = None
             ) -> Callable[[QMPClient], Awaitable[Any]]:
    async def run(client: QMPClient) -> Any:
        return await client.execute(name, arguments)
    return run


async def _follow(client: QMPClient, out: TextIO, as_json: bool) -> None:
    async def printer() -> None:
        async for event in client.events:
            raw = dict(event)
            out.write(json.dumps(raw) + "\n" if as_json else render_event(raw))
            out.flush()

    task = asyncio.create_task(printer())
    try:
        while client.runstate is Runstate.RUNNING:
            await client.runstate_changed()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _list(run_dir: Path, timeout: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, sock in find_vms(run_dir):
        row: dict[str, Any] = {"name": name, "socket": str(sock)}
        try:
            status = await _session(sock, timeout, _execute("query-status"))
            row["status"] = status.get("status") if isinstance(status, dict) else None
        except MpctlError as exc:
            row["status"] = "unreachable"
            row["error"] = str(exc)
        rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpctl", description="Manage running mplaunch VMs through their management socket.")
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_ROOT,
                        help=f"where VM run folders live (default {DEFAULT_RUN_ROOT})")
    parser.add_argument("--json", action="store_true", help="print JSON, for scripts")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for the socket to answer (default 10)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", help="VMs under the run folder and their status")
    vm_help = "VM name, or path of its mplaunch.sock"
    for name, text in (("status", "the VM's run state"),
                       ("emulators", "emulator processes and what they serve"),
                       ("disks", "the VM's disks"),
                       ("quit", "stop the VM"),
                       ("upgrade", "hand the VM over to a new mplaunch process started "
                                   "from the code installed now (the guest notices nothing)"),
                       ("upgrade-emulators", "hand each emulator over to a process of the "
                                             "code installed now, one at a time"),
                       ("events", "print events as they happen, until the VM stops")):
        sub.add_parser(name, help=text).add_argument("vm", help=vm_help)
    restart = sub.add_parser("restart", help="hand an emulator over to a new process")
    restart.add_argument("vm", help=vm_help)
    restart.add_argument("emulator", help="the emulator's id")
    add = sub.add_parser("disk-add", help="attach an image as a new LUN")
    add.add_argument("vm", help=vm_help)
    add.add_argument("disk", help="the new disk's id")
    add.add_argument("--controller", required=True, help="the controller's id")
    add.add_argument("--lun", type=int, required=True, help="a free LUN on that controller")
    add.add_argument("--image", type=Path, required=True, help="raw image or block device")
    add.add_argument("--readonly", action="store_true", help="attach read-only")
    add.add_argument("--block-size", type=int, default=BLOCK_SIZES[0], choices=BLOCK_SIZES)
    remove = sub.add_parser("disk-remove", help="detach a disk")
    remove.add_argument("vm", help=vm_help)
    remove.add_argument("disk", help="the disk's id")
    migrate = sub.add_parser("migrate", help="live-migrate the VM to an mplaunch --incoming "
                             "URI; exits 0 once the guest runs there")
    migrate.add_argument("vm", help=vm_help)
    migrate.add_argument("uri", help="the destination's URI: unix:PATH or tcp:HOST:PORT")
    resize = sub.add_parser("disk-resize", help="grow a disk's image")
    resize.add_argument("vm", help=vm_help)
    resize.add_argument("disk", help="the disk's id")
    resize.add_argument("size", help='new size: bytes, or e.g. "2G"')
    return parser


def _request(args: argparse.Namespace) -> tuple[str, dict[str, Any] | None]:
    """The QMP command and arguments a subcommand stands for."""
    simple = {"status": "query-status", "emulators": "query-emulators",
              "disks": "query-disks", "quit": "quit",
              "upgrade-emulators": "upgrade-emulators"}
    if args.command in simple:
        return simple[args.command], None
    if args.command == "restart":
        return "emulator-restart", {"id": args.emulator}
    if args.command == "disk-add":
        return "disk-add", {"id": args.disk, "controller": args.controller, "lun": args.lun,
                            "image": str(args.image.absolute()), "readonly": args.readonly,
                            "block_size": args.block_size}
    if args.command == "disk-remove":
        return "disk-remove", {"id": args.disk}
    if args.command == "disk-resize":
        size: str | int = int(args.size) if args.size.isdigit() else args.size
        return "disk-resize", {"id": args.disk, "size": size}
    raise AssertionError(args.command)


def _render(command: str, result: Any, args: argparse.Namespace) -> str:
    if args.json:
        return json.dumps(result, indent=2) + "\n"
    if command == "list":
        return format_table(result, LIST_COLUMNS)
    if command == "status":
        return render_status(result)
    if command in ("emulators", "upgrade-emulators"):
        return render_emulators(result)
    if command == "disks":
        return render_disks(result)
    done = {"restart": f"emulator {getattr(args, 'emulator', '')} restarted",
            "disk-add": f"disk {getattr(args, 'disk', '')} added",
            "disk-remove": f"disk {getattr(args, 'disk', '')} removed",
            "disk-resize": f"disk {getattr(args, 'disk', '')} resized to "
                           f"{getattr(args, 'size', '')}",
            "quit": "VM stopping"}
    return done[command] + "\n"


UPGRADE_TIMEOUT_S = 60.0
"""How long `mpctl upgrade` waits for the new launcher to answer."""


async def _upgrade(sock: Path, timeout: float) -> dict[str, Any]:
    """Ask for the hand-over, then wait for the successor on the same socket
    (connections wait in its backlog meanwhile) and return who answers."""
    async def ask(client: QMPClient) -> Any:
        answer = await client.execute("upgrade")
        # The old launcher closes every connection once it has let go; only
        # then is whoever answers a new connection its successor.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(UPGRADE_TIMEOUT_S):
                while client.runstate is Runstate.RUNNING:
                    await client.runstate_changed()
        return answer

    old = await _session(sock, timeout, ask)
    deadline = time.monotonic() + UPGRADE_TIMEOUT_S
    while True:
        try:
            new = await _session(sock, timeout, _execute("query-version"))
            status = await _session(sock, timeout, _execute("query-status"))
            break
        except MpctlError:
            if time.monotonic() > deadline:
                raise MpctlError(f"{sock}: no new launcher answered within "
                                 f"{UPGRADE_TIMEOUT_S:.0f} s (the VM runs on; run mplaunch "
                                 "with its spec to attach to it)") from None
            await asyncio.sleep(0.2)
    return {"old": old, "package": new.get("package"), "status": status.get("status")}


MIGRATE_POLL_S = 0.5


def migration_line(vm: str, info: dict[str, Any]) -> str:
    """One progress line of `mpctl migrate`: status, and MiB sent and left."""
    status = str(info.get("status"))
    line = f"migrate {vm}: {status}"
    ram = info.get("ram")
    ram = ram if isinstance(ram, dict) else {}
    if status == "active":
        if info.get("phase") == "state":
            line += " (handing the emulators' state over)"
        elif isinstance(ram.get("transferred"), int):
            line += (f" {ram['transferred'] / (1 << 20):.1f} MiB sent, "
                     f"{ram.get('remaining', 0) / (1 << 20):.1f} MiB remaining")
    if status == "failed":
        line += f": {info.get('error-desc', 'no reason given')}"
    return line


def _event_data(event: object) -> dict[str, Any]:
    data = event.get("data") if isinstance(event, Mapping) else None
    return dict(data) if isinstance(data, Mapping) else {}


async def _migrate(sock: Path, vm: str, uri: str, timeout: float, out: TextIO,
                   as_json: bool) -> int:
    """Start the migration, then show its progress on one line until it ends."""
    tty = out.isatty() and not as_json

    async def follow(client: QMPClient) -> dict[str, Any]:
        last = ""
        info: dict[str, Any] = {"status": "setup"}
        with client.listener("MIGRATION") as events:
            await client.execute("migrate", {"uri": uri})
            while True:
                try:
                    answer = await client.execute("query-migrate")
                    info = answer if isinstance(answer, dict) else info
                except ExecInterruptedError:
                    # The source stops once it is done; its last event says how it ended.
                    info = {"status": "failed", "error-desc": "the VM went away"}
                    for event in events.clear():
                        info = _event_data(event) or info
                line = migration_line(vm, info)
                if line != last and not as_json:
                    out.write(("\r\033[K" if tty else "") + line + ("" if tty else "\n"))
                    out.flush()
                last = line
                if info.get("status") in ("completed", "failed", "cancelled"):
                    if tty:
                        out.write("\n")
                    return info
                with contextlib.suppress(TimeoutError):
                    data = _event_data(await asyncio.wait_for(events.get(), MIGRATE_POLL_S))
                    if data.get("status") in ("completed", "failed", "cancelled"):
                        info = data
                        line = migration_line(vm, info)
                        if not as_json:
                            out.write(("\r\033[K" if tty else "") + line + "\n")
                        return info

    info = await _session(sock, timeout, follow)
    if as_json:
        out.write(json.dumps(info, indent=2) + "\n")
    if info.get("status") != "completed":
        raise MpctlError(migration_line(vm, info))
    return EXIT_OK


async def run(args: argparse.Namespace, out: TextIO) -> int:
    if args.command == "migrate":
        return await _migrate(socket_path(args.vm, args.run_dir), args.vm, args.uri,
                              args.timeout, out, args.json)
    if args.command == "upgrade":
        done = await _upgrade(socket_path(args.vm, args.run_dir), args.timeout)
        out.write(json.dumps(done, indent=2) + "\n" if args.json else
                  f"VM {args.vm}: handed over from {done['old'].get('package')} "
                  f"(pid {done['old'].get('pid')}) to {done['package']}; "
                  f"guest {done['status']}\n")
        return EXIT_OK
    if args.command == "list":
        result: Any = await _list(args.run_dir, args.timeout)
    else:
        sock = socket_path(args.vm, args.run_dir)
        if args.command == "events":
            async def follow(client: QMPClient) -> None:
                await _follow(client, out, args.json)
            await _session(sock, args.timeout, follow)
            return EXIT_OK
        command, arguments = _request(args)
        result = await _session(sock, args.timeout, _execute(command, arguments))
    out.write(_render(args.command, result, args))
    return EXIT_OK


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    # qemu.qmp logs connection failures itself; mpctl reports them in one line.
    logging.getLogger("qemu.qmp").addHandler(logging.NullHandler())
    logging.getLogger("qemu.qmp").propagate = False
    try:
        return asyncio.run(run(args, sys.stdout if out is None else out))
    except MpctlError as exc:
        print(f"mpctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
