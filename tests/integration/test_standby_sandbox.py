"""A warm spare's sandbox: it may make the one thread a hot standby waits
in (launcher.statestore.liveness), and still no process.

The payload (test_sandbox_payload.py) runs as a real confined emulator
started through the jail with a spare's RLIMIT_NPROC and locked down with a
spare's stage 2 (``profiles.STANDBY_THREAD``), beside an ordinary emulator
of the same VM, as in test_sandbox_hostile.py.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sys
from pathlib import Path

import pytest

from launcher import emulators
from launcher.sandbox import jail, profiles
from launcher.sandbox.seccomp import build_allow_list, pyseccomp
from tests.integration.test_sandbox_hostile import KILLED, PAYLOAD, write_spec

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

if os.geteuid() != 0:
    pytestmark.append(pytest.mark.skip(reason="the sandbox needs root (run the tests as root)"))


def as_spare(tmp_path: Path, action: str, mode: str = "spare",
             nproc: int = jail.SPARE_NPROC) -> int:
    """Run the payload as the VM's second emulator, jailed as a spare is;
    return its wait status."""
    async def go() -> int:
        spec = write_spec(tmp_path)
        victim_res = emulators.prepare(spec, spec.emulators[0])
        victim = await emulators.start(victim_res)
        victim_res.close_emulator_side()
        res = emulators.prepare(spec, spec.emulators[1])
        res.nproc = nproc
        try:
            command = [sys.executable, "-I", str(PAYLOAD), res.config.to_json(), mode, action]
            proc = await emulators.start(res, command=command)
            res.close_emulator_side()
            res.qemu_ends["c1"].send(b"!")
            status = await asyncio.wait_for(proc.exited, 20)
            assert not victim.exited.done(), "the victim must survive"
            return status
        finally:
            await victim.stop()
            victim_res.close()
            res.close()
    return asyncio.run(go())


@pytest.mark.parametrize(("action", "expected"), [
    ("thread", 0),                       # the standby's waiting thread
    ("two_threads", 100 + errno.EAGAIN),  # and no second one: RLIMIT_NPROC
    ("fork", KILLED),                    # clone without CLONE_THREAD
    ("clone", KILLED),
    ("clone_thread_newnet", KILLED),     # a thread in a new namespace
    ("clone3", 100 + errno.ENOSYS),      # glibc falls back to clone
    ("execve", KILLED),
])
def test_a_spare_may_make_one_thread_and_no_process(tmp_path: Path, action: str,
                                                    expected: int) -> None:
    assert as_spare(tmp_path, action) == expected


def test_an_emulator_started_with_its_config_makes_no_thread(tmp_path: Path) -> None:
    """Only a spare's filter lets the thread through."""
    assert as_spare(tmp_path, "thread", mode="on") == KILLED


def test_a_spare_with_the_old_rlimit_cannot_make_the_thread(tmp_path: Path) -> None:
    """RLIMIT_NPROC 0, as every other emulator has it: the thread is refused
    (cleanly: the standby then waits on its pidfd alone)."""
    assert as_spare(tmp_path, "thread", nproc=0) == 100 + errno.EAGAIN


def test_the_spares_rules_compile_and_stay_few() -> None:
    build_allow_list(profiles.STAGE2_ALLOW + profiles.STANDBY_THREAD, log_only=False)
    arch = pyseccomp.system_arch()
    for rule in profiles.STANDBY_THREAD:
        assert rule.reason and pyseccomp.resolve_syscall(arch, rule.syscall) >= 0
    assert set(profiles.allowed_syscalls(profiles.STANDBY_THREAD)) == {
        "clone", "set_robust_list", "rseq", "gettid"}
