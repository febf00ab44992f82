"""Probe the machine the train step will run on: CPU, RAM, disk, CUDA (via torch), Apple/MLX, packages.

This is the only module that looks at the hardware; the plan decides from what it returns. `machine_fingerprint`
is the cheap part of the probe (no torch import) that names the machine in preflight's cache key, so the same
config on another machine is planned again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from lorapipe.catalog import tracked_modules
from lorapipe.units import ReadsGbNames

# what the backends need (from the catalog), then what the rest of a run depends on
TRACKED_PACKAGES = [*tracked_modules(), *(m for m in ("accelerate", "datasets", "tokenizers", "zenml",
                                                       "great_expectations", "wandb") if m not in tracked_modules())]
_DIST_NAMES = {"great_expectations": "great-expectations", "mlx_lm": "mlx-lm"}


class CudaDevice(ReadsGbNames):
    index: int
    name: str
    total_memory_gib: float
    capability: str
    bf16: bool


class HardwareProbe(ReadsGbNames):
    os: str
    machine: str
    python: str
    cpu_count: int
    ram_total_gib: float
    ram_available_gib: float
    disk_free_gib: float
    disk_path: str
    cuda_available: bool
    cuda_devices: list[CudaDevice]
    apple_silicon: bool
    mps_available: bool
    packages: dict[str, Optional[str]]
    # Apple Silicon with mlx: the GPU's recommended working set (unified memory mlx should stay within)
    mlx_working_set_gib: Optional[float] = None

    @property
    def accelerator(self) -> str:
        """What trains fastest here, as a plan device: cuda, mps (Apple Silicon) or cpu."""
        return "cuda" if self.cuda_available else "mps" if self.apple_silicon else "cpu"

    @property
    def world_size(self) -> int:
        """The data-parallel processes this machine offers: one per visible CUDA GPU, else 1. The plan launches that
        many for `train.processes: auto` where the backend trains data-parallel (not an environment variable: the
        plan is decided before any process is launched)."""
        return max(1, len(self.cuda_devices))


def package_version(module: str) -> Optional[str]:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(_DIST_NAMES.get(module, module))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def package_versions(modules: list[str] = TRACKED_PACKAGES) -> dict[str, Optional[str]]:
    return {m: package_version(m) for m in modules}


def probe(disk_path: str = ".") -> HardwareProbe:
    import psutil
    import torch

    vm = psutil.virtual_memory()
    os.makedirs(disk_path, exist_ok=True)
    devices = []
    cuda = torch.cuda.is_available()
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(CudaDevice(index=i, name=p.name, total_memory_gib=round(p.total_memory / 2**30, 2),
                                      capability=f"{p.major}.{p.minor}", bf16=p.major >= 8))
    apple = platform.system() == "Darwin" and platform.machine() == "arm64"
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return HardwareProbe(
        mlx_working_set_gib=_mlx_working_set_gib() if apple else None,
        os=platform.system(), machine=platform.machine(), python=platform.python_version(),
        cpu_count=os.cpu_count() or 1, ram_total_gib=round(vm.total / 2**30, 2),
        ram_available_gib=round(vm.available / 2**30, 2),
        disk_free_gib=round(shutil.disk_usage(disk_path).free / 2**30, 2), disk_path=os.path.abspath(disk_path),
        cuda_available=cuda, cuda_devices=devices, apple_silicon=apple, mps_available=mps,
        packages=package_versions(),
    )


def _mlx_working_set_gib() -> Optional[float]:
    """mlx's recommended working-set size on Apple Silicon (GiB), where mlx is installed."""
    if importlib.util.find_spec("mlx") is None:
        return None
    try:
        import mlx.core as mx

        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        size = info.get("max_recommended_working_set_size")
        return round(size / 2**30, 2) if size else None
    except Exception:  # noqa: BLE001 - no Metal device: the RAM budget stands
        return None


def _gpu_inventory() -> list[str]:
    """CUDA devices as nvidia-smi names them (name, memory), without importing torch; [] where there is none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return []
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ["nvidia-smi failed"]
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] + (
        [f"visible: {visible}"] if visible else [])


def machine_fingerprint() -> str:
    """sha256 of what the plan depends on and does not change between two runs on one machine: OS, architecture,
    cores, total RAM, GPUs (as nvidia-smi lists them and CUDA_VISIBLE_DEVICES shows them: `train.processes: auto`
    follows them) and package versions. Free RAM and disk are left out, or every run would plan anew; a cached
    preflight does not check them again."""
    import psutil

    facts = {
        "os": platform.system(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "ram_total_gib": round(psutil.virtual_memory().total / 2**30), "gpus": _gpu_inventory(),
        "packages": package_versions(),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def free_bytes(path: str | Path) -> int:
    """Bytes free for this user on the filesystem that holds `path` (its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free
