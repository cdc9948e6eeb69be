#!/bin/busybox sh
# Init of the mplaunch test guest (runs as PID 1 from the initramfs).
#
# It brings up just enough of a system to see SCSI disks, runs one workload
# chosen on the kernel command line, reports on the serial console, and
# powers off (or reboots). Every report line starts with "MPL " so tests can
# pick them out of the console stream; the formats are a stable interface:
#
#   MPL BOOT kernel=<uname -r>
#   MPL DISK name=sda size=<bytes> ro=<0|1> hctl=<H:C:T:L> vendor=<v> model=<m>
#   MPL VERIFY name=sda blocks=<n> ok=<n> bad=<n>
#   MPL RO name=sda write_refused=<0|1>
#   MPL IO name=sda round=<n> ok=<n> bad=<n>
#   MPL SHELL rc=<n>            then one "MPL OUT <line>" per output line
#   MPL FIO state=begin         then one "MPL JSON <line>" per line of fio's
#   MPL FIO state=end rc=<n> lines=<n>   JSON output, closed by the end line
#   MPL KLOG <kernel log line>  SCSI/virtio/sym53c8xx errors, aborts, resets, timeouts
#   MPL WARN <what>             something odd that did not stop the workload
#   MPL ERROR <what>            a failure of the guest itself (bad parameter, ...)
#   MPL DONE workload=<name> rc=<n>
#
# The disks, verify and io workloads all start with the DISK lines.
# Vendor and model have blanks squeezed and replaced with '_' so every field
# stays one key=value word.
#
# Kernel command line (all optional):
#   mpl.workload=boot|disks|verify|shell|io|fio   (default boot)
#   mpl.disks=N      wait (at most 20 s) until N SCSI disks are present
#   mpl.seed=N       seed of the block offsets (default 1)
#   mpl.count=N      random 4 KiB blocks per disk for verify/io (default 16)
#   mpl.cmd=B64      base64 of the shell command run by the shell workload
#   mpl.fio=B64      base64 of the fio job file run by the fio workload (the
#                    bench flavour of the guest has /usr/bin/fio); the jobs
#                    name their disk (filename=/dev/sda). fio's own messages
#                    come as "MPL OUT" lines before the JSON.
#   mpl.seconds=N    io: stop after N seconds (0 or absent: until stopped)
#   mpl.then=poweroff|reboot   what to do afterwards (default poweroff)
#
# "reboot" reboots after every boot: the initramfs cannot remember across a
# reset that it ran before, so whoever wants N boots counts the "MPL BOOT"
# lines and stops the VM itself. The io workload also stops when a line
# "mpl-stop" is typed on the console.

export PATH=/bin
umask 022
set -f   # never glob-expand words taken from the command line

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run

# Kernel messages printed on the console could split an MPL line in two;
# keep only emergencies there. The log is still reported through MPL KLOG.
dmesg -n 1

say() { echo "MPL $*"; }

# ---- command line ---------------------------------------------------------
WORKLOAD=boot
DISKS=
SEED=1
COUNT=16
CMD=
FIO=
SECS=0
THEN=poweroff
PARAM_ERRORS=0

# need_number NAME VALUE: report a parameter that is not a decimal number.
need_number() {
    case "$2" in
        '' | *[!0-9]*)
            say "ERROR param=$1 value=$2 expected=number"
            PARAM_ERRORS=1
            return 1
            ;;
    esac
    return 0
}

for arg in $(cat /proc/cmdline); do
    value=${arg#*=}
    case "$arg" in
        mpl.workload=*) WORKLOAD=$value ;;
        mpl.disks=*) need_number mpl.disks "$value" && DISKS=$value ;;
        mpl.seed=*) need_number mpl.seed "$value" && SEED=$value ;;
        mpl.count=*) need_number mpl.count "$value" && COUNT=$value ;;
        mpl.seconds=*) need_number mpl.seconds "$value" && SECS=$value ;;
        mpl.cmd=*) CMD=$value ;;
        mpl.fio=*) FIO=$value ;;
        mpl.then=*) THEN=$value ;;
    esac
done
set +f   # globbing is needed from here on (/sys/block/sd*)
case "$THEN" in
    poweroff | reboot) ;;
    *) say "ERROR param=mpl.then value=$THEN expected=poweroff|reboot"; THEN=poweroff; PARAM_ERRORS=1 ;;
esac

say "BOOT kernel=$(uname -r)"

# ---- modules --------------------------------------------------------------
# /lib/mpl/modules.order lists "name [parameters]" in dependency order,
# computed by the image builder from each module's own metadata.
while read -r mod params; do
    [ -n "$mod" ] || continue
    # $params is split on purpose: one word per module parameter.
    # shellcheck disable=SC2086
    if ! insmod "/lib/mpl/$mod.ko" $params 2>/tmp/insmod.err; then
        say "ERROR insmod=$mod reason=$(tr '\n' ' ' </tmp/insmod.err)"
    fi
