"""What a shared library is built for and what it needs at load time, read from its ELF
headers (no binutils needed: apps and tests check exported kernels with this)."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

MACHINES = {3: "x86", 40: "arm", 62: "x86_64", 183: "aarch64"}
_SHT_DYNAMIC, _DT_NEEDED = 6, 1
# Libraries only glibc systems have: a library that needs one does not load on Android.
GLIBC_ONLY = ("libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "ld-linux-aarch64.so.1",
              "ld-linux-x86-64.so.2", "libstdc++.so.6", "libgcc_s.so.1")


class ElfError(ValueError):
    """A file that is not the 64-bit little-endian shared library it should be."""


@dataclass(frozen=True)
class ElfInfo:
    machine: str          # "aarch64", "x86_64", ...
    shared: bool          # ET_DYN
    needed: tuple[str, ...]


def read_elf(path: str | Path) -> ElfInfo:
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ElfError(f"{path}: not a 64-bit little-endian ELF file")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    needed = []
    for _, sh_type, _, _, off, size, link, _, _, _ in secs:
        if sh_type != _SHT_DYNAMIC:
            continue
        str_off = secs[link][4]
        for pos in range(off, off + size, 16):
            tag, val = struct.unpack_from("<qQ", data, pos)
            if tag == 0:
                break
            if tag == _DT_NEEDED:
                end = data.index(b"\0", str_off + val)
                needed.append(data[str_off + val:end].decode())
    return ElfInfo(MACHINES.get(e_machine, f"machine {e_machine}"), e_type == 3, tuple(needed))
