"""The device catalog: datasheet figures of every accelerator kind hetrain can plan for.

The figures live in the packaged data file `catalog.toml` (one table per kind, each citing
its datasheet); this module reads it once, converts the human units of the file to bytes,
bytes/s and FLOP/s, and looks kinds up by name. It must not measure anything or guess
figures for a kind it does not know: an unknown kind is a ConfigError that lists the known
ones. Measured figures come from the profiler and are kept apart from these.
"""

from __future__ import annotations

import difflib
import functools
import re
import sys
from dataclasses import dataclass, field
from importlib import resources

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from hetrain.errors import ConfigError
from hetrain.units import GIB, GIGA, TERA

DTYPES = ("bf16", "fp16", "fp32")

_REQUIRED_KEYS = ("vendor", "memory_gib", "mem_bw_gbytes_per_s", "host_link_gbytes_per_s",
                  "collective_backend", "source")
_BACKENDS = ("nccl", "rccl", "hccl", "gloo")


@dataclass(frozen=True)
class DeviceKind:
    """One accelerator kind as its datasheet describes it; all figures are peaks."""

    name: str
    vendor: str
    memory_bytes: int
    peak_flops: dict[str, float]
    """Dense peak FLOP/s by compute dtype ("bf16", "fp16", "fp32"); unsupported dtypes are absent."""
    mem_bw_bytes_per_s: float
    host_link_bytes_per_s: float
    """Host <-> device bandwidth per direction."""
    host_link: str
    collective_backend: str
    """torch.distributed backend name of the vendor's collective library."""
    source: str
    """The datasheet the figures come from."""
    note: str = ""
    torch_names: tuple[str, ...] = field(default=())
    """Regular expressions matched against torch.cuda.get_device_name()."""
    matmul_curve: tuple[float, float, float] | None = None
    """(max matmul efficiency, fixed seconds per GEMM, attention efficiency) where the catalog
    gives them (keys matmul_efficiency, matmul_overhead_us, attention_efficiency, all three);
    None: hetrain.predict.roofline's default for the kind's class of device."""

    @property
    def collectives_beside_compute(self) -> bool:
        """Whether its collectives run beside its compute (an accelerator's library), so a reduction
        can hide behind a backward; False for gloo, which reduces on the cores that compute."""
        return self.collective_backend != "gloo"

    def peak_flops_per_s(self, dtype: str = "bf16") -> float:
        """Dense peak for `dtype`; bf16 falls back to fp16 on kinds without native bf16 (V100)."""
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        if dtype == "bf16" and "fp16" in self.peak_flops:
            return self.peak_flops["fp16"]
        raise ConfigError(f"device kind '{self.name}' has no published {dtype} peak; "
                          f"it supports {', '.join(self.peak_flops) or 'none'}")


def _kind_from_table(name: str, table: dict) -> DeviceKind:
    missing = [k for k in _REQUIRED_KEYS if k not in table]
    if missing:
        raise ConfigError(f"catalog kind '{name}' lacks {', '.join(missing)}")
    if table["collective_backend"] not in _BACKENDS:
        raise ConfigError(f"catalog kind '{name}': collective_backend must be one of {', '.join(_BACKENDS)}")
    peaks = {d: float(table[f"peak_{d}_tflops"]) * TERA for d in DTYPES if f"peak_{d}_tflops" in table}
    if not peaks:
        raise ConfigError(f"catalog kind '{name}' has no peak_<dtype>_tflops figure")
    return DeviceKind(
        name=name,
        vendor=str(table["vendor"]),
        memory_bytes=int(float(table["memory_gib"]) * GIB),
        peak_flops=peaks,
        mem_bw_bytes_per_s=float(table["mem_bw_gbytes_per_s"]) * GIGA,
        host_link_bytes_per_s=float(table["host_link_gbytes_per_s"]) * GIGA,
        host_link=str(table.get("host_link", "")),
        collective_backend=str(table["collective_backend"]),
        source=str(table["source"]),
        note=str(table.get("note", "")),
        torch_names=tuple(table.get("torch_names", ())),
        matmul_curve=_curve(name, table),
    )


_CURVE_KEYS = ("matmul_efficiency", "matmul_overhead_us", "attention_efficiency")


def _curve(name: str, table: dict) -> tuple[float, float, float] | None:
    given = [k for k in _CURVE_KEYS if k in table]
    if not given:
        return None
    if len(given) < len(_CURVE_KEYS):
        raise ConfigError(f"catalog kind '{name}' gives {', '.join(given)} but not all of {', '.join(_CURVE_KEYS)}")
    eff, overhead_us, attn = (float(table[k]) for k in _CURVE_KEYS)
    if not (0 < eff <= 1 and 0 < attn <= 1 and overhead_us >= 0):
        raise ConfigError(f"catalog kind '{name}': efficiencies must be in (0, 1] and the overhead at least 0")
    return eff, overhead_us * 1e-6, attn


def parse_catalog(text: str) -> dict[str, DeviceKind]:
    """Device kinds from catalog TOML text, in file order."""
    doc = tomllib.loads(text)
    return {name: _kind_from_table(name, table) for name, table in doc.items()}


@functools.lru_cache(maxsize=1)
def _packaged_catalog() -> tuple[tuple[str, DeviceKind], ...]:
    text = resources.files("hetrain.hardware").joinpath("catalog.toml").read_text(encoding="utf-8")
    return tuple(parse_catalog(text).items())


def load_catalog() -> dict[str, DeviceKind]:
    """All kinds of the packaged catalog by name (a fresh dict; the file is read once)."""
    return dict(_packaged_catalog())


def get_kind(name: str) -> DeviceKind:
    """The catalog kind called `name` (case-insensitive); ConfigError listing the known kinds otherwise."""
    catalog = load_catalog()
    by_lower = {k.lower(): kind for k, kind in catalog.items()}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    near = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.5)
    hint = f" (did you mean '{by_lower[near[0]].name}'?)" if near else ""
    raise ConfigError(f"unknown device kind '{name}'{hint}; known kinds: {', '.join(catalog)}")


def match_torch_name(device_name: str) -> DeviceKind | None:
    """The catalog kind whose torch_names pattern matches a torch device name, or None."""
    for kind in load_catalog().values():
        if any(re.search(p, device_name, re.IGNORECASE) for p in kind.torch_names):
            return kind
    return None
