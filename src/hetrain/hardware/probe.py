"""What this machine has: accelerators (as torch sees them), host RAM and CPU cores.

`probe()` describes the hardware so that planners can start from facts; it maps each GPU to
a catalog kind when its name is recognisable. It only asks torch and the operating system:
it must not run benchmarks (that is the profiler's job) and must not initialise a CUDA
context on a machine without GPUs. It works the same on a CPU-only machine, where the
accelerator list is empty.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from hetrain.hardware.catalog import match_torch_name


@dataclass(frozen=True)
class Accelerator:
    index: int
    name: str
    """Name as torch reports it, e.g. 'NVIDIA A100-SXM4-80GB'."""
    memory_bytes: int
    kind: str | None
    """Catalog kind this device maps to, or None when the name is not recognised."""


@dataclass(frozen=True)
class MachineInfo:
    accelerators: list[Accelerator] = field(default_factory=list)
    host_ram_bytes: int = 0
    host_ram_available_bytes: int = 0
    logical_cores: int = 1
    physical_cores: int = 1
    torch_threads: int = 1

    def summary(self) -> str:
        """One line per fact, for reports and `hetrain profile`."""
        lines = [f"host RAM: {self.host_ram_bytes / 2**30:.1f} GiB "
                 f"({self.host_ram_available_bytes / 2**30:.1f} GiB available)",
                 f"CPU cores: {self.physical_cores} physical, {self.logical_cores} logical; "
                 f"torch threads: {self.torch_threads}"]
        if not self.accelerators:
            lines.append("accelerators: none (CPU only)")
        for a in self.accelerators:
            lines.append(f"accelerator {a.index}: {a.name}, {a.memory_bytes / 2**30:.1f} GiB, "
                         f"kind {a.kind or 'unknown (not in the catalog)'}")
        return "\n".join(lines)


def _meminfo_bytes() -> tuple[int, int]:
    """(total, available) host RAM from /proc/meminfo, or from sysconf where it is absent."""
    try:
        values = {}
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) * 1024  # the file's unit is kB (KiB)
        total = values["MemTotal"]
        return total, values.get("MemAvailable", values.get("MemFree", total))
    except (OSError, KeyError, ValueError, IndexError):
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
        try:
            avail = page * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError):
            avail = total
        return total, avail


def _physical_cores() -> int:
    """Distinct (package, core) pairs from /proc/cpuinfo; the logical count where unreadable."""
    logical = os.cpu_count() or 1
    try:
        cores, package = set(), None
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    package = value.strip()
                elif key == "core id":
                    cores.add((package, value.strip()))
        return len(cores) or logical
    except OSError:
        return logical


def probe() -> MachineInfo:
    """Describe this machine. Never fails for lack of a GPU."""
    accelerators = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            kind = match_torch_name(props.name)
            accelerators.append(Accelerator(i, props.name, int(props.total_memory),
                                            kind.name if kind else None))
    total, avail = _meminfo_bytes()
    return MachineInfo(
        accelerators=accelerators,
        host_ram_bytes=total,
        host_ram_available_bytes=avail,
        logical_cores=os.cpu_count() or 1,
        physical_cores=_physical_cores(),
        torch_threads=torch.get_num_threads(),
    )
