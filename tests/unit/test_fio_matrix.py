"""bench.fio_matrix's pure part: the job file, reading fio's JSON, medians
and ratios in the shared result format."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bench import fio_matrix as fm
from bench.guest_throughput import BenchError


def fio_job(name: str, direction: str, iops: float, bw_bytes: int,
            p50_ns: int, p99_ns: int, p999_ns: int, error: int = 0) -> dict[str, Any]:
    """A job as fio 3.33's JSON output has it (the fields read, and some others)."""
    idle = {"io_bytes": 0, "bw_bytes": 0, "iops": 0.0, "total_ios": 0,
            "clat_ns": {"min": 0, "max": 0, "mean": 0.0}}
    busy = {"io_bytes": bw_bytes * 5, "bw_bytes": bw_bytes, "iops": iops,
            "total_ios": int(iops * 5),
            "clat_ns": {"min": 1, "max": p999_ns * 2, "mean": float(p50_ns),
                        "percentile": {"1.000000": 1, "50.000000": p50_ns,
                                       "99.000000": p99_ns, "99.900000": p999_ns}}}
    return {"jobname": name, "groupid": 0, "error": error, "usr_cpu": 10.5, "sys_cpu": 30.25,
            "read": busy if direction == "read" else idle,
            "write": busy if direction == "write" else idle}


CASES = (fm.Case("randread", 4096, 1), fm.Case("write", fm.MiB, 4))


def fio_doc(scale: float = 1.0) -> str:
    return json.dumps({"fio version": "fio-3.33", "jobs": [
        fio_job("4k-randread-qd1", "read", 2500.0 * scale, int(10_240_000 * scale),
                80_000, 600_000, 2_000_000),
        fio_job("1m-write-qd4", "write", 1800.0 * scale, int(1_887_436_800 * scale),
                1_100_000, 9_700_000, 12_000_000),
    ]})


def test_case_names_and_the_default_matrix() -> None:
    assert [c.name for c in fm.CASES] == [
        "4k randread QD1", "4k randread QD32", "4k randwrite QD1", "4k randwrite QD32",
        "64k read QD1", "64k write QD1", "1m read QD4", "1m write QD4"]
    assert fm.CASES[0].job == "4k-randread-qd1" and fm.CASES[-1].direction == "write"
    assert len({c.job for c in fm.CASES}) == len(fm.CASES)
    with pytest.raises(ValueError):
        fm.Case("trim", 4096, 1)
    with pytest.raises(ValueError):
        fm.Case("read", 1000, 1)
    assert fm.select_cases("1M-write-QD4, 4k-randread-qd1") == (fm.CASES[-1], fm.CASES[0])
    with pytest.raises(ValueError, match="nope"):
        fm.select_cases("4k-randread-qd1,nope")


def test_job_file_runs_every_case_in_turn_on_the_guest_disk() -> None:
    text = fm.job_file(fm.CASES, runtime=5, ramp=2, engine="io_uring")
    lines = text.splitlines()
    assert lines[:8] == ["[global]", "filename=/dev/sda", "direct=1", "ioengine=io_uring",
                         "time_based=1", "runtime=5", "ramp_time=2", "stonewall"]
    assert [line[1:-1] for line in lines if line.startswith("[")][1:] == [
        c.job for c in fm.CASES]
    assert "rw=randwrite\nbs=4096\niodepth=32\n" in text and f"bs={fm.MiB}\n" in text


def test_parse_fio_reads_the_cases_direction_and_latencies() -> None:
    read, write = fm.parse_fio(fio_doc(), CASES, fm.EMULATOR, 2, 1.25)
    assert read == fm.Sample("4k randread QD1", fm.EMULATOR, 2, 2500.0, 10.24, 80.0, 600.0,
                             2000.0, 40.8, 1.25)
    assert (write.iops, write.mb_s, write.lat_p50_us, write.lat_p99_9_us) == (
        1800.0, 1887.44, 1100.0, 12000.0)


@pytest.mark.parametrize("doc, message", [
    ("not json", "not its JSON"),
    (json.dumps({"jobs": [fio_job("4k-randread-qd1", "read", 1, 1, 1, 1, 1)]}),
     "no job 1m-write-qd4"),
    (json.dumps({"jobs": [fio_job("4k-randread-qd1", "read", 1, 1, 1, 1, 1, error=5),
                          fio_job("1m-write-qd4", "write", 1, 1, 1, 1, 1)]}), "error 5"),
    (json.dumps({"jobs": [fio_job("4k-randread-qd1", "write", 1, 1, 1, 1, 1),
                          fio_job("1m-write-qd4", "write", 1, 1, 1, 1, 1)]}), "did no I/O"),
])
def test_parse_fio_refuses_incomplete_results(doc: str, message: str) -> None:
    with pytest.raises(BenchError, match=message):
        fm.parse_fio(doc, CASES, fm.IN_PROCESS, 1, 0.5)


def test_summarize_gives_medians_ratios_and_every_sample_in_the_shared_format() -> None:
    samples = []
    # Emulator at 0.8, 0.9, 1.0 of in-process; in-process at 1.0, 1.1, 1.2 of the base.
    for pair, (emu, inp) in enumerate(((0.8, 1.0), (0.99, 1.1), (1.2, 1.2)), start=1):
        samples += fm.parse_fio(fio_doc(emu), CASES, fm.EMULATOR, pair, 1.0 + pair)
        samples += fm.parse_fio(fio_doc(inp), CASES, fm.IN_PROCESS, pair, 2.0 + pair)
    rows, ratios = fm.summarize(samples, CASES)
    assert [(r["case"], r["kind"]) for r in rows] == [
        ("4k randread QD1", "emulator"), ("4k randread QD1", "in-process"),
        ("1m write QD4", "emulator"), ("1m write QD4", "in-process")]
    first = rows[0]
    assert {"case", "rw", "bs", "iodepth", "kind", "iops", "mb_s", "lat_p50_us", "lat_p99_us",
            "samples"} <= set(first)
    assert (first["rw"], first["bs"], first["iodepth"]) == ("randread", 4096, 1)
    assert first["iops"] == pytest.approx(2500 * 0.99) and rows[1]["iops"] == 2500 * 1.1
    assert [s["load_1m"] for s in first["samples"]] == [2.0, 3.0, 4.0]
    assert {"iops", "mb_s", "lat_p50_us", "lat_p99_us", "load_1m"} <= set(first["samples"][0])
    ratio = ratios[0]
    assert ratio["case"] == "4k randread QD1"
    assert ratio["iops"] == pytest.approx(0.99 / 1.1, abs=1e-3)
    assert ratio["paired_iops"] == pytest.approx(0.9, abs=1e-3)  # median of 0.8, 0.9, 1.0
    assert ratio["lat_p50"] == 1.0  # same latencies on both sides here
    json.dumps({"cases": rows, "ratios": ratios})  # the result file can hold them


def test_summarize_leaves_out_ratios_of_a_case_one_kind_lacks() -> None:
    samples = fm.parse_fio(fio_doc(), CASES, fm.EMULATOR, 1, 1.0)
    rows, ratios = fm.summarize(samples, CASES)
    assert len(rows) == 2 and ratios == []
