"""The VM spec: the TOML file a user hands to ``mplaunch``, parsed and validated.

Theory of operation. ``load_spec`` reads the file and hands the parsed TOML to
``parse_spec``, which walks it table by table. Each field is checked for its
TOML type and its value, and every mistake becomes one line naming the file,
the table (``[vm]``, or ``[[disk]] #1 (id "d0")`` with the 0-based position in
its array), the field, the bad value rendered as TOML, and what is allowed.
Nothing stops at the first mistake: a user fixing a spec should see them all
at once. Cross-references (controller -> emulator, disk -> controller, LUNs
per controller, unused emulators) are checked after every table has been
read, against the entries whose ids were themselves valid. Only a spec with
no problem at all becomes a ``Spec``; otherwise ``SpecError`` carries the
lines.

Relative paths are relative to the spec's own folder, so a spec and its
images can be moved together. Files that must exist (kernel, initrd, disk
images) are checked here, so ``mplaunch --check`` catches them before any
process starts; the launcher still opens them later and reports a race as
its own error.
"""

from __future__ import annotations

import datetime
import grp
import math
import os
import pwd
import re
import stat
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from emulators.limits import (
    BLOCK_SIZE_RULE,
    BLOCK_SIZES,
    ID_PATTERN,
    ID_RULE,
    MAX_LUN,
    image_size_problem,
)
from launcher.heartbeat.protocol import MAX_CONTROLLERS, MAX_REQUEST_QUEUES
from launcher.imagepolicy import default_dirs
from launcher.runfolder import foreign_problem
from launcher.sizes import SIZE_SYNTAX, G, M, format_size, parse_size
from launcher.uidpool import accounts_in, describe_accounts, host_account


class Accel(StrEnum):
    """How QEMU runs the guest's CPUs. ``auto`` means KVM if usable, else TCG."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class SandboxMode(StrEnum):
    """``log`` applies the sandbox but has seccomp log instead of kill, to debug a profile."""

    ON = "on"
    LOG = "log"
    OFF = "off"


class EmulatorKind(StrEnum):
    """``scsi``: the Python vhost-user-scsi emulator. ``lsi``: QEMU's own
    x-remote process emulating one LSI53C895A controller, reached by the VM's
    x-pci-proxy-dev, supervised and sandboxed by mplaunch (docs/lsi.md)."""

    SCSI = "scsi"
    LSI = "lsi"


class RestartMode(StrEnum):
    ON_FAILURE = "on-failure"
    ALWAYS = "always"
    NEVER = "never"


class GiveUpAction(StrEnum):
    """What the VM undergoes once an emulator's restart burst limit is hit."""

    PAUSE = "pause"
    POWEROFF = "poweroff"


CONSOLE_STDIO = "stdio"
CONSOLE_NONE = "none"

# Bounds chosen here and documented for users of the spec.
MIN_MEMORY = 64 * M
MAX_MEMORY = 1024 * G
MEMORY_ALIGN = M
UID_MIN = 1000  # below this are the host's system accounts
UID_MAX = 2**31 - 2  # (uid_t)-1 and the sign bit stay out of reach
UID_NOBODY = 65534  # shared by unrelated daemons: an emulator must never run as it
DEFAULT_RUN_ROOT = Path("/run/mplaunch")
#: An LSI53C895A addresses disks by SCSI target id; of its 8 ids the
#: controller itself takes 7 (QEMU's lsi53c895a: LSI_MAX_DEVS).
LSI_MAX_TARGET = 6
#: What a guest under TCG needs on its kernel command line to see LSI
#: completions: x-pci-proxy-dev raises interrupts only through KVM irqfds.
LSI_POLLING_APPEND = "irqpoll nolapic noapic"


@dataclass(frozen=True, slots=True)
class VmConfig:
    """The ``[vm]`` table. ``memory`` is in bytes.

    ``console`` is ``"stdio"``, ``"none"``, or an absolute file path (as a
    string) whose folder exists; a file literally named ``stdio`` is written
    ``"./stdio"`` in the spec and arrives here as an absolute path.
    """

    name: str
    memory: int
    cpus: int
    accel: Accel
    kernel: Path | None
    initrd: Path | None
    append: str
    console: str
    run_dir: Path
    uid_range: tuple[int, int]
    sandbox: SandboxMode
    #: Real paths of the folders management may take disk images from (see
    #: launcher.imagepolicy); by default the spec's folder and its disks' folders.
    image_dirs: tuple[Path, ...] = ()
    #: Block devices management may add: ``[vm] devices`` and every [[disk]] device.
    devices: tuple[Path, ...] = ()
    #: The group (name or number) that may use the management socket; None: root only.
    management_group: str | None = None
    #: A fixed user for QEMU (name or number); None: a uid leased from uid_range.
    qemu_user: str | None = None
    #: The group (name or number) that may connect to the vhost-user sockets
    #: of ``--backends-only`` (a QEMU someone else starts runs with it); None:
    #: root only. Unused when mplaunch runs QEMU itself.
    frontend_group: str | None = None


