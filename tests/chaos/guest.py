"""The chaos guest's workload, and how its report is read back.

Theory of operation. The guest runs the shell workload of the test guest
(launcher/guest/init.sh) with the script below, which does what the `io`
workload does (random 4 KiB O_DIRECT writes, then O_DIRECT reads compared by
checksum, every writable disk, round after round, an `MPL IO` line per disk
and round) and more: two things so that the host can check the image files
after power-off against what the guest last wrote, and one on request:

* every successful write appends `disk offset md5` to a ledger in the
  guest's RAM, and at the end of the boot the script prints the ledger's
  last entry per block as `MPL LEDGER size=<disk bytes> off=<4 KiB block>
  md5=<md5>` (disks are told apart by their sizes, which the test makes
  distinct). The host replays the ledgers of all boots in order, so the
  last write to each block wins, and compares each block of each image;
* block 0 of the smallest disk holds a boot counter (`MPLBOOT n`), written
  like any other block and in the ledger too. Boot n > BOOTS writes
  nothing: init.sh reboots forever with mpl.then=reboot, and the host stops
  the VM some time after the last counted boot, so whatever boot is running
  then must not change the disks behind the ledger's back. Block 0 of every
  disk is left out of the random offsets for that reason;
* with `watch_disks`, a background loop prints `MPL SCSI h:c:t:l=<bytes>
  ...` whenever the guest's set of SCSI disks or a size changes, so that a
  host that adds, resizes and removes disks under the guest can wait for
  the guest to have settled one change before it makes the next.

The script writes its lines straight to /dev/console so they show while it
runs (init.sh collects a shell workload's stdout only at the end). The
kernel log check (`MPL KLOG`) and `MPL DONE` still come from init.sh.

The script is too long for the kernel command line (2 KiB on x86, and a
longer one stops the boot silently), so it travels on a small read-only
disk of its own (`script_image`), and `mpl.cmd` only holds the few words
that find that disk by its size and run what it holds.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

BLOCK = 4096

_SCRIPT = r"""
SECS_LIST="@SECS@"; COUNT=@COUNT@; BOOTS=@BOOTS@; CSIZE=@CSIZE@; RANDOM=@SEED@
con=/dev/console
say() { echo "MPL $*" >$con; }
sdisk=$(for d in /sys/block/sd*; do [ "$(cat $d/size)" = @SSECTORS@ ] && echo ${d##*/}; done)
# stopped NUMBER: the host wrote "MPLSTOP NUMBER" into the script disk's last block.
stopped() {
    [ -n "$sdisk" ] && dd if=/dev/$sdisk bs=4096 skip=@STOPBLOCK@ count=1 iflag=direct \
        2>/dev/null | head -c 32 | tr -d '\000' | grep -q "^MPLSTOP $1\$"
}
disks=$(for d in /sys/block/sd*; do [ "$(cat $d/ro)" = 0 ] && echo ${d##*/}; done)
cdisk=
for n in $disks; do
    size=$(($(cat /sys/block/$n/size) * 512))
    say "DISK name=$n size=$size ro=0"
    [ "$size" = "$CSIZE" ] && cdisk=$n
done
[ -n "$cdisk" ] || { say "ERROR no disk of $CSIZE bytes"; exit 2; }
boot=$(dd if=/dev/$cdisk bs=4096 count=1 iflag=direct 2>/dev/null | head -c 32 |
       tr -d '\000' | sed -n 's/^MPLBOOT \([0-9]*\).*/\1/p')
boot=$((${boot:-0} + 1))
if [ "$boot" -gt "$BOOTS" ]; then say "IDLE boot=$boot"; exit 0; fi
# This boot's I/O seconds (the last value holds for later boots); 0: until
# the host's stop token for this boot, at most @MAXSECS@ s.
i=1; SECS=
for s in $SECS_LIST; do [ -z "$SECS" ] || [ $i -le $boot ] && SECS=$s; i=$((i + 1)); done
RANDOM=$((@SEED@ + boot))
: >/tmp/ledger
# put NAME OFF FILE: one O_DIRECT 4 KiB write; ledger on success.
put() {
    sum=$(md5sum <"$3"); sum=${sum%% *}
    dd if="$3" of=/dev/$1 bs=4096 seek=$2 count=1 oflag=direct conv=notrunc 2>/dev/null ||
        return 1
    echo "$1 $2 $sum" >>/tmp/ledger
    echo "$2 $sum" >>/tmp/map
}
: >/tmp/map
printf 'MPLBOOT %d\n' $boot | dd of=/tmp/blk bs=4096 count=1 conv=sync 2>/dev/null
put $cdisk 0 /tmp/blk || { say "ERROR boot counter not written"; exit 1; }
say "COUNTED boot=$boot"
if [ @WATCH@ = 1 ]; then
    # "MPL SCSI h:c:t:l=bytes ..." whenever the guest's set of SCSI disks or a
    # size changes: the host waits for the guest to settle a disk change.
    (
        last=x
        while :; do
            now=
            for d in /sys/class/scsi_disk/*; do
                for b in "$d"/device/block/*; do
                    read -r s 2>/dev/null <"$b/size" && now="$now ${d##*/}=$((s * 512))"
                done
            done
            [ "$now" = "$last" ] || { say "SCSI$now"; last=$now; }
            usleep 200000
        done
    ) >/dev/null 2>&1 &
    watcher=$!
    trap 'kill $watcher 2>/dev/null' EXIT
fi
rc=0
start=$(cut -d. -f1 /proc/uptime)
round=0
while :; do
    round=$((round + 1))
    for n in $disks; do
        total=$(($(cat /sys/block/$n/size) / 8))
        : >/tmp/map
        OK=0; BAD=0; i=0
        while [ $i -lt $COUNT ]; do
            i=$((i + 1))
            off=$((1 + (RANDOM * 32768 + RANDOM) % (total - 1)))
            grep -q "^$off " /tmp/map && continue
            dd if=/dev/urandom of=/tmp/blk bs=4096 count=1 2>/dev/null
            put $n $off /tmp/blk || BAD=$((BAD + 1))
        done
        while read -r off sum; do
            got=$(dd if=/dev/$n bs=4096 skip=$off count=1 iflag=direct 2>/dev/null | md5sum)
            if [ "${got%% *}" = "$sum" ]; then OK=$((OK + 1)); else BAD=$((BAD + 1)); fi
        done </tmp/map
        say "IO name=$n round=$round ok=$OK bad=$BAD"
        [ $BAD = 0 ] || rc=1
    done
    took=$(($(cut -d. -f1 /proc/uptime) - start))
    if [ "$SECS" = 0 ]; then
        stopped $boot && break
        [ $took -ge @MAXSECS@ ] && { say "WARN no stop token after $took s"; break; }
    else
        [ $took -ge $SECS ] && break
    fi
done
for n in $disks; do
    size=$(($(cat /sys/block/$n/size) * 512))
    awk -v n=$n '$1 == n { last[$2] = $3 } END { for (o in last) print o, last[o] }' /tmp/ledger |
        while read -r off sum; do echo "MPL LEDGER size=$size off=$off md5=$sum"; done >$con
done
say "ROUNDS boot=$boot rounds=$round"
exit $rc
"""


SCRIPT_DISK_SIZE = 1024 * 1024
#: The script disk's last block carries the host's stop token (`stop_boot`).
STOP_BLOCK = SCRIPT_DISK_SIZE // BLOCK - 1
#: A boot told to run until the stop token gives up waiting after this long.
MAX_SECONDS = 900


def loader() -> str:
    """The `mpl.cmd` command: run the script held by the script disk."""
    sectors = SCRIPT_DISK_SIZE // 512
    return (f"for d in /sys/block/sd*; do [ $(cat $d/size) = {sectors} ] && "
            "dd if=/dev/${d##*/} bs=65536 count=1 2>/dev/null | tr -d '\\000' >/tmp/c.sh; "
            "done; exec sh /tmp/c.sh")


def script_image(path: Path, text: str) -> None:
    """Write the script disk: the script, then zeros (dropped by the loader)."""
    data = text.encode()
    if len(data) > 65536:
        raise ValueError("the chaos script must fit in the loader's 64 KiB")
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(SCRIPT_DISK_SIZE)


def stop_boot(path: Path, boot: int) -> None:
    """Tell the guest to end boot `boot`'s I/O (one that runs with 0 seconds)
    after its current round: a token in the script disk's last block, which
    the guest reads with O_DIRECT every round."""
    with open(path, "r+b") as f:
        f.seek(STOP_BLOCK * BLOCK)
        f.write(f"MPLSTOP {boot}\n".encode().ljust(BLOCK, b"\0"))
        f.flush()
        os.fsync(f.fileno())


def script(seconds: int | Sequence[int], count: int, boots: int, counter_disk_size: int,
           seed: int, watch_disks: bool = False) -> str:
    """The shell command for `mpl.workload=shell` (see the module docstring).
    `seconds` is the I/O time of each boot, or a list of them, boot by boot
    (the last value holds for later boots); 0 means until `stop_boot`.
    `watch_disks` adds the `MPL SCSI` lines (:func:`guest_disks`) during
    counted boots, for a host that changes disks under the guest."""
    secs = [seconds] if isinstance(seconds, int) else list(seconds)
    values = {"@SECS@": " ".join(str(x) for x in secs), "@COUNT@": count, "@BOOTS@": boots,
              "@CSIZE@": counter_disk_size, "@SEED@": seed % 30000,
              "@SSECTORS@": SCRIPT_DISK_SIZE // 512, "@STOPBLOCK@": STOP_BLOCK,
              "@MAXSECS@": MAX_SECONDS, "@WATCH@": int(watch_disks)}
    text = _SCRIPT
    for key, value in values.items():
        text = text.replace(key, str(value))
    return text.strip() + "\n"


@dataclass(frozen=True)
class Mismatch:
    disk_size: int
    block: int
    want: str
    got: str


_SCSI = re.compile(r"^MPL SCSI((?: \d+:\d+:\d+:\d+=\d+)*)\n", re.M)


def guest_disks(console_text: str) -> dict[str, int] | None:
    """The guest's disks as its last complete `MPL SCSI` line gives them
    ("h:c:t:l" -> bytes), or None before the first such line."""
    found = _SCSI.findall(console_text)
    if not found:
        return None
    return {name: int(size) for name, size in
            (item.split("=") for item in found[-1].split())}


_LEDGER = re.compile(r"^MPL LEDGER size=(\d+) off=(\d+) md5=([0-9a-f]{32})$", re.M)


def ledger(console_text: str) -> dict[tuple[int, int], str]:
    """(disk size, block) -> md5 of the last write, over every boot in order."""
    last: dict[tuple[int, int], str] = {}
    for m in _LEDGER.finditer(console_text):
        last[(int(m.group(1)), int(m.group(2)))] = m.group(3)
    return last


def compare_images(entries: dict[tuple[int, int], str],
                   images: Iterable[tuple[int, Path]]) -> list[Mismatch]:
    """Blocks of the images whose md5 is not the ledger's."""
    by_size = dict(images)
    bad = []
    for (size, block), want in sorted(entries.items()):
        path = by_size.get(size)
        if path is None:
            bad.append(Mismatch(size, block, want, "no image of that size"))
            continue
        with open(path, "rb") as f:
            f.seek(block * BLOCK)
            got = hashlib.md5(f.read(BLOCK)).hexdigest()
        if got != want:
            bad.append(Mismatch(size, block, want, got))
    return bad
