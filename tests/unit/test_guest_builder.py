"""Unit tests of the guest builder's pure parts: cpio, ELF/modinfo, load order, apt parsing."""

from __future__ import annotations

import base64
import gzip
import hashlib
import lzma
import stat
import struct
from pathlib import Path
from typing import Any

import pytest

from launcher.guest import (
    BASE_APPEND,
    FioOutputError,
    GuestReport,
    Then,
    Workload,
    builder,
    fio_output,
)
from launcher.guest.cpio import CpioEntry, EntryKind, write_newc
from launcher.guest.kmod import (
    ElfError,
    ModInfo,
    ModuleOrderError,
    has_interpreter,
    load_order,
    parse_modinfo,
    read_builtin,
    scan_modules,
)
from launcher.guest.report import kernel_append, parse_report, reports

# ---- helpers --------------------------------------------------------------


def read_newc(archive: bytes) -> list[tuple[str, int, bytes, tuple[int, int], int]]:
    """Independent newc parser: (name, mode, data, rdev, ino) per member, trailer included."""
    members = []
    pos = 0
    while True:
        assert archive[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(archive[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, filesize, rmaj, rmin, namesize = (
            fields[0], fields[1], fields[6], fields[9], fields[10], fields[11])
        name_start = pos + 110
        name = archive[name_start:name_start + namesize - 1].decode()
        assert archive[name_start + namesize - 1] == 0
        data_start = (name_start + namesize + 3) & ~3
        data = archive[data_start:data_start + filesize]
        pos = (data_start + filesize + 3) & ~3
        members.append((name, mode, data, (rmaj, rmin), ino))
        if name == "TRAILER!!!":
            assert pos == len(archive)
            return members


def make_elf(sections: dict[str, bytes], interp: bool = False) -> bytes:
    """A minimal little-endian ELF64 with the given sections (and optionally PT_INTERP)."""
    names = [""] + list(sections) + [".shstrtab"]
    shstrtab = b""
    name_offsets = []
    for name in names:
        name_offsets.append(len(shstrtab))
        shstrtab += name.encode() + b"\0"
    contents = [b""] + list(sections.values()) + [shstrtab]
    phnum = 1 if interp else 0
    body = bytearray(64 + 56 * phnum)
    offsets = []
    for content in contents:
        offsets.append(len(body))
        body += content
    while len(body) % 8:
        body += b"\0"
    shoff = len(body)
    for index, content in enumerate(contents):
        sh_type = 0 if index == 0 else 1
        body += struct.pack("<IIQQQQIIQQ", name_offsets[index], sh_type, 0, 0,
                            offsets[index], len(content), 0, 0, 1, 0)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 64 if phnum else 0, shoff, 0,
                                 64, 56, phnum, 64, len(contents), len(contents) - 1)
    body[:64] = header
    if interp:
        body[64:64 + 56] = struct.pack("<IIQQQQQQ", 3, 4, 0, 0, 0, 0, 0, 1)
    return bytes(body)


def module(name: str, depends: str = "", softdep: str = "") -> bytes:
    info = [f"name={name}", f"depends={depends}", "license=GPL"]
    if softdep:
        info.append(f"softdep={softdep}")
    modinfo = b"".join(field.encode() + b"\0" for field in info)
    return make_elf({".text": b"\x90" * 16, ".modinfo": modinfo})


# ---- cpio -----------------------------------------------------------------


def test_newc_round_trip_keeps_kinds_data_and_alignment() -> None:
    entries = [
        CpioEntry("bin", EntryKind.DIRECTORY),
        CpioEntry("bin/busybox", EntryKind.FILE, 0o755, b"\x7fELF" + b"x" * 5),
        CpioEntry("bin/sh", EntryKind.SYMLINK, 0o777, b"busybox"),
        CpioEntry("dev", EntryKind.DIRECTORY),
        CpioEntry("dev/console", EntryKind.CHAR_DEVICE, 0o600, rdev=(5, 1)),
        CpioEntry("init", EntryKind.FILE, 0o755, b"#!/bin/sh\n"),
    ]
    archive = write_newc(entries)
    assert len(archive) % 4 == 0
    members = read_newc(archive)
    assert [m[0] for m in members] == [e.name for e in entries] + ["TRAILER!!!"]
    by_name = {m[0]: m for m in members}
    assert stat.S_ISDIR(by_name["bin"][1])
    assert by_name["bin/busybox"][1] == stat.S_IFREG | 0o755
    assert by_name["bin/busybox"][2] == b"\x7fELF" + b"x" * 5
    assert stat.S_ISLNK(by_name["bin/sh"][1]) and by_name["bin/sh"][2] == b"busybox"
    assert stat.S_ISCHR(by_name["dev/console"][1]) and by_name["dev/console"][3] == (5, 1)
    inodes = [m[4] for m in members[:-1]]
    assert len(set(inodes)) == len(inodes) and 0 not in inodes


def test_newc_is_reproducible() -> None:
    entries = [CpioEntry("a", EntryKind.FILE, 0o644, b"1"), CpioEntry("b", EntryKind.DIRECTORY)]
    assert write_newc(entries) == write_newc(list(entries))


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([CpioEntry("a", EntryKind.DIRECTORY)] * 2, "duplicate"),
        ([CpioEntry("a/b", EntryKind.FILE)], "before its directory"),
    ],
)
def test_newc_refuses_bad_archives(entries: list[CpioEntry], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_newc(entries)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "/abs", "kind": EntryKind.FILE},
        {"name": "", "kind": EntryKind.FILE},
        {"name": "TRAILER!!!", "kind": EntryKind.FILE},
        {"name": "l", "kind": EntryKind.SYMLINK},
        {"name": "d", "kind": EntryKind.DIRECTORY, "data": b"x"},
        {"name": "f", "kind": EntryKind.FILE, "perm": 0o10000},
    ],
)
def test_cpio_entry_validates_itself(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        CpioEntry(**kwargs)  # type: ignore[arg-type]


# ---- ELF and modinfo ------------------------------------------------------


def test_parse_modinfo_reads_name_depends_and_softdep() -> None:
    image = module("crc_t10dif", "crct10dif_common,scsi-common", "pre: crct10dif post: foo")
    info = parse_modinfo(image, "fallback")
    assert info == ModInfo("crc_t10dif", ("crct10dif_common", "scsi_common"), ("crct10dif",))


def test_parse_modinfo_without_name_uses_file_name() -> None:
    image = make_elf({".modinfo": b"depends=\0license=GPL\0"})
    assert parse_modinfo(image, "t10-pi") == ModInfo("t10_pi")


def test_parse_modinfo_rejects_non_modules() -> None:
    with pytest.raises(ElfError, match="no .modinfo"):
        parse_modinfo(make_elf({".text": b"\0"}), "x")
    with pytest.raises(ElfError, match="not an ELF"):
        parse_modinfo(b"#!/bin/sh\n" * 10, "x")
    elf32 = bytearray(module("x"))
    elf32[4] = 1
    with pytest.raises(ElfError, match="64-bit"):
        parse_modinfo(bytes(elf32), "x")


def test_truncated_section_is_an_elf_error() -> None:
    image = module("x", "y")
    with pytest.raises(ElfError):
        parse_modinfo(image[:-200], "x")


def test_has_interpreter_tells_static_from_dynamic() -> None:
    assert has_interpreter(make_elf({".text": b"\0"}, interp=True))
    assert not has_interpreter(make_elf({".text": b"\0"}))


def test_real_busybox_is_static_if_present() -> None:
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.skip("/bin/busybox (busybox-static) is not installed")
    assert not has_interpreter(busybox.read_bytes())


# ---- load order -----------------------------------------------------------

# The metadata of Debian 6.1's standard kernel for the virtio-scsi stack.
STANDARD_KERNEL = {
    info.name: info
    for info in (
        ModInfo("crct10dif_common"),
        ModInfo("crct10dif_generic", ("crct10dif_common",)),
        ModInfo("crc_t10dif", ("crct10dif_common",), ("crct10dif",)),
        ModInfo("crc64"),
        ModInfo("crc64_rocksoft_generic", ("crc64",)),
        ModInfo("crc64_rocksoft", ("crc64",), ("crc64",)),
        ModInfo("t10_pi", ("crc_t10dif", "crc64_rocksoft")),
        ModInfo("scsi_common"),
        ModInfo("scsi_mod", ("scsi_common",)),
        ModInfo("sd_mod", ("scsi_mod", "t10_pi")),
        ModInfo("virtio_ring"),
        ModInfo("virtio"),
        ModInfo("virtio_pci_legacy_dev"),
        ModInfo("virtio_pci_modern_dev"),
        ModInfo("virtio_pci", ("virtio_ring", "virtio_pci_modern_dev",
                               "virtio_pci_legacy_dev", "virtio")),
        ModInfo("virtio_scsi", ("scsi_mod", "virtio_ring", "virtio")),
    )
}


def test_load_order_puts_every_module_after_its_dependencies() -> None:
    order = load_order(builder.ROOT_MODULES, STANDARD_KERNEL)
    assert sorted(order) == sorted(STANDARD_KERNEL)
    for position, name in enumerate(order):
        for dep in STANDARD_KERNEL[name].depends:
            assert order.index(dep) < position, f"{dep} must precede {name}"


def test_load_order_skips_builtin_and_is_deterministic() -> None:
    builtin = {"crct10dif-common", "crct10dif_generic", "crc_t10dif", "crc64", "crc64_rocksoft",
               "crc64_rocksoft_generic", "t10_pi"}
    order = load_order(builder.ROOT_MODULES, STANDARD_KERNEL, builtin)
    assert order == ["scsi_common", "scsi_mod", "sd_mod", "virtio_ring",
                     "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio", "virtio_pci",
                     "virtio_scsi"]


def test_load_order_honours_existing_soft_pre_dependencies() -> None:
    graph = {"a": ModInfo("a", (), ("b", "alias-only")), "b": ModInfo("b")}
    assert load_order(["a"], graph) == ["b", "a"]


def test_load_order_reports_missing_and_cyclic_modules() -> None:
    with pytest.raises(ModuleOrderError, match="x .needed by a. is neither"):
        load_order(["a"], {"a": ModInfo("a", ("x",))})
    with pytest.raises(ModuleOrderError, match="cycle: a -> b -> a"):
        load_order(["a"], {"a": ModInfo("a", ("b",)), "b": ModInfo("b", ("a",))})


def test_read_builtin_and_scan_modules(tmp_path: Path) -> None:
    assert read_builtin("kernel/lib/crc-t10dif.ko\nkernel/block/t10-pi.ko\n\n") == {
        "crc_t10dif", "t10_pi"}
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "virtio-scsi.ko.xz").write_bytes(b"")
    (tmp_path / "a" / "b" / "sd_mod.ko").write_bytes(b"")
    (tmp_path / "a" / "notes.txt").write_bytes(b"")
    assert set(scan_modules(tmp_path)) == {"virtio_scsi", "sd_mod"}


