"""Kernel module metadata, read straight from the module files.

Theory of operation: Debian's linux-image package ships the modules but not
modules.dep (depmod writes that at install time, and the guest is never
installed on the host). Every module carries the same facts in its
``.modinfo`` ELF section as NUL-separated ``key=value`` strings, among them
``name``, ``depends`` (hard dependencies, by module name) and ``softdep``
(``pre: a b post: c``). This module reads that section with a small ELF64
section-table walk and computes an insmod order: every module after
everything it depends on, built-in modules (listed in modules.builtin)
skipped because they are already part of the kernel image.

Module names are compared with '-' and '_' treated alike, as the kernel does.
"""

from __future__ import annotations

import gzip
import lzma
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ElfError",
    "ModInfo",
    "ModuleOrderError",
    "has_interpreter",
    "load_order",
    "module_name",
    "parse_modinfo",
    "read_builtin",
    "read_module_bytes",
    "scan_modules",
]

_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_PT_INTERP = 3
_SHT_NOBITS = 8
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz")


class ElfError(ValueError):
    """The bytes are not a little-endian ELF64 file this reader understands."""


class ModuleOrderError(ValueError):
    """The wanted modules cannot be put in a load order (missing or cyclic)."""


def module_name(name: str) -> str:
    """Canonical module name: the kernel treats '-' and '_' as the same."""
    return name.replace("-", "_")


def _elf_header(image: bytes) -> tuple[int, int, int, int, int, int]:
    """Return (phoff, shoff, phentsize, phnum, shentsize, shnum) after checking the ident."""
    if len(image) < 64 or image[:4] != _ELF_MAGIC:
        raise ElfError("not an ELF file")
    if image[4] != _ELFCLASS64 or image[5] != _ELFDATA2LSB:
        raise ElfError("not a little-endian 64-bit ELF file")
    phoff, shoff = struct.unpack_from("<QQ", image, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", image, 0x36)
    return phoff, shoff, phentsize, phnum, shentsize, shnum


def _section(image: bytes, wanted: str) -> bytes | None:
    """The contents of the section called ``wanted``, or None if there is none."""
    _, shoff, _, _, shentsize, shnum = _elf_header(image)
    (shstrndx,) = struct.unpack_from("<H", image, 0x3E)
    if shnum == 0:
        return None
    if shentsize < 64 or shstrndx >= shnum or shoff + shnum * shentsize > len(image):
        raise ElfError("section header table out of range")

    def header(index: int) -> tuple[int, int, int, int]:
        base = shoff + index * shentsize
        name_off, sh_type = struct.unpack_from("<II", image, base)
        offset, size = struct.unpack_from("<QQ", image, base + 0x18)
        if sh_type != _SHT_NOBITS and offset + size > len(image):
            raise ElfError(f"section {index} extends past the end of the file")
        return name_off, sh_type, offset, size

    _, _, str_off, str_size = header(shstrndx)
    names = image[str_off:str_off + str_size]
    for index in range(shnum):
        name_off, sh_type, offset, size = header(index)
        if name_off >= len(names):
            raise ElfError(f"section {index} name out of range")
        end = names.find(b"\0", name_off)
        name = names[name_off:end if end >= 0 else len(names)].decode(errors="replace")
        if name == wanted:
            return b"" if sh_type == _SHT_NOBITS else image[offset:offset + size]
    return None


def has_interpreter(image: bytes) -> bool:
    """True if the ELF executable asks for a dynamic loader (so it is not static)."""
    phoff, _, phentsize, phnum, _, _ = _elf_header(image)
    if phnum and (phentsize < 56 or phoff + phnum * phentsize > len(image)):
        raise ElfError("program header table out of range")
    for index in range(phnum):
        (p_type,) = struct.unpack_from("<I", image, phoff + index * phentsize)
        if p_type == _PT_INTERP:
            return True
    return False


@dataclass(frozen=True, slots=True)
class ModInfo:
    """What one module says about itself."""

    name: str
    depends: tuple[str, ...] = ()
    softdep_pre: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("module without a name")


def _parse_softdep_pre(values: Iterable[str]) -> list[str]:
    """The 'pre:' names of softdep strings such as 'pre: crc64 post: foo'."""
    pre: list[str] = []
    for value in values:
        section = ""
        for word in value.split():
            if word.endswith(":"):
                section = word[:-1]
            elif section == "pre":
                pre.append(module_name(word))
    return pre


def parse_modinfo(image: bytes, fallback_name: str) -> ModInfo:
    """Read the .modinfo section of a module image.

    ``fallback_name`` (from the file name) is used when the module has no
    ``name=`` field, as older kernels did not write one.
    """
    section = _section(image, ".modinfo")
    if section is None:
        raise ElfError(f"{fallback_name}: no .modinfo section")
    fields: dict[str, list[str]] = {}
    for raw in section.split(b"\0"):
        key, sep, value = raw.decode(errors="replace").partition("=")
        if sep:
            fields.setdefault(key, []).append(value)
    name = module_name((fields.get("name") or [fallback_name])[0])
    depends = tuple(
        module_name(dep)
        for value in fields.get("depends", [])
        for dep in value.split(",")
        if dep
    )
    return ModInfo(name, depends, tuple(_parse_softdep_pre(fields.get("softdep", []))))


def read_module_bytes(path: Path) -> bytes:
    """The uncompressed module image (busybox insmod cannot read compressed ones)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


def _strip_suffix(filename: str) -> str | None:
    for suffix in _MODULE_SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)]
    return None


def scan_modules(root: Path) -> dict[str, Path]:
    """Map canonical module name to file, for every module under ``root``."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.ko*")):
        stem = _strip_suffix(path.name)
        if stem is not None and path.is_file():
            found.setdefault(module_name(stem), path)
    return found


def read_builtin(text: str) -> frozenset[str]:
    """Canonical names from a modules.builtin file (one 'kernel/.../x.ko' per line)."""
    names: set[str] = set()
    for line in text.splitlines():
        stem = _strip_suffix(line.strip().rpartition("/")[2])
        if stem:
            names.add(module_name(stem))
    return frozenset(names)


def load_order(
    roots: Sequence[str],
    lookup: Callable[[str], ModInfo | None] | Mapping[str, ModInfo],
    builtin: Iterable[str] = (),
) -> list[str]:
    """Modules to insmod, in an order where each follows all it depends on.

    ``roots`` are the modules wanted; hard dependencies are followed
    transitively and must exist (or be built in). Soft 'pre' dependencies
    are honoured when they name a module that exists, and ignored otherwise:
    they often name a crypto algorithm alias that only modprobe resolves.
    Roots are visited in the given order, dependencies in the order the
    module lists them, so the result is deterministic.
    """
    get = lookup.get if isinstance(lookup, Mapping) else lookup
    inside = frozenset(module_name(name) for name in builtin)
    order: list[str] = []
    done: set[str] = set()
    stack: list[str] = []

    def visit(name: str, required: bool, wanted_by: str | None) -> None:
        if name in inside or name in done:
            return
        if name in stack:
            cycle = " -> ".join([*stack[stack.index(name):], name])
            raise ModuleOrderError(f"module dependency cycle: {cycle}")
        info = get(name)
        if info is None:
            if required:
                who = f" (needed by {wanted_by})" if wanted_by else ""
                raise ModuleOrderError(f"module {name}{who} is neither built in nor shipped")
            return
        stack.append(name)
        for dep in info.softdep_pre:
            visit(dep, False, name)
        for dep in info.depends:
            visit(dep, True, name)
        stack.pop()
        done.add(name)
        order.append(name)

    for root in roots:
        visit(module_name(root), True, None)
    return order
