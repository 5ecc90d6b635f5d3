"""The plan: every setting a run will use, with the reason, shown before anything heavy loads."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from finetune import schema


@dataclass(frozen=True)
class Precision:
    weights: str  # dtype the base weights load in: bfloat16 | float16 | float32
    mixed: str  # Trainer autocast: "bf16" | "fp16" | "no"
    why: str


def precision(cfg: Any) -> Precision:
    """Pick the dtype from the hardware unless model.dtype pins it; warn when a pin cannot be honoured."""
    hw, wanted = cfg.hw, cfg.model.dtype
    if hw.num_gpus == 0:
        if wanted not in ("auto", "float32"):
            warnings.warn(f"model.dtype={wanted} is ignored on the CPU: training runs in float32.", stacklevel=2)
        return Precision("float32", "no", "CPU: float32 (half precision is slow and unstable there)")
    if wanted == "bfloat16" and not hw.bf16:
        warnings.warn(
            f"model.dtype=bfloat16 is ignored: {hw.name} has no bfloat16 math; using float16 with loss scaling.",
            stacklevel=2,
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
    return Precision(wanted, mixed, f"{hw.name}: {'bfloat16' if mixed == 'bf16' else 'float16 + loss scaling'}")


def model_arch(model_cfg: Any) -> dict:
    """The architecture to plan for: a local folder's config.json, else the model config's numbers."""
    local = Path(model_cfg.name_or_path).expanduser() / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    return OmegaConf.to_container(model_cfg.arch) if OmegaConf.is_config(model_cfg.arch) else dict(model_cfg.arch)


def count_params(arch: dict) -> int | None:
    """Exact parameter count of the architecture, built on the meta device (no memory, no weights)."""
    if not arch:
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.for_model(**arch)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    return sum(p.numel() for p in model.parameters())


def rows(cfg: Any) -> list[tuple[str, str, str]]:
    """(setting, value, why) for the plan table."""
    m, q, lo, b, o, hw, d, t = cfg.model, cfg.quant, cfg.lora, cfg.batch, cfg.optim, cfg.hw, cfg.data, cfg.train
    prec = precision(cfg)
    params = count_params(model_arch(m))
    accum = schema.grad_accum(cfg)
    gpus = max(hw.num_gpus, 1)
    out = [
        ("model", m.name_or_path, f"{params / 1e9:.2f}B parameters" if params else "architecture unknown"),
        ("hardware", hw.name, f"{hw.num_gpus} x {hw.gpu_memory_gb:g} GiB" if hw.num_gpus else "CPU only"),
        ("precision", prec.weights, prec.why),
    ]
    if q.load_in == "4bit":
        out.append(("quantization", f"4-bit {q.bnb_4bit_quant_type}", "double quant" if q.double_quant else ""))
    else:
        out.append(("quantization", q.load_in, "bitsandbytes LLM.int8()" if q.load_in == "8bit" else ""))
    if lo.enabled:
        targets = lo.target_modules if lo.target_modules is not None else m.lora_target_modules
        kind = "DoRA" if lo.use_dora else "LoRA"
        out.append(("adapters", f"{kind} r={lo.r} alpha={lo.alpha}", ",".join(targets)))
    else:
        out.append(("adapters", "none", "full fine-tune: every weight is trained"))
    out += [
        ("batch", f"{b.size} x {accum} x {gpus} = {b.size * accum * gpus}", "micro-batch x accumulation x GPUs"),
        ("optimizer", f"{o.name} lr={o.lr:g}", f"{o.lr_scheduler}, warmup {o.warmup_ratio:g}"),
        ("gradient checkpointing", "on" if t.gradient_checkpointing else "off", "recompute activations in backward"),
        ("data", d.name if d.name == "demo" else str(d.path), f"max_length={d.max_length}"),
        ("length", f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.epochs:g} epochs", ""),
    ]
    return out


def show(cfg: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"finetune plan: {cfg.model.name} on {cfg.hw.name}", title_justify="left")
    for column in ("setting", "value", "why"):
        table.add_column(column)
    for row in rows(cfg):
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # piped or logged: don't squeeze the table into 80 columns
        console = Console(width=120)
    console.print(table)
