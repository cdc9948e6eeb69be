"""`mplaunch SPEC`: boot and supervise a VM; `mplaunch --check SPEC`: validate only."""

from __future__ import annotations

import argparse
import asyncio
import sys

from launcher import status
from launcher.runfolder import RunFolderBusy, RunFolderError
from launcher.spec import SpecError, load_spec, render_value
from launcher.status import LOG

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mplaunch",
        description="Boot a VM whose SCSI disks are served by sandboxed, supervised emulator "
        "processes, and supervise it until it stops.",
    )
    parser.add_argument("spec", help="the VM spec (TOML)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="only validate the spec: exit 0, or 1 listing every problem",
    )
    parser.add_argument(
        "--backends-only",
        action="store_true",
        help="start no QEMU: serve the emulators on sockets in the run folder for a QEMU "
        "started by someone else (see --print-qemu-args, --print-libvirt-xml)",
    )
    show = parser.add_mutually_exclusive_group()
    show.add_argument(
        "--print-qemu-args",
        action="store_true",
        help="print the QEMU command line that attaches a VM to emulators served on sockets "
        "in the run folder (see --backends-only), and exit",
    )
    show.add_argument(
        "--print-libvirt-xml",
        action="store_true",
        help="print the libvirt domain XML fragment that does the same, and exit",
    )
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="count", default=0, help="more detail on stderr")
    noise.add_argument("-q", "--quiet", action="store_true", help="errors only on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = load_spec(args.spec)
    except SpecError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    if args.print_qemu_args or args.print_libvirt_xml:
        from launcher.libvirt import backend_qemu_argv, format_argv, libvirt_xml

        text = format_argv(backend_qemu_argv(spec)) if args.print_qemu_args else libvirt_xml(spec)
        print(text, end="")
        return 0
    if args.check:
        if not args.quiet:
            print(f"{args.spec}: ok", file=sys.stderr)
        return 0
    status.configure(-1 if args.quiet else args.verbose, spec.vm.name)
    from launcher.supervisor import Supervisor

    try:
        return asyncio.run(Supervisor(spec, backends_only=args.backends_only).run())
    except RunFolderBusy as e:
        LOG.error("%s", e)
        return 1
    except RunFolderError as e:
        LOG.error("%s: [vm] run_dir = %s: %s", args.spec, render_value(str(e.path)), e.problem)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
