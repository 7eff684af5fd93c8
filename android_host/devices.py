"""Device profiles: named data, one JSON file per device in `devices/`.

A profile holds what the runtime and the storage model need to know about a device: its
storage latency table (runtime_py.storage_model.StorageProfile), DRAM, and the TVM CPU
target string. `source` says where the numbers come from: "measured" (by `ripple probe
storage`, with the run's details) or "published figures" (vendor specifications, with
which figures and how the table was derived from them).
"""
from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..runtime_py.storage_model import StorageModelError, StorageProfile

DEVICES_DIR = Path(__file__).resolve().parents[1] / "devices"
FORMAT = "ripple-device-1"


class DeviceError(ValueError):
    """A device profile that is missing or malformed."""


@dataclass
class Device:
    name: str
    source: str                  # "measured" | "published figures"
    storage: StorageProfile
    dram_bytes: int              # physical DRAM of the device
    dram_budget_bytes: int       # DRAM the runtime may use for cached FFN bundles
    cpu_target: str              # TVM target string
    details: dict = field(default_factory=dict)   # how the numbers were obtained

    def to_json(self) -> dict:
        return {"format": FORMAT, "name": self.name, "source": self.source,
                "storage": self.storage.to_json(), "dram_bytes": int(self.dram_bytes),
                "dram_budget_bytes": int(self.dram_budget_bytes), "cpu_target": self.cpu_target,
                "details": self.details}

    @classmethod
    def from_json(cls, d: dict, where: str = "device profile") -> "Device":
        if d.get("format") != FORMAT:
            raise DeviceError(f"{where}: not a ripple device profile (format {d.get('format')!r})")
        try:
            return cls(str(d["name"]), str(d["source"]), StorageProfile.from_json(d["storage"]),
                       int(d["dram_bytes"]), int(d["dram_budget_bytes"]), str(d["cpu_target"]),
                       dict(d.get("details", {})))
        except KeyError as e:
            raise DeviceError(f"{where}: missing field {e}; write it with `ripple probe storage`") from None
        except StorageModelError as e:
            raise DeviceError(f"{where}: {e}") from None


def list_devices() -> list[str]:
    return sorted(p.stem for p in DEVICES_DIR.glob("*.json"))


def load_device(name_or_path: str | os.PathLike) -> Device:
    """A profile by file path, or by name from the shipped `devices/` folder."""
    p = Path(name_or_path)
    if not p.is_file():
        p = DEVICES_DIR / f"{name_or_path}.json"
    if not p.is_file():
        raise DeviceError(f"{name_or_path}: no such device profile; give a JSON file or one of "
                          f"{', '.join(list_devices()) or '(none shipped)'}")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DeviceError(f"{p}: not JSON ({e})") from None
    return Device.from_json(d, str(p))


def save_device(path: str | os.PathLike, dev: Device) -> None:
    from ..atomic_file import write_json
    write_json(path, dev.to_json())


def host_cpu_target() -> str:
    """TVM target string for this machine's CPU."""
    cores = os.cpu_count() or 1
    triple = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(platform.machine(),
                                                                                platform.machine())
    return f"llvm -mtriple={triple} -mcpu=native -num-cores={cores}"


def host_dram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def published_table(qd1_4k_latency_us: float, max_iops_4k: float, seq_MBps: float,
                    sizes: list[int], qds: list[int]) -> StorageProfile:
    """A latency table from three published figures, for devices we cannot probe:
    one request alone takes t0 + size / B; with q in flight the device serves one every
    max((t0 + size / B) / q, 1 / IOPS_max, size / B) (Little's law, the IOPS ceiling, the
    bandwidth ceiling), and latency = q x that."""
    B = seq_MBps * 1e6
    t0 = qd1_4k_latency_us * 1e-6 - 4096 / B
    s = np.array(sizes, dtype=np.float64)[:, None]
    q = np.array(qds, dtype=np.float64)[None, :]
    service = np.maximum.reduce([(t0 + s / B) / q, np.full_like(s * q, 1.0 / max_iops_4k), s / B + 0 * q])
    return StorageProfile(np.array(sizes), np.array(qds), service * q * 1e6, seq_MBps)
