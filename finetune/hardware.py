"""What to plan for: the GPUs torch sees (hw=auto), or a named preset from configs/hw/."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from finetune import config_dir


def presets() -> list[dict]:
    """Every GPU preset (configs/hw/*.yaml except cpu and auto), smallest memory first."""
    found = []
    for path in (config_dir() / "hw").glob("*.yaml"):
        spec = yaml.safe_load(path.read_text())
        if spec.get("num_gpus", 0) > 0:
            found.append(spec)
    return sorted(found, key=lambda s: (s["gpu_memory_gb"], -s["tflops"]))


def _no_nvidia_driver() -> bool:
    # Cheap check first: importing torch costs ~2 s, too much for planning on a machine without a GPU.
    return shutil.which("nvidia-smi") is None and not Path("/dev/nvidiactl").exists()


def detect() -> dict[str, Any]:
    """The hw fields for this machine: GPU count, free memory of the fullest GPU, capabilities."""
    cpu = {
        "name": "cpu",
        "num_gpus": 0,
        "gpu_memory_gb": 0.0,
        "compute_capability": None,
        "bf16": False,
        "flash_attention": False,
        "tflops": 0.0,
    }
    if _no_nvidia_driver():
        return cpu
    import torch

    if not torch.cuda.is_available():
        return cpu
    count = torch.cuda.device_count()
    free = min(torch.cuda.mem_get_info(i)[0] for i in range(count)) / 2**30
    props = torch.cuda.get_device_properties(0)
    capability = float(f"{props.major}.{props.minor}")
    known = next((p for p in presets() if p.get("match") and re.search(p["match"], props.name)), {})
    return {
        "name": known.get("name", props.name),
        "num_gpus": count,
        "gpu_memory_gb": round(free, 2),
        "compute_capability": capability,
        "bf16": torch.cuda.is_bf16_supported(),
        "flash_attention": capability >= 8.0,
        "tflops": known.get("tflops", 0.0),
    }


def has_flash_attn() -> bool:
    """Is the flash-attn package installed (FlashAttention-2 kernels for transformers)?"""
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None
