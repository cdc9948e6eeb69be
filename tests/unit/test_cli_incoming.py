"""What `mplaunch --incoming` refuses before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher import cli

SPEC = """\
[vm]
name = "mig-cli"
accel = "tcg"
console = "none"
run_dir = "run"

[[emulator]]
id = "{emulator}"
kind = "{kind}"

[[controller]]
id = "c0"
emulator = "{emulator}"

[[disk]]
id = "d0"
controller = "c0"
lun = 0
image = "d0.img"
"""


def write(tmp_path: Path, kind: str = "scsi", emulator: str = "disk-proc") -> str:
    (tmp_path / "d0.img").write_bytes(bytes(1 << 20))
    path = tmp_path / "vm.toml"
    path.write_text(SPEC.format(kind=kind, emulator=emulator))
    return str(path)


@pytest.mark.parametrize("uri,said", [
    ("ftp:host", "--incoming: migration URI 'ftp:host': scheme 'ftp' is not supported"),
    ("tcp:host", "expected tcp:HOST:PORT"),
    ("unix:", "unix: needs a socket path"),
])
def test_a_bad_uri_is_a_usage_error(tmp_path: Path, uri: str, said: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--incoming", uri, write(tmp_path)])
    assert exit_.value.code == cli.EXIT_USAGE
    assert said in capsys.readouterr().err


def test_backends_only_cannot_take_a_migration(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--incoming", "unix:/tmp/x.sock", "--backends-only", write(tmp_path)])
    assert "--incoming cannot go with --backends-only: QEMU is then someone else's" in \
        capsys.readouterr().err


def test_an_lsi_emulator_is_refused_by_name(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    spec = write(tmp_path, kind="lsi", emulator="old-hba")
    assert cli.main(["--check", "--incoming", "tcp:0.0.0.0:4444", spec]) == 1
    assert "--incoming: emulator 'old-hba' is of kind lsi, which cannot migrate" in \
        capsys.readouterr().err


def test_check_accepts_a_good_uri(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--check", "--incoming", "tcp:[::1]:4444", write(tmp_path)]) == 0
    assert "ok" in capsys.readouterr().err
