"""``foundation info``: what a bug report needs (versions, devices, domains, objectives)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from foundation.domain import list_domains
from foundation.ssl.registry import list_objectives

_PACKAGES = (
    "foundation",
    "torch",
    "torchvision",
    "timm",
    "monai",
    "rasterio",
    "openslide-python",
    "openslide-bin",
    "nibabel",
    "pydicom",
    "albumentations",
    "h5py",
    "safetensors",
)


def environment_info() -> dict[str, Any]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": devices,
        "cpu_threads": torch.get_num_threads(),
        "distributed_backends": {
            "gloo": torch.distributed.is_gloo_available(),
            "nccl": torch.distributed.is_nccl_available(),
        },
        "domains": list_domains(),
        "ssl_methods": list_objectives(),
    }
