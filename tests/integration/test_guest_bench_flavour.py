"""The bench flavour of the guest, built for real: fio and every library the
host's loader resolves for it are in the initramfs, byte for byte, at the
host's paths, and all of them are inputs of the manifest."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from launcher.guest import builder
from tests.unit.test_guest_builder import read_newc

REPO = Path(__file__).resolve().parents[2]
FIO = Path("/usr/bin/fio")


@pytest.mark.skipif(not FIO.is_file(), reason="/usr/bin/fio is missing (scripts/setup "
                    "installs Debian's fio)")
@pytest.mark.skipif(shutil.which("ldd") is None, reason="ldd is missing (libc-bin)")
def test_bench_flavour_ships_fio_with_its_library_closure() -> None:
    closure = builder.program_closure(builder.BENCH_PROGRAMS)
    names = set(closure)
    assert {"usr/bin/fio", "lib64/ld-linux-x86-64.so.2"} <= names
    # Debian's fio links these directly (BIND_NOW): without any of them it does not start.
    for soname in ("libaio.so.1", "librados.so.2", "libc.so.6", "libceph-common.so.2"):
        assert any(name.endswith("/" + soname) for name in names), soname

    image = builder.ensure_guest(REPO / "build" / "guest-bench",
                                 flavour=builder.FLAVOURS["bench"], progress=None)
    manifest = json.loads(image.manifest.read_text())
    recorded = manifest["inputs"]["programs"]
    assert set(recorded) == names, "the manifest records the closure ldd resolves now"
    members = {m[0]: m for m in read_newc(gzip.decompress(image.initrd.read_bytes()))}
    for name, path in closure.items():
        data = members[name][2]
        assert hashlib.sha256(data).hexdigest() == recorded[name] == builder._sha256_file(path)
        assert members[name][1] & 0o111, f"{name} is executable"
    assert members["init"][2] == builder.init_script()
    # The test guest stays small: none of this is in it.
    cloud = builder.FLAVOURS["cloud"]
    assert not cloud.programs and cloud.folder != builder.FLAVOURS["bench"].folder