# ---- apt output -----------------------------------------------------------


def test_parse_meta_depends() -> None:
    text = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n"
    assert builder.parse_meta_depends(text) == "linux-image-6.1.0-56-cloud-amd64"
    with pytest.raises(builder.GuestBuildError):
        builder.parse_meta_depends("linux-image-amd64\n  Recommends: foo\n")


def test_parse_print_uris() -> None:
    digest = "a86e2049672f52354c4536a089203b6c82639420424d31c91cf31a181fd4d8f1"
    deb = "linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb"
    text = f"'http://deb.debian.org/debian-security/pool/x/{deb}' {deb} 70550672 SHA256:{digest}\n"
    package = builder.parse_print_uris(text, "linux-image-6.1.0-56-amd64")
    assert package.filename == "linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb"
    assert package.size == 70550672 and package.sha256 == digest
    with pytest.raises(builder.GuestBuildError):
        builder.parse_print_uris("E: nothing\n", "x")


# ---- initramfs and manifest -----------------------------------------------


def fake_kernel_tree(root: Path, release: str) -> None:
    moddir = root / "lib" / "modules" / release
    kernel = moddir / "kernel"
    files = {
        "drivers/scsi/scsi_common.ko": module("scsi_common"),
        "drivers/scsi/scsi_mod.ko": module("scsi_mod", "scsi_common"),
        "drivers/scsi/sd_mod.ko": module("sd_mod", "scsi_mod,t10-pi"),
        "drivers/scsi/virtio_scsi.ko.xz": lzma.compress(
            module("virtio_scsi", "scsi_mod,virtio_ring,virtio")),
        "drivers/virtio/virtio.ko": module("virtio"),
        "drivers/virtio/virtio_ring.ko": module("virtio_ring"),
        "drivers/virtio/virtio_pci.ko": module("virtio_pci", "virtio_ring,virtio"),
        "drivers/net/virtio_net.ko": module("virtio_net", "virtio"),
    }
    for rel, data in files.items():
        (kernel / rel).parent.mkdir(parents=True, exist_ok=True)
        (kernel / rel).write_bytes(data)
    (moddir / "modules.builtin").write_text(
        "kernel/block/t10-pi.ko\nkernel/crypto/crct10dif_generic.ko\n"
        "kernel/crypto/crc64_rocksoft_generic.ko\n")


