"""The sandbox's data and pure parts: the profiles, the status judge, the
preflight, and the SELinux module compiling."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from launcher.sandbox import check, profiles
from launcher.sandbox.seccomp import build_allow_list, build_deny_list, pyseccomp
from launcher.spec import SandboxMode

REPO = Path(__file__).resolve().parents[2]

CONFINED = check.parse_status("""Name:\tpython3
State:\tS (sleeping)
Uid:\t64000\t64000\t64000\t64000
Gid:\t64000\t64000\t64000\t64000
Groups:\t
CapInh:\t0000000000000000
CapPrm:\t0000000000000000
CapEff:\t0000000000000000
CapBnd:\t0000000000000000
CapAmb:\t0000000000000000
NoNewPrivs:\t1
Seccomp:\t2
Seccomp_filters:\t2
""")
EXPECTED = check.Expected(64000, 64000)


def test_the_allow_list_stays_small_and_every_rule_says_why() -> None:
    allowed = profiles.allowed_syscalls()
    assert len(allowed) <= profiles.STAGE2_MAX
    for rule in profiles.STAGE2_ALLOW + profiles.STAGE1_DENY:
        assert rule.reason and "\n" not in rule.reason


@pytest.mark.parametrize("name", ["socket", "connect", "execve", "execveat", "fork", "vfork",
                                  "clone", "clone3", "ptrace", "kill", "tkill", "tgkill",
                                  "setuid", "mount", "process_vm_readv", "bpf", "openat2",
                                  "io_uring_setup", "memfd_create", "socketpair"])
def test_the_allow_list_omits(name: str) -> None:
    assert name not in profiles.allowed_syscalls()


def test_every_syscall_name_is_known_to_libseccomp() -> None:
    arch = pyseccomp.system_arch()
    for rule in profiles.STAGE2_ALLOW + profiles.STAGE1_DENY:
        assert pyseccomp.resolve_syscall(arch, rule.syscall) >= 0, rule.syscall


def test_both_stages_compile() -> None:
    build_deny_list(profiles.stage1_deny(0x1000))
    build_allow_list(profiles.STAGE2_ALLOW, log_only=False)
    build_allow_list(profiles.STAGE2_ALLOW, log_only=True)


def test_a_confined_status_passes() -> None:
    assert check.judge(CONFINED, EXPECTED) == []
    assert check.lockdown_done(CONFINED, EXPECTED)


@pytest.mark.parametrize(("field", "value", "complaint"), [
    ("Seccomp", "0", "Seccomp is '0'"),
    ("Seccomp_filters", "1", "Seccomp_filters is '1'"),
    ("NoNewPrivs", "0", "NoNewPrivs"),
    ("CapEff", "0000000000000400", "CapEff"),
    ("CapBnd", "000001ffffffffff", "CapBnd"),
    ("CapAmb", "junk", "CapAmb"),
    ("Uid", "64000\t0\t64000\t64000", "Uid"),
    ("Gid", "64001\t64001\t64001\t64001", "Gid"),
    ("Groups", "0", "supplementary groups"),
])
def test_each_shortfall_is_named(field: str, value: str, complaint: str) -> None:
    status = {**CONFINED, field: value}
    problems = check.judge(status, EXPECTED)
    assert len(problems) >= 1 and complaint in " ".join(problems)


def test_a_missing_field_is_a_problem_not_a_pass() -> None:
    status = {k: v for k, v in CONFINED.items() if k != "CapBnd"}
    assert check.judge(status, EXPECTED) == ["CapBnd is None, not 0"]


def test_the_launcher_itself_shares_its_own_namespaces() -> None:
    import os
    assert len(check.namespace_problems(os.getpid())) == len(check.NAMESPACES)


def test_preflight_fails_closed_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check.os, "geteuid", lambda: 1000)
    with pytest.raises(check.SandboxUnavailable, match='not running as root.*sandbox = "off"'):
        check.preflight(SandboxMode.ON)
    check.preflight(SandboxMode.OFF)  # explicitly off: runs, with a warning


def test_the_selinux_module_compiles_and_packages(tmp_path: Path) -> None:
    missing = [t for t in ("checkmodule", "semodule_package") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{missing} not installed (scripts/setup installs checkpolicy and "
                    "semodule-utils)")
    src = REPO / "policies" / "selinux"
    subprocess.run(["checkmodule", "-M", "-m", "-o", str(tmp_path / "mplaunch.mod"),
                    str(src / "mplaunch.te")], check=True, capture_output=True)
    subprocess.run(["semodule_package", "-o", str(tmp_path / "mplaunch.pp"), "-m",
                    str(tmp_path / "mplaunch.mod"), "-f", str(src / "mplaunch.fc")],
                   check=True, capture_output=True)
    assert (tmp_path / "mplaunch.pp").stat().st_size > 0
    te = (src / "mplaunch.te").read_text()
    emulator_rules = [line for line in te.splitlines()
                      if line.startswith("allow mplaunch_emulator_t")]
    assert emulator_rules and not any(" open" in r or "create" in r for r in emulator_rules)
