"""The test guest's interface: its kernel command line and its console reports.

The guest's /init (init.sh) reads ``mpl.*`` parameters from the kernel
command line and answers with console lines that start with ``MPL ``.
:func:`kernel_append` composes the parameters (base64-encoding a shell
command or a fio job file so it survives the command line),
:func:`parse_report` turns one console line into a :class:`GuestReport`,
and :func:`fio_output` picks fio's JSON out of the fio workload's reports.
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "BASE_APPEND",
    "FioOutput",
    "FioOutputError",
    "fio_output",
    "GuestReport",
    "Then",
    "Workload",
    "kernel_append",
    "parse_report",
    "reports",
]

#: What every boot of the guest wants on the command line: the serial console,
#: few kernel messages, a reboot on panic, and no Spectre mitigations (they
#: only slow the guest down under TCG).
BASE_APPEND = "console=ttyS0 quiet panic=-1 mitigations=off"

#: Reports whose payload is free text rather than key=value words.
_TEXT_KINDS = frozenset({"KLOG", "OUT", "JSON"})


class Workload(enum.Enum):
    """What the guest does once its disks have settled."""

    BOOT = "boot"
    DISKS = "disks"
    VERIFY = "verify"
    SHELL = "shell"
    IO = "io"
    FIO = "fio"


class Then(enum.Enum):
    """What the guest does after the workload."""

    POWEROFF = "poweroff"
    REBOOT = "reboot"


@dataclass(frozen=True, slots=True)
class GuestReport:
    """One ``MPL`` console line: its kind (BOOT, DISK, ...) and its fields.

    ``text`` is everything after the kind; for KLOG and OUT lines it is the
    payload and ``fields`` is empty.
    """

    kind: str
    text: str
    fields: Mapping[str, str] = field(default_factory=dict)

    def number(self, key: str) -> int:
        """A numeric field; KeyError or ValueError if it is absent or not a number."""
        return int(self.fields[key])


def parse_report(line: str) -> GuestReport | None:
    """The report on a console line, or None if it is not an ``MPL`` line.

    Leading noise before ``MPL `` (a carriage return, a partial kernel line)
    is tolerated; the report itself must run to the end of the line.
    """
    start = line.find("MPL ")
    if start < 0:
        return None
    kind, _, text = line[start + 4:].rstrip("\r\n").partition(" ")
    if not kind.isupper():
        return None
    if kind in _TEXT_KINDS:
        return GuestReport(kind, text)
    fields = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if sep:
            fields[key] = value
    return GuestReport(kind, text, fields)


def reports(lines: Iterable[str]) -> list[GuestReport]:
    """Every report in a console transcript, in order."""
    return [report for line in lines if (report := parse_report(line)) is not None]


def kernel_append(
    workload: Workload = Workload.BOOT,
    *,
    disks: int | None = None,
    seed: int | None = None,
    count: int | None = None,
    seconds: int | None = None,
    command: str | None = None,
    fio_job: str | None = None,
    then: Then = Then.POWEROFF,
    base: str = BASE_APPEND,
) -> str:
    """The kernel command line for one run of the guest."""
    words = [base, f"mpl.workload={workload.value}"]
    for name, value in (("disks", disks), ("seed", seed), ("count", count),
                        ("seconds", seconds)):
        if value is not None:
            if value < 0:
                raise ValueError(f"mpl.{name} must not be negative, got {value}")
            words.append(f"mpl.{name}={value}")
    if command is not None:
        if workload is not Workload.SHELL:
            raise ValueError("a command is only run by the shell workload")
        words.append("mpl.cmd=" + base64.b64encode(command.encode()).decode())
    elif workload is Workload.SHELL:
        raise ValueError("the shell workload needs a command")
    if fio_job is not None:
        if workload is not Workload.FIO:
            raise ValueError("a fio job file is only run by the fio workload")
        words.append("mpl.fio=" + base64.b64encode(fio_job.encode()).decode())
    elif workload is Workload.FIO:
        raise ValueError("the fio workload needs a job file")
    words.append(f"mpl.then={then.value}")
    append = " ".join(word for word in words if word)
    if len(append) >= 2048:  # COMMAND_LINE_SIZE on x86
        raise ValueError(f"kernel command line too long ({len(append)} bytes, limit 2047)")
    return append


class FioOutputError(ValueError):
    """The console holds no complete fio result; the message says what is missing."""


@dataclass(frozen=True, slots=True)
class FioOutput:
    """What the fio workload reported: fio's exit status, its JSON text, and
    its other messages (the ``OUT`` lines before the JSON)."""

    rc: int
    json_text: str
    messages: tuple[str, ...] = ()


def fio_output(found: Iterable[GuestReport]) -> FioOutput:
    """fio's result from the reports of one boot of the fio workload.

    The JSON lines are the ``JSON`` reports between ``FIO state=begin`` and
    ``FIO state=end``; the end line's count must match, so a console cut
    short (the guest died, a line was lost) is an error rather than a
    truncated document. fio may write notes ahead of the JSON document in
    its output file; they are moved to ``messages``.
    """
    messages: list[str] = []
    lines: list[str] | None = None
    for report in found:
        if report.kind == "OUT" and lines is None:
            messages.append(report.text)
        elif report.kind == "FIO" and report.fields.get("state") == "begin":
            lines = []
        elif report.kind == "JSON" and lines is not None:
            lines.append(report.text)
        elif report.kind == "FIO" and report.fields.get("state") == "end":
            if lines is None:
                raise FioOutputError("FIO state=end without state=begin")
            try:
                rc, count = report.number("rc"), report.number("lines")
            except (KeyError, ValueError) as exc:
                raise FioOutputError(f"bad end line: {report.text!r}") from exc
            if count != len(lines):
                raise FioOutputError(f"{len(lines)} JSON lines on the console, the guest "
                                     f"sent {count}")
            start = next((i for i, line in enumerate(lines) if line.startswith("{")), len(lines))
            messages.extend(lines[:start])
            return FioOutput(rc, "\n".join(lines[start:]), tuple(messages))
    raise FioOutputError("no complete fio result on the console"
                         + (" (begun, never ended)" if lines is not None else ""))
