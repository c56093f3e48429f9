"""Units of bytes, FLOP/s and bandwidth, and how hetrain prints byte counts.

A leaf module: everything may import it, it imports nothing of hetrain. Binary prefixes
(KIB, MIB, GIB) for memory, decimal ones (GIGA, TERA) for rates, as datasheets give them.
"""

from __future__ import annotations

KIB, MIB, GIB, TIB = 2**10, 2**20, 2**30, 2**40
GIGA, TERA = 1e9, 1e12


def fmt_bytes(n: float) -> str:
    """'512 B', '3.5 MiB', '71.9 GiB': binary units, one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
