"""The bench guest through mplaunch: fio runs in the guest against the
emulator's disk and its JSON result comes back through the console, as
bench/fio_matrix.py reads it."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import fio_matrix as fm

FIO = Path("/usr/bin/fio")


@pytest.mark.timeout(120)
def test_fio_in_the_bench_guest_through_the_emulator(guest: None, tmp_path: Path) -> None:
    if not FIO.is_file():
        pytest.skip("/usr/bin/fio is missing (scripts/setup installs Debian's fio)")
    cases = (fm.Case("randread", 4096, 4), fm.Case("write", 65536, 1))
    job = fm.job_file(cases, runtime=2, ramp=0, engine="io_uring")
    setup = fm.prepare(tmp_path, 16, "256M", job)
    before = setup.image.read_bytes()[:65536]

    boot, samples = fm.boot_once(setup, fm.EMULATOR, 1, cases)

    assert [s.case for s in samples] == ["4k randread QD4", "64k write QD1"]
    for case, sample in zip(cases, samples, strict=True):
        assert sample.iops > 0 and sample.kind == fm.EMULATOR
        # fio's bandwidth and IOPS agree with the block size (within rounding).
        assert sample.mb_s == pytest.approx(sample.iops * case.bs / 1e6, rel=0.05)
        assert 0 < sample.lat_p50_us <= sample.lat_p99_us <= sample.lat_p99_9_us
    assert boot.load_1m >= 0 and not boot.messages
    # The sequential write started at offset 0 of the emulator's image.
    assert setup.image.read_bytes()[:65536] != before
