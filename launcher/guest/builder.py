"""Builds the test guest: Debian's own kernel plus a tiny busybox initramfs.

There are three flavours (:data:`FLAVOURS`), built the same way into their
own folders: ``cloud`` (the default, ``build/guest``) from Debian's cloud
kernel, which boots fast under TCG but has no LSI53C895A driver, ``lsi``
(``build/guest-lsi``) from the standard kernel, whose initramfs also loads
sym53c8xx for the guests of ``kind = "lsi"`` emulators, and ``bench``
(``build/guest-bench``): the cloud guest plus the host's fio and every
shared library it links (about 80 MiB unpacked: Debian's fio links the
ceph, gluster, RDMA and PMEM engines' libraries directly and is linked with
BIND_NOW, so none of them can be left out). The test guest stays small;
only the benchmarks boot the big one.

Theory of operation:

1. Ask apt which concrete kernel package the ``linux-image-amd64`` meta
   package currently means, and the exact file name, size and SHA-256 of that
   .deb (``apt-get download --print-uris``). Those, with the hashes of the
   init script and of busybox, the module list and the builder version, are
   the *inputs*, and for a flavour with programs, the path and SHA-256 of
   each program and of each library of its closure (as ``ldd`` resolves it
   on the host). If ``manifest.json`` in the output folder records the same
   inputs and the outputs still hash as recorded, nothing is done.
2. Otherwise download the .deb into ``DIR/cache`` (kept, checked by hash),
   unpack it with ``dpkg -x`` into a temporary folder (nothing is installed on
   the host), copy the kernel out and work out which modules to load, in
   which order, from the modules' own metadata (see :mod:`.kmod`).
3. Write the initramfs as a gzip'd newc cpio (see :mod:`.cpio`): static
   busybox with one symlink per applet, ``/init`` (``init.sh``), the modules
   (uncompressed), ``/lib/mpl/modules.order``, and a flavour's programs and
   libraries at their host paths (so the dynamic loader and the libraries'
   RUNPATHs find them without an ld.so.cache). The archive is
   reproducible: fixed timestamps and owners, fixed gzip header.

A file lock on the output folder lets tests and the launcher call
:func:`ensure_guest` at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .cpio import CpioEntry, EntryKind, write_newc
from .kmod import (
    ElfError,
    ModInfo,
    ModuleOrderError,
    has_interpreter,
    load_order,
    parse_modinfo,
    read_builtin,
    read_module_bytes,
    scan_modules,
)

__all__ = [
    "BUILDER_VERSION",
    "BUSYBOX",
    "GuestBuildError",
    "GuestImage",
    "Flavour",
    "FLAVOURS",
    "KERNEL_META_PACKAGE",
    "KernelPackage",
    "MODULE_PARAMS",
    "ROOT_MODULES",
    "LSI_ROOT_MODULES",
    "BENCH_PROGRAMS",
    "parse_ldd",
    "program_closure",
    "assemble_initramfs",
    "default_out_dir",
    "ensure_guest",
    "init_script",
    "inputs_match",
    "parse_meta_depends",
    "parse_print_uris",
]

#: Bump when the layout of the image or the way it is built changes.
BUILDER_VERSION = 1

#: The bench flavour's programs, copied from the host with their libraries
#: (scripts/setup installs Debian's fio).
BENCH_PROGRAMS: tuple[str, ...] = ("/usr/bin/fio",)

#: Debian 12's meta package; it depends on the current concrete kernel.
#: The cloud flavour: it has every driver the guest needs (virtio_scsi and
#: sd_mod as modules, the CRC/T10-PI helpers built in) and its bzImage is
#: LZ4-compressed, where the standard flavour's is XZ. Decompressing XZ under
#: TCG costs about 8 s per boot; the cloud kernel boots to /init in about 4 s.
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"

#: Static busybox from Debian's busybox-static package.
BUSYBOX = Path("/bin/busybox")

#: The modules wanted; their dependencies are found from module metadata.
#: The two crypto providers are listed explicitly: crc-t10dif and
#: crc64-rocksoft ask the crypto API for them at run time (request_module),
#: which nothing in the initramfs would answer, and would fall back silently.
ROOT_MODULES: tuple[str, ...] = (
    "crct10dif_generic",
    "crc64_rocksoft_generic",
    "sd_mod",
    "virtio_pci",
    "virtio_scsi",
)

#: The LSI flavour's extra modules: sym53c8xx drives the LSI53C895A and needs
#: the SPI transport class (found again from metadata; listed so the order is
#: plain to read).
LSI_ROOT_MODULES: tuple[str, ...] = (*ROOT_MODULES, "scsi_transport_spi", "sym53c8xx")


@dataclass(frozen=True, slots=True)
class Flavour:
    """One kind of test guest: which kernel, which modules, which folder."""

    name: str
    #: Debian 12 meta package naming the concrete kernel package.
    meta_package: str
    roots: tuple[str, ...]
    #: Output folder under ``build/``.
    folder: str
    #: Absolute host paths of programs to copy in, with their shared libraries.
    programs: tuple[str, ...] = ()


#: ``cloud``: the default guest. ``lsi``: the standard kernel (its bzImage is
#: XZ, so each boot under TCG costs some seconds more), for LSI53C895A disks.
FLAVOURS: Mapping[str, Flavour] = {
    "cloud": Flavour("cloud", KERNEL_META_PACKAGE, ROOT_MODULES, "guest"),
    "lsi": Flavour("lsi", "linux-image-amd64", LSI_ROOT_MODULES, "guest-lsi"),
    "bench": Flavour("bench", KERNEL_META_PACKAGE, ROOT_MODULES, "guest-bench",
                     BENCH_PROGRAMS),
}
DEFAULT_FLAVOUR = FLAVOURS["cloud"]

#: insmod parameters. scan=sync makes loading virtio_scsi return only after
#: the SCSI bus scan is done, so the init's disk wait rarely has to wait.
MODULE_PARAMS: Mapping[str, str] = {"scsi_mod": "scan=sync"}

_MODULE_DIR = "lib/mpl"
_Progress = Callable[[str], None]


class GuestBuildError(RuntimeError):
    """The guest image could not be built; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class GuestImage:
    """A built guest: pass ``kernel`` to -kernel and ``initrd`` to -initrd."""

    kernel: Path
    initrd: Path
    manifest: Path
    kernel_release: str