done </lib/mpl/modules.order

# ---- wait for the disks to settle ----------------------------------------
count_disks() {
    n=0
    for d in /sys/block/sd*; do
        [ -e "$d" ] && n=$((n + 1))
    done
    echo "$n"
}

# Poll every 0.1 s for at most 20 s. With mpl.disks=N, done once N disks are
# there; without it, done once the count has not changed for 1 s, or at once
# when there is no SCSI host adapter at all.
ticks=0
if [ -z "$DISKS" ] && ! ls /sys/class/scsi_host/ 2>/dev/null | grep -q .; then
    ticks=200
fi
stable=0
last=-1
while [ "$ticks" -lt 200 ]; do
    now=$(count_disks)
    if [ -n "$DISKS" ]; then
        [ "$now" -ge "$DISKS" ] && break
    else
        if [ "$now" -eq "$last" ]; then
            stable=$((stable + 1))
            [ "$stable" -ge 10 ] && break
        else
            stable=0
        fi
    fi
    last=$now
    sleep 0.1
    ticks=$((ticks + 1))
done
if [ -n "$DISKS" ] && [ "$(count_disks)" -lt "$DISKS" ]; then
    say "WARN disks_expected=$DISKS disks_found=$(count_disks)"
fi

# ---- disk helpers ---------------------------------------------------------
# disk_list: "hctl name" per SCSI disk, sorted by H:C:T:L numerically.
disk_list() {
    for d in /sys/block/sd*; do
        [ -e "$d/device" ] || continue
        echo "$(basename "$(readlink "$d/device")") ${d##*/}"
    done | sort -t: -k1,1n -k2,2n -k3,3n -k4,4n
}

# word FILE: the file's text with blanks squeezed, trimmed, spaces as '_'.
word() {
    # Unquoted expansion on purpose: it squeezes and trims whitespace.
    # shellcheck disable=SC2046
    echo $(cat "$1" 2>/dev/null) | tr ' ' _
}

is_ro() { [ "$(cat "/sys/block/$1/ro")" = 1 ]; }

# Deterministic pseudo-random numbers: an LCG modulo 2^31 that never
# overflows the shell's 64-bit arithmetic. rand_init KEY seeds R from
# mpl.seed and KEY (the disk name, and the round for io).
rand_init() {
    h=$(echo "$SEED:$1" | md5sum | cut -c1-7)
    R=$((0x$h))
}
rand_next() { R=$(((R * 1103515245 + 12345) % 2147483648)); }

# check_disk NAME KEY: write mpl.count random 4 KiB blocks at distinct
# random 4 KiB-aligned offsets with O_DIRECT, read them back with O_DIRECT
# and compare checksums. Sets BLOCKS (blocks written), OK, BAD, and want
# (mpl.count, or fewer on a disk that small). Never stops on an error.
check_disk() {
    dev=/dev/$1
    total=$(($(cat "/sys/block/$1/size") / 8))
    want=$COUNT
    [ "$want" -gt "$total" ] && want=$total
    rand_init "$2"
    : >/tmp/map
    BLOCKS=0
    BAD=0
    OK=0
    tries=0
    [ "$total" -gt 0 ] || return 0 # smaller than one block: nothing to test
    while [ "$BLOCKS" -lt "$want" ] && [ "$tries" -lt $((want * 4)) ]; do
        tries=$((tries + 1))
        rand_next
        off=$((R % total))
        grep -q "^$off " /tmp/map && continue # distinct offsets only
        BLOCKS=$((BLOCKS + 1))
        dd if=/dev/urandom of=/tmp/blk bs=4096 count=1 2>/dev/null
        sum=$(md5sum </tmp/blk)
        if dd if=/tmp/blk of="$dev" bs=4096 seek="$off" count=1 \
            oflag=direct conv=notrunc 2>/dev/null; then
            echo "$off ${sum%% *}" >>/tmp/map
        else
            BAD=$((BAD + 1))
        fi
    done
    while read -r off sum; do
        got=$(dd if="$dev" bs=4096 skip="$off" count=1 iflag=direct 2>/dev/null | md5sum)
        if [ "${got%% *}" = "$sum" ]; then
            OK=$((OK + 1))
        else
            BAD=$((BAD + 1))
        fi
    done </tmp/map
}

# check_ro NAME: a read-only disk must refuse a write. The block written is
# the one just read, so a disk that wrongly accepts it is left unchanged.
check_ro() {
    dev=/dev/$1
    refused=1
    if dd if="$dev" of=/tmp/blk bs=4096 count=1 iflag=direct 2>/dev/null &&
        dd if=/tmp/blk of="$dev" bs=4096 count=1 oflag=direct conv=notrunc 2>/dev/null; then
        refused=0
    fi
    say "RO name=$1 write_refused=$refused"
    [ "$refused" = 1 ]
}

