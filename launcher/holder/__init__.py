"""The per-VM holder: the process that outlives the launcher.

Why it exists: the launcher is a large process that may crash or be upgraded
under a running VM. The holder is small, does no policy and parses no guest or
QEMU data, so it is the one process whose life bounds the VM's.

Processes. The launcher starts the holder in a session of its own and with no
parent-death signal, so the launcher's death leaves it running. The holder
spawns every long-lived child of the VM (QEMU, emulators, spares) when the
launcher asks, so it is their parent, and it is a child subreaper
(PR_SET_CHILD_SUBREAPER): whatever a child leaves behind comes to it and is
reaped. Each child gets PR_SET_PDEATHSIG SIGKILL toward the holder, set
between fork and exec and checked against a holder that died in between
(getppid); the jail sets SIGKILL again after it changes uid (a uid change
clears the signal), and the jail execs in place, so the holder stays the
parent. If the holder dies, its children die. The holder exits, killing all
its children, when an attached launcher says SHUTDOWN, on SIGTERM, after
``IDLE_EXIT_S`` with no launcher and no child, or when its launcher goes
while it holds an entry of kind ``tether`` (launcher.holdnames.TETHER: the
destination of an incoming migration, whose guest never ran).

Fds. The launcher PUTs named fds in the holder and can DROP them. On attach
(HELLO) it gets an inventory (names, kinds, fd counts), the fds themselves
(SCM_RIGHTS, one message per name), the live children and the exits recorded
while no launcher was attached. SPAWN places held or passed fds at given
child fd numbers (everything else is closed; 0-2 are /dev/null unless
placed) and answers with the pid and a pidfd, so the launcher can wait on
and signal the child without pid reuse races. SIGNAL reaches the holder's
own live children only. EXIT events (pid, tag, wait status, time) go to the
attached launcher as they happen.

Socket. AF_UNIX SOCK_SEQPACKET: message boundaries and fds per message, with
no framing to get wrong. Mode 0600; every connection's SO_PEERCRED must be
uid 0. One launcher is attached at a time; another one is refused with a
message while the first is connected. The protocol
(:mod:`launcher.holder.protocol`) is versioned and sans-I/O; the loop
(:mod:`launcher.holder.main`) uses a selector and a SIGCHLD wakeup pipe, no
asyncio; the launcher's side is :mod:`launcher.holder.client` (asyncio).
"""