@dataclass(frozen=True, slots=True)
class KernelPackage:
    """One concrete kernel .deb as apt describes it."""

    name: str
    url: str
    filename: str
    size: int
    sha256: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"bad sha256 {self.sha256!r} for {self.name}")
        if "/" in self.filename or not self.filename.endswith(".deb"):
            raise ValueError(f"bad .deb file name {self.filename!r}")

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "filename": self.filename, "size": self.size,
                "sha256": self.sha256}


def default_out_dir(flavour: Flavour = DEFAULT_FLAVOUR) -> Path:
    """``build/guest`` (or the flavour's folder) under the current working directory."""
    return Path.cwd() / "build" / flavour.folder


def init_script() -> bytes:
    """The guest's /init, shipped as package data next to this module."""
    return resources.files(__package__).joinpath("init.sh").read_bytes()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stderr_progress(message: str) -> None:
    print(f"guest: {message}", file=sys.stderr, flush=True)


# ---- apt ------------------------------------------------------------------

def parse_meta_depends(text: str, meta: str = KERNEL_META_PACKAGE) -> str:
    """The concrete linux-image package from ``apt-cache depends META`` output."""
    for line in text.splitlines():
        match = re.fullmatch(r"\s*\|?Depends:\s*(linux-image-\S+)\s*", line)
        if match:
            return match.group(1)
    raise GuestBuildError(f"apt-cache depends {meta} names no linux-image package")


def parse_print_uris(text: str, name: str) -> KernelPackage:
    """The .deb of ``apt-get download --print-uris NAME`` output.

    A line reads: 'URL' FILENAME SIZE SHA256:HEX
    """
    for line in text.splitlines():
        match = re.fullmatch(r"'([^']+)'\s+(\S+)\s+(\d+)\s+SHA256:([0-9a-fA-F]{64})\s*", line)
        if match:
            url, filename, size, digest = match.groups()
            return KernelPackage(name, url, filename, int(size), digest.lower())
    raise GuestBuildError(f"apt-get download --print-uris {name} gave no SHA256 line")