def test_assemble_initramfs_from_a_kernel_tree(tmp_path: Path) -> None:
    fake_kernel_tree(tmp_path, "6.1.0-0-test")
    image, order = builder.assemble_initramfs(
        tmp_path, "6.1.0-0-test", b"BUSYBOX", ["busybox", "sh", "insmod", "[["], b"#!/bin/sh\n")
    assert order == ["scsi_common", "scsi_mod", "sd_mod", "virtio_ring", "virtio", "virtio_pci",
                     "virtio_scsi"]
    members = {m[0]: m for m in read_newc(gzip.decompress(image))}
    assert members["init"][2] == b"#!/bin/sh\n" and members["init"][1] & 0o111
    assert members["bin/busybox"][2] == b"BUSYBOX"
    assert members["bin/[["][2] == b"busybox" and "bin/virtio_net" not in members
    assert stat.S_ISCHR(members["dev/console"][1])
    assert members["lib/mpl/modules.order"][2].decode().splitlines() == [
        "scsi_common", "scsi_mod scan=sync", "sd_mod", "virtio_ring", "virtio", "virtio_pci",
        "virtio_scsi"]
    # The xz module is shipped decompressed: busybox insmod gets a plain ELF.
    assert members["lib/mpl/virtio_scsi.ko"][2].startswith(b"\x7fELF")
    assert "lib/mpl/virtio_net.ko" not in members
    again, _ = builder.assemble_initramfs(
        tmp_path, "6.1.0-0-test", b"BUSYBOX", ["busybox", "sh", "insmod", "[["], b"#!/bin/sh\n")
    assert again == image, "the initramfs must be reproducible"