@dataclass(frozen=True, slots=True)
class EmulatorSpec:
    """One ``[[emulator]]``: a sandboxed process and its restart policy."""

    id: str
    kind: EmulatorKind
    restart: RestartMode
    heartbeat_ms: int
    hang_timeout_ms: int
    restart_burst: int
    restart_window_s: int
    on_give_up: GiveUpAction


@dataclass(frozen=True, slots=True)
class ControllerSpec:
    """One ``[[controller]]``: a vhost-user-scsi-pci device served by ``emulator``,
    or an LSI53C895A if that emulator is of kind ``lsi`` (``queues`` is then 1
    and means nothing)."""

    id: str
    emulator: str
    queues: int


@dataclass(frozen=True, slots=True)
class DiskSpec:
    """One ``[[disk]]``: a LUN on ``controller`` backed by ``image`` (absolute)."""

    id: str
    controller: str
    lun: int
    image: Path
    format: str
    readonly: bool
    block_size: int


@dataclass(frozen=True, slots=True)
class Spec:
    """A whole validated spec. ``path`` is the spec file's absolute path."""

    path: Path
    vm: VmConfig
    emulators: tuple[EmulatorSpec, ...]
    controllers: tuple[ControllerSpec, ...]
    disks: tuple[DiskSpec, ...]

    def emulator(self, emulator_id: str) -> EmulatorSpec:
        """The emulator with this id; KeyError if there is none."""
        return _by_id(self.emulators, emulator_id)

    def controller(self, controller_id: str) -> ControllerSpec:
        """The controller with this id; KeyError if there is none."""
        return _by_id(self.controllers, controller_id)

    def disk(self, disk_id: str) -> DiskSpec:
        """The disk with this id; KeyError if there is none."""
        return _by_id(self.disks, disk_id)

    def controllers_of(self, emulator_id: str) -> tuple[ControllerSpec, ...]:
        """The controllers ``emulator_id`` serves, in spec order."""
        return tuple(c for c in self.controllers if c.emulator == emulator_id)

    def disks_of(self, controller_id: str) -> tuple[DiskSpec, ...]:
        """The disks attached to ``controller_id``, in spec order."""
        return tuple(d for d in self.disks if d.controller == controller_id)

    def kind_of_controller(self, controller_id: str) -> EmulatorKind:
        """The kind of the emulator serving ``controller_id``: what device the
        VM gets for it. KeyError if there is no such controller."""
        return self.emulator(self.controller(controller_id).emulator).kind

    def emulators_of_kind(self, kind: EmulatorKind) -> tuple[EmulatorSpec, ...]:
        """The emulators of ``kind``, in spec order."""
        return tuple(e for e in self.emulators if e.kind is kind)

    @property
    def has_lsi(self) -> bool:
        """True if an emulator is of kind ``lsi`` (see docs/lsi.md for what that rules out)."""
        return any(e.kind is EmulatorKind.LSI for e in self.emulators)


def lsi_polling_warning(spec: Spec, accel: Accel, file: str | None = None) -> str | None:
    """The warning for a guest that will not see its LSI disks, or None.

    Under TCG the interrupts of x-pci-proxy-dev never reach the guest (QEMU
    delivers them through KVM irqfds only), so a guest that does not poll
    times out on every SCSI command. ``accel`` is the resolved one; ``file``
    is the spec as the user named it (default: its absolute path).
    """
    if accel is not Accel.TCG or not spec.has_lsi or "irqpoll" in spec.vm.append.split():
        return None
    return (f"{file or spec.path}: [vm] append = {render_value(spec.vm.append)}: warning: the "
            "guest runs under TCG and its kernel command line lacks irqpoll: interrupts of "
            "the lsi emulators' controllers (x-pci-proxy-dev) reach a guest only through KVM "
            "irqfds, so every SCSI command would time out; add "
            f'"{LSI_POLLING_APPEND}" to append')


_Item = TypeVar("_Item", EmulatorSpec, ControllerSpec, DiskSpec)


def _by_id(items: tuple[_Item, ...], ident: str) -> _Item:
    for item in items:
        if item.id == ident:
            return item
    raise KeyError(ident)