def _run(argv: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{argv[0]} is not installed (needed to build the guest)") from exc


def _resolve_once(meta: str) -> KernelPackage | None:
    depends = _run(["apt-cache", "depends", meta])
    if depends.returncode != 0:
        return None
    name = parse_meta_depends(depends.stdout, meta)
    uris = _run(["apt-get", "download", "--print-uris", name])
    if uris.returncode != 0:
        return None
    return parse_print_uris(uris.stdout, name)


def resolve_kernel_package(meta: str = KERNEL_META_PACKAGE,
                           progress: _Progress = _stderr_progress) -> KernelPackage:
    """Ask apt for the current kernel package, updating the lists once if needed."""
    found = _resolve_once(meta)
    if found is None:
        progress("apt lists do not know the kernel package: apt-get update")
        update = _run(["apt-get", "update"])
        if update.returncode != 0:
            raise GuestBuildError(f"apt-get update failed: {update.stderr.strip()}")
        found = _resolve_once(meta)
    if found is None:
        raise GuestBuildError(f"apt cannot find a kernel package for {meta}")
    return found


_APT_STATE = (Path("/var/lib/apt/lists"), Path("/etc/apt"))


def apt_stamp(roots: Sequence[Path] = _APT_STATE) -> str:
    """A digest of the apt lists' and configuration's names, sizes and mtimes.

    apt's answer about the kernel package can only change when one of these
    changes, and asking apt costs seconds where this costs milliseconds
    (container images often disable apt's binary cache), so the answer is
    kept in the manifest under this stamp.
    """
    digest = hashlib.sha256()
    for root in roots:
        if not root.exists():
            continue
        for path in sorted(root.rglob("*")):
            with contextlib.suppress(OSError):
                info = path.stat()
                digest.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def fetch_deb(package: KernelPackage, cache: Path, progress: _Progress) -> Path:
    """The package's .deb in ``cache``, downloaded unless a good copy is there."""
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / package.filename
    if target.exists() and _sha256_file(target) == package.sha256:
        return target
    progress(f"downloading {package.filename}")
    result = _run(["apt-get", "download", package.name], cwd=cache)
    if result.returncode != 0 or not target.exists():
        raise GuestBuildError(f"apt-get download {package.name} failed: {result.stderr.strip()}")
    if _sha256_file(target) != package.sha256:
        target.unlink()
        raise GuestBuildError(f"{package.filename} does not match the SHA-256 apt announced")
    for stale in cache.glob("linux-image-*.deb"):
        if stale != target:
            stale.unlink()
    return target


# ---- programs from the host ------------------------------------------------

_LDD_LINE = re.compile(r"\s*(?:(\S+)\s+=>\s+)?(\S+)\s+\(0x[0-9a-fA-F]+\)\s*")


def parse_ldd(text: str) -> list[str]:
    """The absolute paths of the libraries in ``ldd PROGRAM`` output, in order.

    A line reads ``libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)``, or
    for the dynamic loader ``/lib64/ld-linux-x86-64.so.2 (0x...)``; the vDSO
    (no path) is skipped. A library ldd could not find is an error: the
    program would not start in the guest either.
    """
    paths: list[str] = []
    for line in text.splitlines():
        if "=> not found" in line:
            raise GuestBuildError(f"ldd: {line.split()[0]} not found on the host")
        match = _LDD_LINE.fullmatch(line)
        if match and match.group(2).startswith("/") and match.group(2) not in paths:
            paths.append(match.group(2))
    return paths


def program_closure(programs: Sequence[str]) -> dict[str, Path]:
    """Guest path (relative) -> host file, for each program and its libraries.

    Each file goes to the path the host's loader names (``ldd``), with the
    content of the file that path resolves to, so the guest needs no
    symlinks and no ld.so.cache: the loader's default folders and the
    libraries' own RUNPATHs (ceph's) find everything where the host does.
    """
    files: dict[str, Path] = {}
    for program in programs:
        path = Path(program)
        if not path.is_absolute() or not path.is_file():
            raise GuestBuildError(f"{program} is not installed (scripts/setup installs it)")
        result = _run(["ldd", program])
        if result.returncode != 0:
            raise GuestBuildError(f"ldd {program} failed: {result.stderr.strip()}")
        files[program.lstrip("/")] = path.resolve()
        for library in parse_ldd(result.stdout):
            files[library.lstrip("/")] = Path(library).resolve()
    return dict(sorted(files.items()))


def _closure_hashes(closure: Mapping[str, Path]) -> dict[str, str]:
    return {name: _sha256_file(path) for name, path in closure.items()}


# ---- inputs and manifest --------------------------------------------------

def _inputs(package: Mapping[str, Any], init: bytes, busybox_sha256: str,
            roots: Sequence[str] = ROOT_MODULES,
            programs: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What the image is made from; ``programs`` (guest path -> SHA-256 of
    each program and library) only for a flavour that has some, so the other
    flavours' manifests stay as they were."""
    inputs: dict[str, Any] = {
        "builder_version": BUILDER_VERSION,
        "kernel_package": dict(package),
        "init_sha256": hashlib.sha256(init).hexdigest(),
        "busybox_sha256": busybox_sha256,
        "modules": {"roots": list(roots), "params": dict(MODULE_PARAMS)},
    }
    if programs:
        inputs["programs"] = dict(sorted(programs.items()))
    return inputs


def inputs_match(manifest: Mapping[str, Any] | None, inputs: Mapping[str, Any],
                 out: Path) -> bool:
    """True if ``manifest`` was made from ``inputs`` and its outputs are intact."""
    if not manifest or manifest.get("inputs") != inputs:
        return False
    outputs = manifest.get("outputs")
    if not isinstance(outputs, dict):
        return False
    for key, filename in (("vmlinuz_sha256", "vmlinuz"), ("initrd_sha256", "initrd.img")):
        path = out / filename
        if not path.is_file() or _sha256_file(path) != outputs.get(key):
            return False
    return isinstance(outputs.get("kernel_release"), str)


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_manifest(out: Path, manifest: Mapping[str, Any]) -> None:
    _write_atomic(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ---- the image ------------------------------------------------------------

def busybox_applets(busybox: Path = BUSYBOX) -> list[str]:
    """The applet names the busybox binary was built with."""
    result = _run([str(busybox), "--list"])
    if result.returncode != 0:
        raise GuestBuildError(f"{busybox} --list failed: {result.stderr.strip()}")
    return sorted({name for name in result.stdout.split() if re.fullmatch(r"[\w.\[\]-]+", name)})


def _kernel_release(tree: Path) -> str:
    releases = sorted(p.name for p in (tree / "lib" / "modules").iterdir() if p.is_dir())
    if len(releases) != 1:
        raise GuestBuildError(f"expected one kernel release in the package, found {releases}")
    return releases[0]


def assemble_initramfs(
    tree: Path, release: str, busybox: bytes, applets: Sequence[str], init: bytes,
    roots: Sequence[str] = ROOT_MODULES, extra: Mapping[str, bytes] | None = None,
) -> tuple[bytes, list[str]]:
    """The gzip'd initramfs for the kernel unpacked at ``tree``, and the load order.

    ``tree`` is the root of an unpacked linux-image package: it holds
    lib/modules/RELEASE/ with the modules and modules.builtin. ``extra``
    maps relative guest paths to the contents of further executable files
    (a flavour's programs and libraries); their folders are made too.
    """
    moddir = tree / "lib" / "modules" / release
    files = scan_modules(moddir / "kernel")
    builtin_file = moddir / "modules.builtin"
    builtin = read_builtin(builtin_file.read_text()) if builtin_file.exists() else frozenset()
    images: dict[str, bytes] = {}
    infos: dict[str, ModInfo] = {}

    def lookup(name: str) -> ModInfo | None:
        if name not in infos:
            path = files.get(name)
            if path is None:
                return None
            images[name] = read_module_bytes(path)
            infos[name] = parse_modinfo(images[name], name)
        return infos[name]

    try:
        order = load_order(tuple(roots), lookup, builtin)
    except (ModuleOrderError, ElfError) as exc:
        raise GuestBuildError(f"kernel {release}: {exc}") from exc

    entries = [CpioEntry(d, EntryKind.DIRECTORY) for d in
               ("bin", "dev", "lib", _MODULE_DIR, "proc", "run", "sys", "tmp")]
    entries.append(CpioEntry("dev/console", EntryKind.CHAR_DEVICE, 0o600, rdev=(5, 1)))
    entries.append(CpioEntry("bin/busybox", EntryKind.FILE, 0o755, busybox))
    entries.extend(CpioEntry(f"bin/{name}", EntryKind.SYMLINK, 0o777, b"busybox")
                   for name in applets if name != "busybox")
    entries.append(CpioEntry("init", EntryKind.FILE, 0o755, init))
    order_lines = []
    for name in order:
        entries.append(CpioEntry(f"{_MODULE_DIR}/{name}.ko", EntryKind.FILE, 0o644, images[name]))
        order_lines.append(f"{name} {MODULE_PARAMS.get(name, '')}".rstrip())
    entries.append(CpioEntry(f"{_MODULE_DIR}/modules.order", EntryKind.FILE, 0o644,
                             "".join(f"{line}\n" for line in order_lines).encode()))
    if extra:
        made = {entry.name for entry in entries if entry.kind is EntryKind.DIRECTORY}
        for name in sorted(extra):
            if name.startswith("/") or ".." in name.split("/"):
                raise GuestBuildError(f"bad guest path {name!r}")
            parents = name.split("/")[:-1]
            for depth in range(1, len(parents) + 1):
                folder = "/".join(parents[:depth])
                if folder not in made:
                    made.add(folder)
                    entries.append(CpioEntry(folder, EntryKind.DIRECTORY))
            entries.append(CpioEntry(name, EntryKind.FILE, 0o755, extra[name]))
    archive = write_newc(entries)
    return gzip.compress(archive, compresslevel=9, mtime=0), order


def _check_busybox(busybox: Path) -> bytes:
    try:
        data = busybox.read_bytes()
    except OSError as exc:
        raise GuestBuildError(f"cannot read {busybox}: install busybox-static") from exc
    try:
        dynamic = has_interpreter(data)
    except ElfError as exc:
        raise GuestBuildError(f"{busybox}: {exc}") from exc
    if dynamic:
        raise GuestBuildError(f"{busybox} is dynamically linked: install busybox-static")
    return data


def _build(out: Path, package: KernelPackage, init: bytes, busybox: Path,
           busybox_data: bytes, inputs: Mapping[str, Any], stamp: str,
           progress: _Progress, roots: Sequence[str],
           closure: Mapping[str, Path]) -> GuestImage:
    deb = fetch_deb(package, out / "cache", progress)
    progress(f"unpacking {deb.name}")
    with tempfile.TemporaryDirectory(prefix="unpack-", dir=out / "cache") as tmp:
        tree = Path(tmp)
        result = _run(["dpkg", "-x", str(deb), str(tree)])
        if result.returncode != 0:
            raise GuestBuildError(f"dpkg -x {deb.name} failed: {result.stderr.strip()}")
        release = _kernel_release(tree)
        vmlinuz = tree / "boot" / f"vmlinuz-{release}"
        if not vmlinuz.is_file():
            raise GuestBuildError(f"{deb.name} has no boot/vmlinuz-{release}")
        progress(f"writing initramfs for {release}")
        extra = {name: path.read_bytes() for name, path in closure.items()}
        if _closure_hashes(closure) != inputs.get("programs", {}):
            raise GuestBuildError("a program or library changed on the host during the build")
        initrd, order = assemble_initramfs(tree, release, busybox_data,
                                           busybox_applets(busybox), init, roots, extra)
        _write_atomic(out / "vmlinuz", vmlinuz.read_bytes())
    _write_atomic(out / "initrd.img", initrd)
    manifest = {
        "apt_stamp": stamp,
        "kernel_url": package.url,
        "inputs": dict(inputs),
        "outputs": {
            "kernel_release": release,
            "load_order": order,
            "vmlinuz_sha256": _sha256_file(out / "vmlinuz"),
            "initrd_sha256": hashlib.sha256(initrd).hexdigest(),
            "initrd_size": len(initrd),
        },
    }
    _write_manifest(out, manifest)
    progress(f"built {out / 'vmlinuz'} and {out / 'initrd.img'} ({len(initrd) // 1024} KiB)")
    return GuestImage(out / "vmlinuz", out / "initrd.img", out / "manifest.json", release)


def ensure_guest(out: Path | None = None, *, force: bool = False,
                 progress: _Progress | None = _stderr_progress,
                 busybox: Path = BUSYBOX, flavour: Flavour = DEFAULT_FLAVOUR) -> GuestImage:
    """Build the guest in ``out`` (default ``./build/guest``, or the flavour's
    folder) unless it is current.

    Silent when nothing has to be done; ``progress`` gets one short line per
    step otherwise (None silences it). Raises :class:`GuestBuildError`.
    """
    out = (out if out is not None else default_out_dir(flavour)).resolve()
    report: _Progress = progress if progress is not None else (lambda _message: None)
    init = init_script()
    busybox_data = _check_busybox(busybox)
    busybox_sha256 = hashlib.sha256(busybox_data).hexdigest()
    closure = program_closure(flavour.programs) if flavour.programs else {}
    programs = _closure_hashes(closure)
    with _locked(out):
        manifest = _read_manifest(out / "manifest.json")
        stamp = f"{flavour.meta_package}:{apt_stamp()}"
        try:
            package = (_known_package(manifest, stamp)
                       or resolve_kernel_package(flavour.meta_package, progress=report))
        except GuestBuildError:
            # Offline with a good image for every other input: keep using it.
            if manifest and not force:
                recorded = manifest.get("inputs", {}).get("kernel_package", {})
                if inputs_match(manifest, _inputs(recorded, init, busybox_sha256,
                                                  flavour.roots, programs), out):
                    report("apt unavailable: using the kernel already built")
                    return _image(out, manifest)
            raise
        inputs = _inputs(package.as_json(), init, busybox_sha256, flavour.roots, programs)
        if not force and manifest is not None and inputs_match(manifest, inputs, out):
            if manifest.get("apt_stamp") != stamp:
                manifest = {**manifest, "apt_stamp": stamp, "kernel_url": package.url}
                _write_manifest(out, manifest)
            return _image(out, manifest)
        return _build(out, package, init, busybox, busybox_data, inputs, stamp, report,
                      flavour.roots, closure)


def _known_package(manifest: Mapping[str, Any] | None, stamp: str) -> KernelPackage | None:
    """The package apt named last time, if the apt state has not changed since."""
    if not manifest or manifest.get("apt_stamp") != stamp:
        return None
    recorded = manifest.get("inputs", {}).get("kernel_package")
    if not isinstance(recorded, dict):
        return None
    try:
        return KernelPackage(str(recorded["name"]), str(manifest.get("kernel_url", "")),
                             str(recorded["filename"]), int(recorded["size"]),
                             str(recorded["sha256"]))
    except (KeyError, ValueError, TypeError):
        return None


def _image(out: Path, manifest: Mapping[str, Any]) -> GuestImage:
    release = str(manifest["outputs"]["kernel_release"])
    return GuestImage(out / "vmlinuz", out / "initrd.img", out / "manifest.json", release)


def copy_image(image: GuestImage, dest: Path) -> GuestImage:
    """Copy a built guest to ``dest`` (e.g. next to a VM spec)."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in (image.kernel, image.initrd, image.manifest):
        shutil.copy2(path, dest / path.name)
    return GuestImage(dest / image.kernel.name, dest / image.initrd.name,
                      dest / image.manifest.name, image.kernel_release)
