"""The emulator's own request rate, against the host's raw read rate of the same image.

A real emulator process serves one controller over the test front-end (no
QEMU, no guest): the bench plays the guest with the test driver, submitting
READ(10) chains into memfd guest RAM and waiting on the call eventfd. At
depth 1 each request is one kick and one wait; at depth 32 a batch of 32
chains is offered with one kick, then the bench waits for all 32 and refills.

The ceiling is the host reading the same image with ``os.preadv`` into a
bytearray at the same offsets, one call per request. The ratio is the
emulator's rate divided by that. The image (256 MiB by default) is filled
and read once first, so both sides read from a warm page cache.

Also reported: the emulator's RSS and its CPU time per request (psutil on
the child, before and after each case).

With ``--log`` the bench plays a migration under way first: it gives the
emulator a dirty log (SET_LOG_BASE), acks VHOST_F_LOG_ALL and sets the
request ring's log flag, so every request also marks its pages and the used
ring's in the log: the cost of dirty logging.

    .venv/bin/python bench/emulator_rate.py [--seconds 2] [--profile out.prof]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emulators.vhost_user.codec import encode_request  # noqa: E402
from emulators.vhost_user.constants import Feature, Request  # noqa: E402
from emulators.vhost_user.messages import U64, LogDescription, VringAddr  # noqa: E402
from tests.support.emulator_harness import (  # noqa: E402
    FIRST_REQUEST_QUEUE,
    RESP_SIZE,
    ControllerRig,
    ControllerSpec,
    Disk,
    EmulatorHarness,
    request_header,
)
from tests.support.vhost_frontend import UVA_BASE  # noqa: E402

KIB = 1024
MIB = 1 << 20
QUEUE = FIRST_REQUEST_QUEUE
BLOCK = 512
LBA_AT = 19 + 2  # READ(10)'s LBA inside the request header


@dataclass(frozen=True)
class Case:
    size: int
    depth: int
    requests: int
    emulator_rps: float
    host_rps: float
    ratio: float
    emulator_cpu_us_per_request: float
    emulator_user_us_per_request: float
    emulator_sys_us_per_request: float
    emulator_rss_mib: float


def make_image(path: Path, size: int) -> None:
    chunk = bytes(random.Random(1).randbytes(MIB))
    with open(path, "wb") as f:
        for i in range(size // MIB):
            f.write(chunk[i % 7 :] + chunk[: i % 7])
    with open(path, "rb") as f:  # warm the page cache
        while f.read(8 * MIB):
            pass


def offsets(image_size: int, size: int, count: int) -> list[int]:
    rng = random.Random(size)
    slots = image_size // size
    return [rng.randrange(slots) * size for _ in range(count)]


def host_rate(fd: int, size: int, where: list[int], seconds: float) -> float:
    buf = bytearray(size)
    bufs = [buf]
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for off in where:
            os.preadv(fd, bufs, off)
        done += len(where)
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start)


def emulator_rate(
    rig: ControllerRig, size: int, depth: int, where: list[int], seconds: float
) -> tuple[float, int]:
    """Requests per second and the number of requests served.

    The chains are built once with the test driver; each round only
    rewrites the LBAs, the avail entries and ``avail->idx`` straight into
    the guest RAM mapping, as a guest kernel would, so the bench's own
    Python costs little next to the emulator's.
    """
    driver = rig.drivers[QUEUE]
    blocks = size // BLOCK
    cdb = bytes([0x28, 0, 0, 0, 0, 0, 0, blocks >> 8, blocks & 0xFF, 0])
    # Built without publishing avail->idx: an emulator that polls its rings
    # would otherwise take them now, before the timed loop offers them.
    heads = [
        driver.add_chain([request_header(cdb)], [RESP_SIZE, size], publish=False)
        for _ in range(depth)
    ]
    driver.avail_idx = (driver.avail_idx - depth) & 0xFFFF  # built, not offered yet
    lba_gpas = [rig.buffers(QUEUE, h)[0][0] + LBA_AT for h in heads]
    ram = rig.frontend.memory  # the mmap: guest physical address == offset
    layout = driver.layout
    mask = driver.size - 1
    avail_ring = layout.avail_gpa + 4
    avail_idx_at = layout.avail_gpa + 2
    used_idx_at = layout.used_gpa + 2
    used_ring = layout.used_gpa + 4
    want = RESP_SIZE + size
    lbas = [off // BLOCK for off in where]
    n = len(lbas)
    pack_be32 = struct.Struct(">I").pack_into
    pack_u16 = struct.Struct("<H").pack_into
    unpack_u16 = struct.Struct("<H").unpack_from
    unpack_elem = struct.Struct("<II").unpack_from
    kick_fd = rig.frontend.kick_fds[QUEUE]
    frontend = rig.frontend
    idx = driver.avail_idx
    i = done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        first = idx
        for gpa, head in zip(lba_gpas, heads, strict=True):
            pack_be32(ram, gpa, lbas[i % n])
            i += 1
            pack_u16(ram, avail_ring + 2 * (idx & mask), head)
            idx = (idx + 1) & 0xFFFF
        pack_u16(ram, avail_idx_at, idx)
        os.eventfd_write(kick_fd, 1)
        while unpack_u16(ram, used_idx_at)[0] != idx:
            if not frontend.wait_call(QUEUE, 5.0):
                raise RuntimeError("the emulator stopped answering")
        for k in range(depth):
            _, used_len = unpack_elem(ram, used_ring + 8 * ((first + k) & mask))
            if used_len != want:
                raise RuntimeError(f"short completion: {used_len}")
        done += depth
        now = time.perf_counter()
        if now >= deadline:
            break
    driver.avail_idx = driver.last_used = idx
    for head in heads:
        driver.free_chain(head)
    return done / (now - start), done


def start_logging(rig: ControllerRig) -> int:
    """Play QEMU starting a migration: a dirty log covering guest RAM, LOG_ALL
    acked, the request ring's used ring logged. Returns the log's fd."""
    frontend = rig.frontend
    size = max(8, frontend.memory_size // 4096 // 8)
    fd = os.memfd_create("bench-dirty-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    frontend.send_raw(encode_request(Request.SET_LOG_BASE, LogDescription(size, 0), fds=(fd,)),
                      (fd,))
    frontend.read_reply(Request.SET_LOG_BASE)
    frontend.features |= 1 << Feature.LOG_ALL
    frontend.request(Request.SET_FEATURES, U64(frontend.features), need_reply=frontend.reply_ack)
    lay = rig.drivers[QUEUE].layout
    addr = VringAddr(QUEUE, 1, lay.desc_gpa + UVA_BASE, lay.used_gpa + UVA_BASE,
                     lay.avail_gpa + UVA_BASE, lay.used_gpa)
    frontend.request(Request.SET_VRING_ADDR, addr, need_reply=frontend.reply_ack)
    return fd


def run(args: argparse.Namespace) -> list[Case]:
    workdir = Path(tempfile.mkdtemp(prefix="emulator-rate-"))
    image = workdir / "disk.img"
    image_size = args.image_mib * MIB
    make_image(image, image_size)
    spec = ControllerSpec(
        "bench", (Disk(image, size=image_size),), queues=1, memory_size=16 * MIB
    )
    python = sys.executable
    if args.poll_us:
        # The harness starts the emulator with sys.executable: let that be
        # the same interpreter with the poll option (emulators.process).
        wrapper = workdir / "python-poll"
        wrapper.write_text(f'#!/bin/sh\nexec {python} -X mplaunch_poll_us={args.poll_us} "$@"\n')
        wrapper.chmod(0o755)
        sys.executable = str(wrapper)
    try:
        emu = EmulatorHarness.start(
            [spec],
            profile=args.profile,
            lockdown="off" if args.profile else args.lockdown,
        )
    finally:
        sys.executable = python
    fd = os.open(image, os.O_RDONLY)
    cases: list[Case] = []
    log_fd = -1
    try:
        if args.log:
            log_fd = start_logging(emu.rig)
        child = psutil.Process(emu.proc.pid)
        # A first round so the emulator's own start-up is not measured.
        emulator_rate(emu.rig, 4 * KIB, 1, offsets(image_size, 4 * KIB, 64), 0.2)
        for size in args.sizes:
            where = offsets(image_size, size * KIB, 4096)
            for depth in args.depths:
                host = host_rate(fd, size * KIB, where, args.seconds)
                user0, sys0 = child.cpu_times()[:2]
                rps, count = emulator_rate(emu.rig, size * KIB, depth, where, args.seconds)
                user1, sys1 = child.cpu_times()[:2]
                user, system = user1 - user0, sys1 - sys0
                cpu = user + system
                cases.append(
                    Case(
                        size=size * KIB,
                        depth=depth,
                        requests=count,
                        emulator_rps=round(rps),
                        host_rps=round(host),
                        ratio=round(rps / host, 3),
                        emulator_cpu_us_per_request=round(cpu / count * 1e6, 1),
                        emulator_user_us_per_request=round(user / count * 1e6, 1),
                        emulator_sys_us_per_request=round(system / count * 1e6, 1),
                        emulator_rss_mib=round(child.memory_info().rss / MIB, 1),
                    )
                )
    except BaseException:
        os.close(fd)
        status, err = emu.stop()
        print(f"emulator exited with {status}:\n{err}", file=sys.stderr)
        raise
    else:
        os.close(fd)
        status, err = emu.stop()
    finally:
        if log_fd >= 0:
            os.close(log_fd)
        image.unlink()
        for leftover in workdir.iterdir():
            leftover.unlink()
        workdir.rmdir()
    if status != 0 or "Traceback" in err:
        raise SystemExit(f"emulator exited with {status}:\n{err}")
    return cases


def table(cases: list[Case]) -> str:
    lines = [
        "| size | depth | emulator req/s | host preadv req/s | ratio | emulator CPU µs/req "
        "| user + sys | emulator RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        lines.append(
            f"| {c.size // KIB} KiB | {c.depth} | {c.emulator_rps:,.0f} | {c.host_rps:,.0f} "
            f"| {c.ratio:.2f} | {c.emulator_cpu_us_per_request:.1f} "
            f"| {c.emulator_user_us_per_request:.1f} + {c.emulator_sys_us_per_request:.1f} "
            f"| {c.emulator_rss_mib:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per case and side")
    parser.add_argument("--image-mib", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 64], help="KiB")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument(
        "--profile", type=Path, default=None,
        help="run the emulator under cProfile (seccomp off) and write its stats here",
    )
    parser.add_argument(
        "--poll-us", type=int, default=0,
        help="the emulator's adaptive poll window after a served round (0: off, the default)",
    )
    parser.add_argument(
        "--lockdown", choices=["on", "log", "off"], default="on",
        help="the emulator's seccomp mode (the launcher's default is on)",
    )
    parser.add_argument(
        "--log", action="store_true",
        help="with dirty logging on, as while a migration runs (LOG_ALL and a log)",
    )
    args = parser.parse_args()
    if any(d < 1 or d > 64 for d in args.depths):
        parser.error("depths must be 1..64 (ring size 128)")
    cases = run(args)
    print(table(cases))
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "emulator_rate.json"
    out.write_text(
        json.dumps(
            {
                "command": " ".join(["bench/emulator_rate.py", *sys.argv[1:]]),
                "seconds": args.seconds,
                "image_mib": args.image_mib,
                "poll_us": args.poll_us,
                "dirty_log": args.log,
                "load_1m": os.getloadavg()[0],
                "cases": [asdict(c) for c in cases],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