class SpecError(Exception):
    """A spec that cannot be used. ``problems`` holds one line per mistake,
    each naming the file, table, field, value and what is allowed."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__(*self.problems)

    def __str__(self) -> str:
        return "\n".join(self.problems)


# --- rendering values the way the user wrote them --------------------------

_MAX_DEPTH = 3
_MAX_ITEMS = 8
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


_MAX_STRING = 100
_KEEP_STRING = 60
MAX_APPEND_BYTES = 2047  # x86 Linux: COMMAND_LINE_SIZE 2048 with its NUL


def _render_string(text: str) -> str:
    if len(text) > _MAX_STRING:  # a long value would bury the message
        return _render_string(text[:_KEEP_STRING])[:-1] + f'..." ({len(text)} characters)'
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F or 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def render_key(key: object) -> str:
    """A key as TOML would spell it: bare when it can be, quoted otherwise."""
    text = str(key)
    return text if _BARE_KEY.fullmatch(text) else _render_string(text)


def render_value(value: object, depth: int = 0) -> str:
    """``value`` in TOML syntax: strings quoted, ints bare, bools true/false.

    Arrays and inline tables are cut short (deep or long ones would bury
    the message they appear in).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _render_string(value)
    if isinstance(value, int):
        try:
            return str(value)
        except ValueError:  # beyond int->str's digit limit
            return "<integer too long to show>"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list | tuple | Mapping):
        if isinstance(value, Mapping):
            items = [f"{render_key(k)} = {render_value(v, depth + 1)}"
                     for k, v in list(value.items())[:_MAX_ITEMS] if depth < _MAX_DEPTH]
            opening, closing = "{ ", " }"
        else:
            items = [render_value(v, depth + 1) for v in value[:_MAX_ITEMS] if depth < _MAX_DEPTH]
            opening, closing = "[", "]"
        if len(value) > len(items):
            items.append("...")
        return opening + ", ".join(items) + closing if items else opening.strip() + closing.strip()
    return repr(value)


# --- reading one table -------------------------------------------------------

_ABSENT = object()
E = TypeVar("E", bound=StrEnum)

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_UID_RANGE_RE = re.compile(r"([0-9]{1,10})-([0-9]{1,10})")
NAME_RULE = "1 to 63 characters from a-z, 0-9, - (not starting with -)"
UID_RANGE_RULE = f'must be "A-B" with {UID_MIN} <= A <= B <= {UID_MAX}'


