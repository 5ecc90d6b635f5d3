"""What to plan for: the GPUs torch sees (hw=auto), or a named preset from configs/hw/."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune import config_dir, warn
from finetune.schema import Config


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


def driver_free_gib(visible: str | None = None) -> list[float] | None:
    """Free memory of each visible GPU as the driver reports it before this process opens a CUDA
    context (nvidia-smi), so that the plan, which adds the context itself, does not count it twice;
    None where nvidia-smi cannot say which GPUs torch sees (UUIDs in CUDA_VISIBLE_DEVICES, MIG)."""
    import os
    import subprocess

    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.free,mig.mode.current", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [[x.strip() for x in line.split(",")] for line in out.strip().splitlines() if line.strip()]
    if not rows or any(len(r) != 2 or not r[0].isdigit() or r[1] == "Enabled" for r in rows):
        return None
    if visible not in (None, ""):
        picked = [x.strip() for x in visible.split(",")]
        if not all(x.isdigit() and int(x) < len(rows) for x in picked):
            return None
        rows = [rows[int(x)] for x in picked]
    return [int(r[0]) / 1024 for r in rows]


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
    before_context = driver_free_gib()  # asked first: torch's figure comes after its own context
    import torch

    if not torch.cuda.is_available():
        return cpu
    count = torch.cuda.device_count()
    if before_context is not None and len(before_context) == count:
        free = min(before_context)
    else:  # torch's free memory already lacks this process's context, which the plan adds again
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


@dataclass(frozen=True)
class Precision:
    weights: str  # dtype the base weights load in: bfloat16 | float16 | float32
    mixed: str  # Trainer autocast: "bf16" | "fp16" | "no"
    why: str


def precision(cfg: Config) -> Precision:
    """Pick the dtype from the hardware unless model.dtype pins it; warn when a pin cannot be honoured."""
    hw, wanted = cfg.hw, cfg.model.dtype
    if hw.num_gpus == 0:
        if wanted not in ("auto", "float32"):
            warn(f"model.dtype={wanted} is ignored on the CPU: training runs in float32.")
        return Precision("float32", "no", "CPU: float32 (half precision is slow and unstable there)")
    if wanted == "bfloat16" and not hw.bf16:
        warn(
            f"model.dtype=bfloat16 is ignored: {hw.name} has no bfloat16 math; using float16 with loss scaling."
        )
        wanted = "float16"
    if wanted == "auto":
        wanted = "bfloat16" if hw.bf16 else "float16"
    if wanted == "float32":
        return Precision("float32", "no", "pinned by model.dtype")
    if wanted == "float16" and not cfg.lora.enabled:
        # Trained float16 weights underflow; keep float32 masters and autocast to fp16.
        return Precision("float32", "fp16", f"{hw.name}: fp16 autocast over float32 weights (full fine-tune)")
    mixed = "bf16" if wanted == "bfloat16" else "fp16"
    return Precision(
        wanted, mixed, f"{hw.name}: {'bfloat16' if mixed == 'bf16' else 'float16 + loss scaling'}"
    )
