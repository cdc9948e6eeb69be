"""The test guest: Debian's cloud kernel with a busybox initramfs whose /init
runs a workload chosen on the kernel command line and reports on the serial
console. ``python -m launcher.guest build`` makes it; tests and the launcher
call :func:`ensure_guest`."""

from .builder import GuestBuildError, GuestImage, ensure_guest
from .report import (
    BASE_APPEND,
    FioOutput,
    FioOutputError,
    GuestReport,
    Then,
    Workload,
    fio_output,
    kernel_append,
    parse_report,
    reports,
)

__all__ = [
    "BASE_APPEND",
    "FioOutput",
    "FioOutputError",
    "GuestBuildError",
    "GuestImage",
    "GuestReport",
    "Then",
    "Workload",
    "ensure_guest",
    "fio_output",
    "kernel_append",
    "parse_report",
    "reports",
]
