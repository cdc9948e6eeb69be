"""Command line: ``python -m launcher.guest build|path [--flavour F] [--out DIR] [--force]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .builder import DEFAULT_FLAVOUR, FLAVOURS, GuestBuildError, ensure_guest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launcher.guest",
        description="Build the test guest (Debian kernel + busybox initramfs).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build DIR/vmlinuz and DIR/initrd.img if stale")
    build.add_argument("--force", action="store_true", help="rebuild even if current")
    path = commands.add_parser("path", help="print the kernel and initrd paths (building first)")
    for sub in (build, path):
        sub.add_argument("--flavour", choices=sorted(FLAVOURS), default=DEFAULT_FLAVOUR.name,
                         help="cloud: Debian's cloud kernel (default, build/guest); lsi: the "
                         "standard kernel with the LSI53C895A driver (build/guest-lsi); bench: "
                         "the cloud guest with the host's fio and its libraries "
                         "(build/guest-bench)")
        sub.add_argument("--out", type=Path, default=None,
                         help="output folder (default: build/ and the flavour's folder)")
    args = parser.parse_args(argv)
    try:
        image = ensure_guest(args.out, force=getattr(args, "force", False),
                             flavour=FLAVOURS[args.flavour])
    except GuestBuildError as exc:
        print(f"guest: error: {exc}", file=sys.stderr)
        return 1
    if args.command == "path":
        print(image.kernel)
        print(image.initrd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