class _Problems:
    """Collects problem lines for one spec file."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.lines.append(f"{self.file}: {where}: {what}")


class _Table:
    """Typed access to one table's fields; every mistake goes to ``out``.

    A getter returns the checked value, or None when the field is invalid
    or absent without a default (the caller tells these apart with
    ``has``). The ``Spec`` is only built when no problem was recorded, so a
    None never reaches it.
    """

    def __init__(self, out: _Problems, label: str, data: Mapping[str, object],
                 allowed: tuple[str, ...]) -> None:
        self.out = out
        self.label = label
        self.data = data
        for key in data:
            if key not in allowed:
                out.add(f"{label} {render_key(key)}",
                        f"unknown field; allowed: {', '.join(allowed)}")

    def has(self, key: str) -> bool:
        return key in self.data

    def bad(self, key: str, value: object, what: str) -> None:
        self.out.add(f"{self.label} {key} = {render_value(value)}", what)

    def problem(self, what: str) -> None:
        self.out.add(self.label, what)

    def _get(self, key: str, required: str | None) -> object:
        value = self.data.get(key, _ABSENT)
        if value is _ABSENT and required is not None:
            self.out.add(f"{self.label} {key}", f"missing; required: {required}")
        return value

    def integer(self, key: str, lo: int, hi: int, default: int | None = None) -> int | None:
        rule = f"an integer from {lo} to {hi}"
        value = self._get(key, rule if default is None else None)
        if value is _ABSENT:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.bad(key, value, f"must be {rule}")
            return None
        return value

    def boolean(self, key: str, default: bool) -> bool | None:
        value = self._get(key, None)
        if value is _ABSENT:
            return default
        if not isinstance(value, bool):
            self.bad(key, value, "must be true or false")
            return None
        return value

    def choice(self, key: str, kind: type[E], default: E) -> E | None:
        value = self._get(key, None)
        if value is _ABSENT:
            return default
        if isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                pass
        self.bad(key, value, "must be one of " + ", ".join(m.value for m in kind))
        return None

    def string(self, key: str, default: str) -> str | None:
        value = self._get(key, None)
        if value is _ABSENT:
            return default
        if not isinstance(value, str):
            self.bad(key, value, "must be a string")
            return None
        return value

    def ident(self, key: str, pattern: re.Pattern[str], rule: str, noun: str) -> str | None:
        """A required name or id matching ``pattern``."""
        value = self._get(key, f"{noun}, {rule}")
        if value is _ABSENT:
            return None
        if not isinstance(value, str) or not pattern.fullmatch(value):
            self.bad(key, value, f"must be {rule}")
            return None
        return value

    def reference(self, key: str, target: str) -> str | None:
        """A required id of an entry in another table (checked later)."""
        noun = f"the id of a [[{target}]]"
        value = self._get(key, noun)
        if value is _ABSENT:
            return None
        if not isinstance(value, str):
            self.bad(key, value, f"must be {noun} (a string)")
            return None
        return value

    def path(self, key: str, base: Path, noun: str, required: bool) -> Path | None:
        """A path string, made absolute against ``base`` (the spec's folder)."""
        value = self._get(key, noun if required else None)
        if value is _ABSENT:
            return None
        if not isinstance(value, str) or not value:
            self.bad(key, value, f"must be {noun}")
            return None
        if "\0" in value:
            self.bad(key, value, "must not contain a NUL character")
            return None
        try:
            return (base / value).resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop, for one
            self.bad(key, value, f"cannot be resolved: {exc}")
            return None

    def file(self, key: str, path: Path | None, block_ok: bool) -> os.stat_result | None:
        """Check that ``path`` (from field ``key``) is an existing file."""
        if path is None:
            return None
        value = self.data[key]
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            self.bad(key, value, "no such file")
            return None
        except OSError as exc:
            self.bad(key, value, f"cannot be checked: {exc.strerror or exc}")
            return None
        if stat.S_ISREG(st.st_mode) or (block_ok and stat.S_ISBLK(st.st_mode)):
            return st
        self.bad(key, value, "must be a regular file or a block device" if block_ok
                 else "must be a regular file")
        return None


# --- the tables ----------------------------------------------------------------

VM_FIELDS = ("name", "memory", "cpus", "accel", "kernel", "initrd", "append", "console",
             "run_dir", "uid_range", "sandbox", "image_dirs", "devices", "management_group",
             "frontend_group", "qemu_user")
EMULATOR_FIELDS = ("id", "kind", "restart", "heartbeat_ms", "hang_timeout_ms",
                   "restart_burst", "restart_window_s", "on_give_up")
CONTROLLER_FIELDS = ("id", "emulator", "queues")
DISK_FIELDS = ("id", "controller", "lun", "image", "format", "readonly", "block_size")
TOP_LEVEL = "[vm], [[emulator]], [[controller]], [[disk]]"
ARRAYS = ("emulator", "controller", "disk")
DISK_FORMATS = ("raw",)

Fields = dict[str, Any]


def _memory(t: _Table) -> int | None:
    value = t.data.get("memory", _ABSENT)
    if value is _ABSENT:
        return 512 * M
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        t.bad("memory", value, f"must be at least {format_size(MIN_MEMORY)}")
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(value)
        size = parse_size(value)
    except ValueError:
        t.bad("memory", value, f"must be a size: {SIZE_SYNTAX}, e.g. \"512M\"")
        return None
    if size < MIN_MEMORY:
        t.bad("memory", value, f"must be at least {format_size(MIN_MEMORY)}")
    elif size > MAX_MEMORY:
        t.bad("memory", value, f"must be at most {format_size(MAX_MEMORY)}")
    elif size % MEMORY_ALIGN:
        t.bad("memory", value, f"must be a multiple of {format_size(MEMORY_ALIGN)}")
    else:
        return size
    return None


def _console(t: _Table, base: Path) -> str | None:
    value = t.data.get("console", CONSOLE_STDIO)
    if value in (CONSOLE_STDIO, CONSOLE_NONE):
        return str(value)
    path = t.path("console", base, "stdio, none or a file path", required=False)
    if path is None:
        return None
    # os.path's checks answer False on any OSError (EACCES too); Path's may raise.
    if os.path.isdir(path):
        t.bad("console", value, "is a folder; must be stdio, none or a file path")
    elif not os.path.isdir(path.parent):
        t.bad("console", value, "its folder does not exist")
    else:
        return str(path)
    return None


def _uid_range(t: _Table, emulator_count: int) -> tuple[int, int] | None:
    value = t.data.get("uid_range", _ABSENT)
    if value is _ABSENT:
        value = "64000-64999"
    match = _UID_RANGE_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        t.bad("uid_range", value, UID_RANGE_RULE)
        return None
    first, last = int(match.group(1)), int(match.group(2))
    if not UID_MIN <= first <= last <= UID_MAX:
        t.bad("uid_range", value, UID_RANGE_RULE)
        return None
    if first <= UID_NOBODY <= last:
        t.bad("uid_range", value, f"must not include {UID_NOBODY} (nobody)")
        return None
    count = last - first + 1
    if count < emulator_count:
        t.bad("uid_range", value, f"holds {count} uid(s) but there are {emulator_count} "
              "[[emulator]] tables; each emulator needs its own uid")
        return None
    accounts = accounts_in(first, last)  # never leased (launcher.uidpool)
    free = count - len(accounts)
    if free == 0:
        t.bad("uid_range", value, "holds no uid mplaunch may lease: each one is the uid or "
              f"gid of a host account ({describe_accounts(accounts)}), and those are never "
              "leased; choose a range outside the host's accounts")
        return None
    if free < emulator_count:
        t.bad("uid_range", value, f"holds {free} uid(s) mplaunch may lease but there are "
              f"{emulator_count} [[emulator]] tables; each emulator needs its own uid, and "
              f"the uids and gids of host accounts are never leased "
              f"({describe_accounts(accounts)})")
        return None
    return first, last


def _path_list(t: _Table, key: str, base: Path, kind: str) -> tuple[Path, ...] | None:
    """An array of paths, each an existing ``kind`` ("folder" or "block device"),
    as real paths; None if absent (the caller fills in the default) or bad."""
    value = t.data.get(key, _ABSENT)
    if value is _ABSENT:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        t.bad(key, value, f"must be an array of paths, each an existing {kind}")
        return None
    out = []
    for item in value:
        if "\0" in item:
            t.bad(key, value, "must not contain a NUL character")
            return None
        path = Path(os.path.realpath(base / item))
        try:
            mode = path.stat().st_mode
        except OSError:
            mode = 0
        if not (stat.S_ISDIR(mode) if kind == "folder" else stat.S_ISBLK(mode)):
            t.bad(key, value, f"{render_value(item)} is not an existing {kind}")
            return None
        out.append(path)
    return tuple(out)


def _group(t: _Table, key: str) -> str | None:
    """A group (name or number) that exists on this host, as given; None if absent."""
    value = t.data.get(key, _ABSENT)
    if value is _ABSENT:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        t.bad(key, value, "must be a group name or number")
        return None
    try:
        grp.getgrgid(value) if isinstance(value, int) else grp.getgrnam(value)
    except (KeyError, OverflowError, ValueError):
        t.bad(key, value, "no such group on this host")
        return None
    return str(value)


def _qemu_user(t: _Table, uid_range: tuple[int, int] | None) -> str | None:
    """A host user QEMU runs as instead of a leased uid: never root. Its uid
    may lie inside uid_range (the pool never leases an existing account's
    uid); its primary gid may too if a group has it, and is refused if not:
    an emulator could then be leased that id as its gid, QEMU's group."""
    value = t.data.get("qemu_user", _ABSENT)
    if value is _ABSENT:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        t.bad("qemu_user", value, "must be a user name or number")
        return None
    try:
        user = pwd.getpwuid(value) if isinstance(value, int) else pwd.getpwnam(value)
    except (KeyError, OverflowError, ValueError):
        t.bad("qemu_user", value, "no such user on this host")
        return None
    if user.pw_uid == 0 or user.pw_gid == 0:
        t.bad("qemu_user", value, "must not be root or in group root: QEMU runs unprivileged")
        return None
    if uid_range is not None and uid_range[0] <= user.pw_gid <= uid_range[1] \
            and host_account(user.pw_gid) is None:
        t.bad("qemu_user", value, f"its primary gid {user.pw_gid} is inside uid_range "
              f"{uid_range[0]}-{uid_range[1]} and no group has it, so an emulator could "
              "be leased it; give the user a group of its own or a range without it")
        return None
    return str(value)


def _image_rules(vm: Fields, base: Path,
                 disks: list[tuple[_Entry, os.stat_result | None]]) -> None:
    """Fill in the default image_dirs and the devices [[disk]]s name; a
    [[disk]] file outside an explicit image_dirs is a problem."""
    files = [(e, e.fields["image"]) for e, st in disks
             if st is not None and stat.S_ISREG(st.st_mode)]
    devices = [e.fields["image"] for e, st in disks if st is not None and stat.S_ISBLK(st.st_mode)]
    if not vm["_image_dirs_given"]:
        vm["image_dirs"] = default_dirs(base, (p for _, p in files))
    elif vm["image_dirs"] is not None:
        for entry, image in files:
            if not any(image.is_relative_to(d) for d in vm["image_dirs"]):
                entry.table.bad("image", entry.table.data["image"],
                                "is outside every folder of [vm] image_dirs")
    listed = vm["devices"] or ()
    vm["devices"] = (*listed, *(d for d in devices if d not in listed))


def _parse_vm(t: _Table, base: Path, emulator_count: int) -> Fields:
    f: Fields = {}
    f["name"] = t.ident("name", _NAME_RE, NAME_RULE, "a VM name")
    f["memory"] = _memory(t)
    f["cpus"] = t.integer("cpus", 1, 64, default=1)
    f["accel"] = t.choice("accel", Accel, Accel.AUTO)
    f["kernel"] = t.path("kernel", base, "a path to a kernel image", required=False)
    t.file("kernel", f["kernel"], block_ok=False)
    f["initrd"] = t.path("initrd", base, "a path to an initrd image", required=False)
    t.file("initrd", f["initrd"], block_ok=False)
    if t.has("initrd") and not t.has("kernel"):
        t.bad("initrd", t.data["initrd"], "needs kernel; an initrd is only used with "
              "direct kernel boot")
    f["append"] = t.string("append", "")
    if f["append"] and len(f["append"].encode()) > MAX_APPEND_BYTES:
        t.bad("append", f["append"], f"is {len(f['append'].encode())} bytes; the kernel takes "
              f"at most {MAX_APPEND_BYTES} and would not boot")
    elif f["append"] and not t.has("kernel"):
        t.bad("append", f["append"], "needs kernel; a command line is only used with "
              "direct kernel boot")
    f["console"] = _console(t, base)
    run_dir = t.path("run_dir", base, "a path to a folder", required=False)
    if run_dir is not None and os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        t.bad("run_dir", t.data["run_dir"], "exists and is not a folder")
    if run_dir is None and not t.has("run_dir") and f["name"] is not None:
        run_dir = DEFAULT_RUN_ROOT / f["name"]
    if run_dir is not None and f["name"] is not None and os.path.isdir(run_dir):
        problem = foreign_problem(run_dir, f["name"])
        if problem is not None:
            t.bad("run_dir", t.data.get("run_dir", str(run_dir)), problem)
    f["run_dir"] = run_dir
    f["uid_range"] = _uid_range(t, emulator_count)
    f["sandbox"] = t.choice("sandbox", SandboxMode, SandboxMode.ON)
    f["image_dirs"] = _path_list(t, "image_dirs", base, "folder")
    f["_image_dirs_given"] = t.has("image_dirs")
    f["devices"] = _path_list(t, "devices", base, "block device")
    f["management_group"] = _group(t, "management_group")
    f["frontend_group"] = _group(t, "frontend_group")
    f["qemu_user"] = _qemu_user(t, f["uid_range"])
    return f


def _parse_emulator(t: _Table) -> Fields:
    f: Fields = {}
    f["id"] = t.ident("id", ID_PATTERN, ID_RULE, "an id")
    f["kind"] = t.choice("kind", EmulatorKind, EmulatorKind.SCSI)
    f["restart"] = t.choice("restart", RestartMode, RestartMode.ON_FAILURE)
    f["heartbeat_ms"] = t.integer("heartbeat_ms", 10, 60_000, default=500)
    f["hang_timeout_ms"] = t.integer("hang_timeout_ms", 50, 600_000, default=2000)
    f["restart_burst"] = t.integer("restart_burst", 0, 1000, default=5)
    f["restart_window_s"] = t.integer("restart_window_s", 1, 86_400, default=60)
    f["on_give_up"] = t.choice("on_give_up", GiveUpAction, GiveUpAction.PAUSE)
    beat, hang = f["heartbeat_ms"], f["hang_timeout_ms"]
    if beat is not None and hang is not None and hang <= beat:
        t.bad("hang_timeout_ms", hang, f"must be greater than heartbeat_ms ({beat})")
        f["hang_timeout_ms"] = None
    return f


def _parse_controller(t: _Table) -> Fields:
    f: Fields = {}
    f["id"] = t.ident("id", ID_PATTERN, ID_RULE, "an id")
    f["emulator"] = t.reference("emulator", "emulator")
    f["queues"] = t.integer("queues", 1, MAX_REQUEST_QUEUES, default=1)
    return f


def _parse_disk(t: _Table, base: Path) -> tuple[Fields, os.stat_result | None]:
    f: Fields = {}
    f["id"] = t.ident("id", ID_PATTERN, ID_RULE, "an id")
    f["controller"] = t.reference("controller", "controller")
    f["lun"] = t.integer("lun", 0, MAX_LUN)
    f["image"] = t.path("image", base, "a path to a disk image", required=True)
    st = t.file("image", f["image"], block_ok=True)
    fmt = t.data.get("format", "raw")
    if fmt not in DISK_FORMATS or not isinstance(fmt, str):
        t.bad("format", fmt, "must be one of " + ", ".join(DISK_FORMATS))
        fmt = None
    f["format"] = fmt
    f["readonly"] = t.boolean("readonly", False)
    size = t.data.get("block_size", 512)
    if not isinstance(size, int) or isinstance(size, bool) or size not in BLOCK_SIZES:
        t.bad("block_size", size, "must be " + BLOCK_SIZE_RULE)
        size = None
    f["block_size"] = size
    if st is not None and stat.S_ISREG(st.st_mode) and size is not None:
        problem = image_size_problem(st.st_size, size)
        if problem is not None:
            t.bad("image", t.data["image"], problem)
    return f, st


@dataclass(slots=True)
class _Entry:
    """One array entry being read: where it is, its table, its checked fields."""

    index: int
    table: _Table
    fields: Fields

    @property
    def label(self) -> str:
        return self.table.label


def _label(kind: str, index: int, data: Mapping[str, object]) -> str:
    ident = data.get("id")
    suffix = f" (id {render_value(ident)})" if isinstance(ident, str) else ""
    return f"[[{kind}]] #{index}{suffix}"


Raw = Mapping[str, object]


def _top_level(out: _Problems, data: Raw) -> tuple[Raw | None, dict[str, list[tuple[int, Raw]]]]:
    """Split the document into the [vm] table and the arrays of tables."""
    for key, value in data.items():
        if key == "vm" or key in ARRAYS:
            continue
        if isinstance(value, Mapping):
            where = f"[{render_key(key)}]"
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            where = f"[[{render_key(key)}]]"
        else:
            where = f"{render_key(key)} = {render_value(value)}"
        out.add(where, f"unknown table; allowed: {TOP_LEVEL}")
    vm = data.get("vm", {})
    if not isinstance(vm, Mapping):
        if isinstance(vm, list) and all(isinstance(v, Mapping) for v in vm):
            out.add("[[vm]]", "must be a single [vm] table, not an array of tables")
        else:
            out.add(f"vm = {render_value(vm)}", "must be a [vm] table")
        vm = None
    arrays: dict[str, list[tuple[int, Raw]]] = {}
    for kind in ARRAYS:
        value = data.get(kind, [])
        entries: list[tuple[int, Raw]] = []
        if isinstance(value, Mapping):
            out.add(f"[{kind}]", f"must be an array of tables: write [[{kind}]]")
        elif not isinstance(value, list):
            out.add(f"{kind} = {render_value(value)}", f"must be an array of tables ([[{kind}]])")
        else:
            for index, item in enumerate(value):
                if isinstance(item, Mapping):
                    entries.append((index, item))
                else:
                    out.add(f"[[{kind}]] #{index} = {render_value(item)}", "must be a table")
        arrays[kind] = entries
    return vm, arrays


def _unique_ids(entries: list[_Entry], kind: str) -> dict[str, _Entry]:
    """Map each valid id to its first entry; report the later duplicates."""
    seen: dict[str, _Entry] = {}
    for entry in entries:
        ident = entry.fields["id"]
        if ident is None:
            continue
        if ident in seen:
            entry.table.bad("id", ident, f"already used by [[{kind}]] #{seen[ident].index}")
        else:
            seen[ident] = entry
    return seen


def _lsi_rules(emulator_ids: dict[str, _Entry], served: dict[str, list[_Entry]],
               disks: list[tuple[_Entry, os.stat_result | None]]) -> None:
    """What an ``lsi`` emulator allows.

    One controller per emulator: QEMU 7.2's remote process accepts one
    x-remote-object, so one PCI device. A disk's ``lun`` is its SCSI target
    id on the LSI53C895A. ``queues`` belongs to virtio and is refused.
    """
    lsi: set[str] = set()
    for ident, emulator in emulator_ids.items():
        if emulator.fields["kind"] is not EmulatorKind.LSI:
            continue
        for index, entry in enumerate(served.get(ident, ())):
            if entry.fields["id"] is not None:
                lsi.add(entry.fields["id"])
            if index > 0:
                entry.table.bad(
                    "emulator", ident,
                    f'this emulator is of kind "lsi" and already serves '
                    f"{served[ident][0].label}: QEMU's remote process holds one device "
                    "(one x-remote-object per process in QEMU 7.2); serve this controller "
                    'from another [[emulator]] of kind "lsi"')
            if entry.table.has("queues"):
                entry.table.bad(
                    "queues", entry.table.data["queues"],
                    f'has no meaning here: emulator {render_value(ident)} is of kind "lsi", '
                    "so this is an LSI53C895A, which has no virtio queues; remove it")
    for entry, _ in disks:
        lun = entry.fields["lun"]
        if entry.fields["controller"] in lsi and lun is not None and lun > LSI_MAX_TARGET:
            entry.table.bad(
                "lun", lun,
                f"is the SCSI target id on LSI53C895A controller "
                f"{render_value(entry.fields['controller'])} (its emulator is of kind "
                f'"lsi"): must be an integer from 0 to {LSI_MAX_TARGET} (the controller '
                f"itself is target {LSI_MAX_TARGET + 1})")


def _check_reference(entry: _Entry, key: str, target: str, known: dict[str, _Entry]) -> None:
    ref = entry.fields[key]
    if ref is not None and ref not in known:
        names = ", ".join(known) or "none"
        entry.table.bad(key, ref, f"no [[{target}]] has this id; known: {names}")


def _cross_check(emulators: list[_Entry], controllers: list[_Entry],
                 disks: list[tuple[_Entry, os.stat_result | None]]) -> None:
    emulator_ids = _unique_ids(emulators, "emulator")
    controller_ids = _unique_ids(controllers, "controller")
    _unique_ids([d for d, _ in disks], "disk")
    for entry in controllers:
        _check_reference(entry, "emulator", "emulator", emulator_ids)
    served: dict[str, list[_Entry]] = {}
    for entry in controllers:
        served.setdefault(entry.fields["emulator"], []).append(entry)
    for ident, entry in emulator_ids.items():
        if ident not in served:
            entry.table.problem("serves no controller; name it in a [[controller]]'s "
                                "emulator field, or remove it")
        elif (len(served[ident]) > MAX_CONTROLLERS
              and entry.fields["kind"] is not EmulatorKind.LSI):  # _lsi_rules: 1 at most
            # One line, on the first controller too many: the fix is one move.
            first_extra = served[ident][MAX_CONTROLLERS]
            first_extra.table.bad(
                "emulator", ident,
                f"this emulator would serve {len(served[ident])} controllers, at most "
                f"{MAX_CONTROLLERS} are allowed (its heartbeat reports on no more); serve "
                "the rest from another [[emulator]]")
    _lsi_rules(emulator_ids, served, disks)
    luns: dict[tuple[str, int], _Entry] = {}
    images: dict[tuple[int, int], _Entry] = {}
    for entry, st in disks:
        _check_reference(entry, "controller", "controller", controller_ids)
        f = entry.fields
        if f["controller"] is not None and f["lun"] is not None:
            first = luns.setdefault((f["controller"], f["lun"]), entry)
            if first is not entry:
                entry.table.bad("lun", f["lun"], f"already used by {first.label} on controller "
                                f"{render_value(f['controller'])}")
        if st is not None and f["readonly"] is not None:
            other = images.setdefault((st.st_dev, st.st_ino), entry)
            if other is not entry and not (f["readonly"] and other.fields["readonly"]):
                entry.table.bad("image", entry.table.data["image"],
                                f"same file as the image of {other.label}; disks may share "
                                "an image only if all of them are readonly")


def parse_spec(data: Mapping[str, Any], path: str | Path) -> Spec:
    """Validate parsed TOML ``data`` of the spec at ``path`` and build a Spec.

    ``path`` is the spec file as the user named it: problem lines quote it
    unchanged, and relative paths inside the spec are taken relative to its
    folder (files they name are checked for existence). Raises SpecError
    listing every problem found.
    """
    out = _Problems(str(path))
    if not isinstance(data, Mapping):
        out.add("document", "must be a TOML table")
        raise SpecError(out.lines)
    base = Path(path).absolute().parent  # resolved per path, in _Table.path
    vm_data, arrays = _top_level(out, data)
    vm_fields: Fields | None = None
    if vm_data is not None:
        vm_table = _Table(out, "[vm]", vm_data, VM_FIELDS)
        vm_fields = _parse_vm(vm_table, base, len(arrays["emulator"]))

    emulators = [_Entry(i, t, _parse_emulator(t)) for i, d in arrays["emulator"]
                 for t in [_Table(out, _label("emulator", i, d), d, EMULATOR_FIELDS)]]
    controllers = [_Entry(i, t, _parse_controller(t)) for i, d in arrays["controller"]
                   for t in [_Table(out, _label("controller", i, d), d, CONTROLLER_FIELDS)]]
    disks: list[tuple[_Entry, os.stat_result | None]] = []
    for i, d in arrays["disk"]:
        table = _Table(out, _label("disk", i, d), d, DISK_FIELDS)
        fields, st = _parse_disk(table, base)
        disks.append((_Entry(i, table, fields), st))
    _cross_check(emulators, controllers, disks)
    if vm_fields is not None:
        _image_rules(vm_fields, base, disks)
        del vm_fields["_image_dirs_given"]

    if out.lines or vm_fields is None:
        raise SpecError(out.lines)
    return Spec(
        path=Path(path).resolve(),
        vm=VmConfig(**vm_fields),
        emulators=tuple(EmulatorSpec(**e.fields) for e in emulators),
        controllers=tuple(ControllerSpec(**c.fields) for c in controllers),
        disks=tuple(DiskSpec(**d.fields) for d, _ in disks),
    )


def load_spec(path: str | Path) -> Spec:
    """Read, parse and validate the spec file at ``path``; raises SpecError."""
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise SpecError([f"{file}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - raw.rfind(b"\n", 0, exc.start)
        raise SpecError([f"{file}: not UTF-8 text (at line {line}, column {column})"]) from None
    try:
        data = tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, and tomllib's int size limit
        raise SpecError([f"{file}: {exc}"]) from None
    except RecursionError:
        raise SpecError([f"{file}: nested too deeply"]) from None
    return parse_spec(data, path)
