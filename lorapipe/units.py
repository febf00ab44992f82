"""One way to say a size, everywhere lorapipe prints one: binary units (1 GiB = 2**30 bytes), as torch, the CUDA
driver and `free -h` count memory. Disk space and model sizes are said the same way, so a merged model's size and the
free disk it needs compare at a glance."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, model_validator

GIB = 2**30
MIB = 2**20
KIB = 2**10


def format_bytes(nbytes: float) -> str:
    """1536 -> '1.5 KiB', 3 * 2**30 -> '3.00 GiB': GiB with two decimals from 0.1 GiB up, MiB below, KiB and bytes
    for the small."""
    n = float(nbytes)
    if abs(n) >= GIB / 10:
        return f"{n / GIB:.2f} GiB"
    if abs(n) >= MIB:
        return f"{n / MIB:.0f} MiB"
    if abs(n) >= KIB:
        return f"{n / KIB:.1f} KiB"
    return f"{n:.0f} B"


def format_gib(gib: float) -> str:
    """A size already in GiB (the `*_gib` fields of plans and reports): "1.23 GiB", or MiB below 0.1 GiB."""
    return format_bytes(gib * GIB)


def format_count(n: float) -> str:
    """1800 -> '1.8k', 2_500_000 -> '2.5M', 950 -> '950' (tokens, rows, parameters)."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}"
    return f"{n:.0f}"


class ReadsGbNames(BaseModel):
    """Base of a model with `*_gib` fields: also reads them under the `*_gb` names that artifacts stored before
    2026-12-07 carry (the values were GiB then too, only the names said GB), so lineage and the dashboard still load
    a model version trained before the rename."""

    @model_validator(mode="before")
    @classmethod
    def _renamed_gb_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        renamed = {}
        for key, value in data.items():
            new = key.replace("_gb", "_gib", 1) if isinstance(key, str) and "_gb" in key and "_gib" not in key else key
            renamed[new if new in cls.model_fields and new not in data else key] = value
        return renamed
