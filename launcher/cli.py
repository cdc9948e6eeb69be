"""`mplaunch SPEC`: boot and supervise a VM; `mplaunch --check SPEC`: validate only."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from launcher import status
from launcher.runfolder import RunFolderBusy, RunFolderError
from launcher.spec import Spec, SpecError, load_spec, lsi_polling_warning, render_value
from launcher.status import LOG

if TYPE_CHECKING:
    from launcher.accel import AccelChoice

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
    parser.add_argument(
        "--incoming",
        metavar="URI",
        help="be the destination of a live migration: start the emulators and a paused "
        "QEMU, listen on URI (unix:PATH or tcp:HOST:PORT) for the source's mplaunch "
        "(mpctl migrate NAME URI), check that the disks match, take the guest's state and "
        "run it; exit 1, the guest never run, if the migration fails",
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
        help="print a complete libvirt domain (for virsh define) that does the same, and exit",
    )
    parser.add_argument(
        "--fragment",
        action="store_true",
        help="with --print-libvirt-xml: print only the elements to merge into a domain of "
        "your own (shared memory and the controllers on their PCI addresses)",
    )
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="count", default=0, help="more detail on stderr")
    noise.add_argument("-q", "--quiet", action="store_true", help="errors only on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fragment and not args.print_libvirt_xml:
        parser.error("--fragment goes only with --print-libvirt-xml")
    incoming = None
    if args.incoming is not None:
        from launcher.migration.uri import BadUri, parse_uri

        if args.backends_only:
            parser.error("--incoming cannot go with --backends-only: QEMU is then someone "
                         "else's (migrate it with its own tools, e.g. virsh migrate)")
        if args.print_qemu_args or args.print_libvirt_xml:
            parser.error("--incoming cannot go with --print-qemu-args or --print-libvirt-xml")
        try:
            incoming = parse_uri(args.incoming)
        except BadUri as e:
            parser.error(f"--incoming: {e}")
    try:
        spec = load_spec(args.spec)
    except SpecError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    if args.print_qemu_args or args.print_libvirt_xml:
        return _print_attachment(spec, args.spec, args.print_qemu_args, args.fragment)
    if args.backends_only:
        from launcher.libvirt import unattachable

        refusal = unattachable(spec, "--backends-only", args.spec)
        if refusal is not None:
            print(refusal, file=sys.stderr)
            return 1
    if incoming is not None:
        from launcher.migration.compat import unmigratable

        refusal = unmigratable(spec)
        if refusal is not None:
            print(f"{args.spec}: --incoming: {refusal}", file=sys.stderr)
            return 1
    if args.check:
        if not args.quiet:
            warning = _polling_warning(spec, args.spec, None)
            if warning is not None:
                print(warning, file=sys.stderr)
            print(f"{args.spec}: ok", file=sys.stderr)
        return 0
    status.configure(-1 if args.quiet else args.verbose, spec.vm.name)
    from launcher.reattach import CannotReattach
    from launcher.supervisor import Supervisor

    accel: AccelChoice | None = None
    if spec.has_lsi and not args.backends_only:
        from launcher.accel import choose_for

        accel = choose_for(spec)  # as Supervisor would, but known before it starts
        warning = _polling_warning(spec, args.spec, accel)
        if warning is not None:
            LOG.warning("%s", warning)
    try:
        return asyncio.run(Supervisor(spec, accel, backends_only=args.backends_only,
                                      incoming=incoming).run())
    except (RunFolderBusy, CannotReattach) as e:
        LOG.error("%s", e)
        return 1
    except RunFolderError as e:
        LOG.error("%s: [vm] run_dir = %s: %s", args.spec, render_value(str(e.path)), e.problem)
        return 1
    except KeyboardInterrupt:
        return 130


def _print_attachment(spec: Spec, file: str, qemu_args: bool, fragment: bool) -> int:
    """``--print-qemu-args`` or ``--print-libvirt-xml`` (``--fragment``)."""
    from launcher.libvirt import (
        NotAttachable,
        backend_qemu_argv,
        format_argv,
        frontend_group_warning,
        libvirt_domain,
        libvirt_fragment,
        proxy_note,
        unattachable,
    )

    if qemu_args:
        note = proxy_note(spec, file)
        if note is not None:
            print(note, file=sys.stderr)
        print(format_argv(backend_qemu_argv(spec)), end="")
        return 0
    refusal = unattachable(spec, "--print-libvirt-xml", file)
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 1
    try:
        if fragment:  # a fragment has no domain type: the user's domain keeps its own
            xml = libvirt_fragment(spec)
        else:
            from launcher.accel import choose_for

            # The domain type follows the accelerator mplaunch itself would pick.
            xml = libvirt_domain(spec, choose_for(spec).accel)
    except NotAttachable as e:
        print(f"{file}: --print-libvirt-xml: {e}", file=sys.stderr)
        return 1
    warning = frontend_group_warning(spec, file)
    if warning is not None:
        print(warning, file=sys.stderr)
    print(xml, end="")
    return 0


def _polling_warning(spec: Spec, file: str, accel: AccelChoice | None) -> str | None:
    """The TCG polling warning for lsi emulators (once), resolving ``auto``
    (a KVM probe) only when the answer could matter."""
    if not spec.has_lsi or "irqpoll" in spec.vm.append.split():
        return None
    if accel is None:
        from launcher.accel import choose_for

        accel = choose_for(spec)
    return lsi_polling_warning(spec, accel.accel, file)


if __name__ == "__main__":
    sys.exit(main())