# ---- workloads ------------------------------------------------------------
workload_disks() {
    disk_list | while read -r hctl name; do
        size=$(($(cat "/sys/block/$name/size") * 512))
        say "DISK name=$name size=$size ro=$(cat "/sys/block/$name/ro")" \
            "hctl=$hctl vendor=$(word "/sys/block/$name/device/vendor")" \
            "model=$(word "/sys/block/$name/device/model")"
    done
    return 0
}

workload_verify() {
    workload_disks
    rc=0
    for name in $(disk_list | cut -d' ' -f2); do
        if is_ro "$name"; then
            check_ro "$name" || rc=1
        else
            check_disk "$name" "$name"
            say "VERIFY name=$name blocks=$BLOCKS ok=$OK bad=$BAD"
            [ "$BAD" -eq 0 ] && [ "$BLOCKS" -eq "$want" ] || rc=1
        fi
    done
    return $rc
}

uptime_s() {
    read -r up _ </proc/uptime
    echo "${up%%.*}"
}

workload_io() {
    workload_disks
    rc=0
    rm -f /run/mpl-stop
    # A console line "mpl-stop" ends the loop after the current round.
    (while read -r line; do
        case "$line" in *mpl-stop*) : >/run/mpl-stop ;; esac
    done </dev/console) &
    reader=$!
    start=$(uptime_s)
    round=0
    while :; do
        round=$((round + 1))
        for name in $(disk_list | cut -d' ' -f2); do
            is_ro "$name" && continue
            check_disk "$name" "$round:$name"
            say "IO name=$name round=$round ok=$OK bad=$BAD"
            [ "$BAD" -eq 0 ] || rc=1
        done
        [ -e /run/mpl-stop ] && break
        [ "$SECS" -gt 0 ] && [ $(($(uptime_s) - start)) -ge "$SECS" ] && break
        # With no writable disk, do not spin.
        [ -n "$(disk_list)" ] || sleep 1
    done
    kill "$reader" 2>/dev/null
    return $rc
}

workload_shell() {
    if [ -z "$CMD" ]; then
        say "ERROR param=mpl.cmd value= expected=base64"
        return 2
    fi
    if ! echo "$CMD" | base64 -d >/tmp/cmd.sh 2>/dev/null; then
        say "ERROR param=mpl.cmd value=$CMD expected=base64"
        return 2
    fi
    sh /tmp/cmd.sh >/tmp/cmd.out 2>&1 </dev/null
    shell_rc=$?
    say "SHELL rc=$shell_rc"
    while IFS= read -r line || [ -n "$line" ]; do
        say "OUT $line"
    done </tmp/cmd.out
    return $shell_rc
}

# fio runs the job file from mpl.fio with JSON output; sed prefixes every
# line in one process (a shell loop over thousands of lines is slow under
# TCG).
workload_fio() {
    workload_disks
    if [ ! -x /usr/bin/fio ]; then
        say "ERROR fio=missing expected=bench_flavour"
        return 2
    fi
    if [ -z "$FIO" ] || ! echo "$FIO" | base64 -d >/tmp/job.fio 2>/dev/null; then
        say "ERROR param=mpl.fio value=$FIO expected=base64"
        return 2
    fi
    /usr/bin/fio --output-format=json --output=/tmp/fio.json /tmp/job.fio \
        >/tmp/fio.out 2>&1 </dev/null
    fio_rc=$?
    sed 's/^/MPL OUT /' /tmp/fio.out
    say "FIO state=begin"
    [ -e /tmp/fio.json ] && sed 's/^/MPL JSON /' /tmp/fio.json
    say "FIO state=end rc=$fio_rc lines=$(cat /tmp/fio.json 2>/dev/null | wc -l)"
    return $fio_rc
}

if [ "$PARAM_ERRORS" != 0 ]; then
    rc=2
else
    case "$WORKLOAD" in
        boot) rc=0 ;;
        disks) workload_disks; rc=$? ;;
        verify) workload_verify; rc=$? ;;
        io) workload_io; rc=$? ;;
        shell) workload_shell; rc=$? ;;
        fio) workload_fio; rc=$? ;;
        *) say "ERROR param=mpl.workload value=$WORKLOAD expected=boot|disks|verify|shell|io|fio"; rc=2 ;;
    esac
fi

# ---- kernel log -----------------------------------------------------------
dmesg | grep -iE 'abort|reset|timeout|timed out|error' |
    grep -iE 'sd[a-z]|scsi|virtio|sym[0-9]|sd [0-9]' |
    while IFS= read -r line; do say "KLOG $line"; done

say "DONE workload=$WORKLOAD rc=$rc"

# ---- power ----------------------------------------------------------------
# Flush the page cache, then ask the kernel directly (-f: there is no init
# system to stop). Power off goes through ACPI, so QEMU exits; a reboot
# resets the machine and boots the same kernel and command line again.
sync
if [ "$THEN" = reboot ]; then
    reboot -f
else
    poweroff -f
fi
say "ERROR $THEN failed"
# PID 1 must never exit: the kernel would panic.
while :; do sleep 3600; done