def test_assemble_initramfs_names_a_missing_module(tmp_path: Path) -> None:
    fake_kernel_tree(tmp_path, "r")
    (tmp_path / "lib/modules/r/kernel/drivers/virtio/virtio_ring.ko").unlink()
    with pytest.raises(builder.GuestBuildError, match="virtio_ring"):
        builder.assemble_initramfs(tmp_path, "r", b"", [], b"")


def test_inputs_match_detects_changed_inputs_and_damaged_outputs(tmp_path: Path) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "initrd.img").write_bytes(b"initrd")
    package = {"name": "linux-image-x", "filename": "x.deb", "size": 1, "sha256": "0" * 64}
    inputs = builder._inputs(package, b"init v1", "b" * 64)
    manifest = {
        "inputs": inputs,
        "outputs": {
            "kernel_release": "x",
            "vmlinuz_sha256": hashlib.sha256(b"kernel").hexdigest(),
            "initrd_sha256": hashlib.sha256(b"initrd").hexdigest(),
        },
    }
    assert builder.inputs_match(manifest, inputs, tmp_path)
    assert not builder.inputs_match(manifest, builder._inputs(package, b"init v2", "b" * 64),
                                    tmp_path)
    assert not builder.inputs_match(manifest, builder._inputs(
        {**package, "filename": "y.deb"}, b"init v1", "b" * 64), tmp_path)
    assert not builder.inputs_match(None, inputs, tmp_path)
    (tmp_path / "initrd.img").write_bytes(b"truncat")
    assert not builder.inputs_match(manifest, inputs, tmp_path)


def test_init_script_is_shipped_and_documents_every_parameter() -> None:
    script = builder.init_script().decode()
    assert script.startswith("#!/bin/busybox sh\n")
    for parameter in ("mpl.workload", "mpl.disks", "mpl.seed", "mpl.count", "mpl.cmd",
                      "mpl.seconds", "mpl.then", "mpl.fio"):
        assert script.count(parameter + "=") >= 2, parameter  # documented and parsed
    assert "poweroff -f" in script and "reboot -f" in script


