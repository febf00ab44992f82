"""Probe the machine the train step will run on: CPU, RAM, disk, CUDA (via torch), Apple/MLX, packages."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
from typing import Optional

from pydantic import BaseModel

# The packages each backend needs, with the command that installs them.
BACKEND_PACKAGES = {
    "hf": (["torch", "transformers", "peft", "trl"], "pip install -e ."),
    "unsloth": (["unsloth", "bitsandbytes"], "pip install -e '.[cuda]'"),
    "mlx": (["mlx", "mlx_lm"], "pip install -e '.[mlx]'  (Linux CPU: mlx[cpu])"),
}
TRACKED_PACKAGES = ["torch", "transformers", "peft", "trl", "accelerate", "datasets", "zenml", "great_expectations",
                    "bitsandbytes", "unsloth", "mlx", "mlx_lm", "wandb", "tokenizers"]
_DIST_NAMES = {"great_expectations": "great-expectations", "mlx_lm": "mlx-lm"}


class CudaDevice(BaseModel):
    index: int
    name: str
    total_memory_gb: float
    capability: str
    bf16: bool


class HardwareProbe(BaseModel):
    os: str
    machine: str
    python: str
    cpu_count: int
    ram_total_gb: float
    ram_available_gb: float
    disk_free_gb: float
    disk_path: str
    cuda_available: bool
    cuda_devices: list[CudaDevice]
    apple_silicon: bool
    mps_available: bool
    packages: dict[str, Optional[str]]


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
            devices.append(CudaDevice(index=i, name=p.name, total_memory_gb=round(p.total_memory / 2**30, 2),
                                      capability=f"{p.major}.{p.minor}", bf16=p.major >= 8))
    apple = platform.system() == "Darwin" and platform.machine() == "arm64"
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return HardwareProbe(
        os=platform.system(), machine=platform.machine(), python=platform.python_version(),
        cpu_count=os.cpu_count() or 1, ram_total_gb=round(vm.total / 2**30, 2),
        ram_available_gb=round(vm.available / 2**30, 2),
        disk_free_gb=round(shutil.disk_usage(disk_path).free / 2**30, 2), disk_path=os.path.abspath(disk_path),
        cuda_available=cuda, cuda_devices=devices, apple_silicon=apple, mps_available=mps,
        packages=package_versions(),
    )