# ---- kernel command line and console reports ------------------------------


def test_kernel_append_composes_parameters() -> None:
    append = kernel_append(Workload.VERIFY, disks=2, seed=7, count=32)
    assert append == (f"{BASE_APPEND} mpl.workload=verify mpl.disks=2 mpl.seed=7 mpl.count=32"
                      " mpl.then=poweroff")
    shell = kernel_append(Workload.SHELL, command="echo 'a b' | wc -c", then=Then.REBOOT)
    (word,) = [w for w in shell.split() if w.startswith("mpl.cmd=")]
    assert base64.b64decode(word.removeprefix("mpl.cmd=")) == b"echo 'a b' | wc -c"
    assert shell.endswith("mpl.then=reboot")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"workload": Workload.SHELL},
        {"workload": Workload.BOOT, "command": "true"},
        {"workload": Workload.IO, "count": -1},
        {"workload": Workload.SHELL, "command": "x" * 2000},
    ],
)
def test_kernel_append_refuses_bad_requests(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        kernel_append(**kwargs)


def test_parse_report_reads_fields_and_text() -> None:
    disk = parse_report("MPL DISK name=sda size=67108864 ro=0 hctl=0:0:0:0 vendor=QEMU "
                        "model=QEMU_HARDDISK\r\n")
    assert disk is not None and disk.kind == "DISK"
    assert disk.fields["hctl"] == "0:0:0:0" and disk.number("size") == 64 << 20
    klog = parse_report("MPL KLOG [    3.77] sd 0:0:0:0: [sda] tag#0 abort a=b")
    assert klog == GuestReport("KLOG", "[    3.77] sd 0:0:0:0: [sda] tag#0 abort a=b")
    out = parse_report("\rMPL OUT x=1 y")
    assert out is not None and out.kind == "OUT" and out.text == "x=1 y" and not out.fields
    assert parse_report("[    1.0] random kernel line") is None
    assert parse_report("MPL lower case") is None
    done = reports(["noise", "MPL BOOT kernel=6.1", "MPL DONE workload=boot rc=0"])
    assert [r.kind for r in done] == ["BOOT", "DONE"] and done[1].number("rc") == 0


def test_lsi_flavour_adds_sym53c8xx_in_its_own_folder(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cloud, lsi = builder.FLAVOURS["cloud"], builder.FLAVOURS["lsi"]
    assert builder.DEFAULT_FLAVOUR is cloud and cloud.meta_package == builder.KERNEL_META_PACKAGE
    assert lsi.meta_package == "linux-image-amd64"
    assert lsi.roots[-2:] == ("scsi_transport_spi", "sym53c8xx")
    assert set(cloud.roots) < set(lsi.roots)
    monkeypatch.chdir(tmp_path)
    assert builder.default_out_dir() == tmp_path / "build" / "guest"
    assert builder.default_out_dir(lsi) == tmp_path / "build" / "guest-lsi"
    package = {"name": "linux-image-x", "filename": "x.deb", "size": 1, "sha256": "0" * 64}
    # The module list is an input: a flavour's manifest never matches the other's.
    assert builder._inputs(package, b"i", "b" * 64) == builder._inputs(
        package, b"i", "b" * 64, cloud.roots)
    assert builder._inputs(package, b"i", "b" * 64) != builder._inputs(
        package, b"i", "b" * 64, lsi.roots)


# ---- the bench flavour: fio and its libraries ------------------------------

LDD_SAMPLE = """\
\tlinux-vdso.so.1 (0x00007ffd3b5f2000)
\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f38c56f2000)
\tlibceph-common.so.2 => /usr/lib/x86_64-linux-gnu/ceph/libceph-common.so.2 (0x00007f38bb200000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f38c461e000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f38c5732000)
\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f38c56f2000)
"""


def test_parse_ldd_keeps_paths_in_order_without_the_vdso() -> None:
    assert builder.parse_ldd(LDD_SAMPLE) == [
        "/lib/x86_64-linux-gnu/libz.so.1",
        "/usr/lib/x86_64-linux-gnu/ceph/libceph-common.so.2",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2",
    ]
    with pytest.raises(builder.GuestBuildError, match="librbd.so.1 not found"):
        builder.parse_ldd(LDD_SAMPLE + "\tlibrbd.so.1 => not found\n")


def test_bench_flavour_is_the_cloud_guest_plus_fio_in_its_own_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cloud, bench = builder.FLAVOURS["cloud"], builder.FLAVOURS["bench"]
    assert bench.meta_package == cloud.meta_package and bench.roots == cloud.roots
    assert bench.programs == ("/usr/bin/fio",) and not cloud.programs
    monkeypatch.chdir(tmp_path)
    assert builder.default_out_dir(bench) == tmp_path / "build" / "guest-bench"
    package = {"name": "linux-image-x", "filename": "x.deb", "size": 1, "sha256": "0" * 64}
    plain = builder._inputs(package, b"i", "b" * 64)
    assert "programs" not in plain, "flavours without programs keep their inputs"
    with_fio = builder._inputs(package, b"i", "b" * 64, cloud.roots,
                               {"usr/bin/fio": "1" * 64, "lib/libz.so.1": "2" * 64})
    assert list(with_fio["programs"]) == ["lib/libz.so.1", "usr/bin/fio"]
    changed = builder._inputs(package, b"i", "b" * 64, cloud.roots,
                              {"usr/bin/fio": "1" * 64, "lib/libz.so.1": "3" * 64})
    assert with_fio != changed, "a library's hash is an input"


def test_assemble_initramfs_adds_programs_with_their_folders(tmp_path: Path) -> None:
    fake_kernel_tree(tmp_path, "r")
    extra = {"usr/bin/fio": b"\x7fELF fio", "usr/lib/x86_64-linux-gnu/ceph/libc2.so": b"ceph",
             "lib64/ld-linux-x86-64.so.2": b"ld", "lib/x86_64-linux-gnu/libz.so.1": b"z"}
    image, _ = builder.assemble_initramfs(tmp_path, "r", b"BB", ["busybox"], b"#!/bin/sh\n",
                                          extra=extra)
    members = read_newc(gzip.decompress(image))
    names = [m[0] for m in members]
    by_name = {m[0]: m for m in members}
    for name, data in extra.items():
        assert by_name[name][2] == data and by_name[name][1] & 0o111, name
        parts = name.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            assert stat.S_ISDIR(by_name[folder][1]), folder
            assert names.index(folder) < names.index(name), "a folder comes before its files"
    assert names.count("lib") == 1, "folders are made once"
    with pytest.raises(builder.GuestBuildError, match="bad guest path"):
        builder.assemble_initramfs(tmp_path, "r", b"BB", [], b"", extra={"a/../b": b""})


def test_kernel_append_carries_a_fio_job_file() -> None:
    job = "[global]\nfilename=/dev/sda\n[r]\nrw=randread\n"
    append = kernel_append(Workload.FIO, disks=1, fio_job=job)
    (word,) = [w for w in append.split() if w.startswith("mpl.fio=")]
    assert base64.b64decode(word.removeprefix("mpl.fio=")).decode() == job
    assert "mpl.workload=fio" in append.split()
    with pytest.raises(ValueError):
        kernel_append(Workload.FIO)
    with pytest.raises(ValueError):
        kernel_append(Workload.SHELL, command="true", fio_job=job)


def test_fio_output_takes_the_json_between_the_markers() -> None:
    console = ["MPL BOOT kernel=6.1", "MPL OUT fio: a message", "MPL FIO state=begin",
               "MPL JSON note: both iodepth >= 1 and synchronous I/O engine are selected",
               "MPL JSON {", 'MPL JSON   "jobs" : []', "MPL JSON }",
               "MPL FIO state=end rc=0 lines=4", "MPL DONE workload=fio rc=0"]
    out = fio_output(reports(console))
    assert out.rc == 0 and out.json_text == '{\n  "jobs" : []\n}'
    assert out.messages == ("fio: a message", "note: both iodepth >= 1 and synchronous I/O "
                            "engine are selected")
    with pytest.raises(FioOutputError, match="3 JSON lines"):
        fio_output(reports(console[:5] + console[6:]))
    with pytest.raises(FioOutputError, match="never ended"):
        fio_output(reports(console[:6]))
    with pytest.raises(FioOutputError, match="no complete"):
        fio_output(reports(console[:2]))
