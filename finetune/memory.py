"""Analytic estimate of peak training memory per GPU, by component.

The estimator reads a Hugging Face ``config.json`` dict (``arch``) and the run settings and adds up the
bytes that are alive at the peak of one training step of the Hugging Face + PEFT + TRL stack:

* weights      -- the base model as it sits on the GPU (bf16 / fp32 / bitsandbytes int8 or NF4/FP4);
* adapter      -- LoRA / DoRA matrices and PEFT ``modules_to_save`` copies (the trainable extras);
* gradients    -- one gradient per trainable parameter, in the parameter's dtype;
* optimizer    -- optimizer state plus the transient buffers of one optimizer step;
* activations  -- the tensors autograd saves for backward plus the largest backward working set,
                  including the LM head (logits, float32 upcast, loss gradient);
* overhead     -- CUDA context and allocator slack (reserved minus allocated).

``total_gib`` is the modelled peak, *not* always the plain sum: with one micro-batch per optimizer
step the gradients only reach their full size at the end of backward, when the activations are gone,
so the peak is the larger of "activations + early gradients" and "all gradients + optimizer step".
With gradient accumulation the gradients stay alive across micro-batches and both add up.

Every number comes from a mechanism (which tensor exists, its shape, its dtype); nothing is fitted
per data point.  ``scripts/fake_tensor_check.py`` checks the tensor accounting against PyTorch's
``MemTracker`` under fake tensors and ``scripts/calibrate.py`` scores totals against published
measurements (results in BENCHMARKS.md).

This module deliberately imports neither torch nor transformers: planning must stay instant and
must work on machines without them.  Only :func:`reference_param_count` imports them, lazily.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

GIB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

CUDA_CONTEXT_GIB = 1.0
"""What a training process holds outside torch's allocator: the CUDA context and the kernel images of
torch, cuBLAS/cuBLASLt and attention libraries loaded as the step first runs them, plus their
handles and workspaces. ~0.5 GiB right after ``torch.zeros(1).cuda()`` with lazy module loading;
a process that has run a full training step sits near 1 GiB (the HF single-GPU guide measured 1.3
GiB before any tensor without lazy loading)."""

ALLOCATOR_SLACK = 0.06
"""Reserved-minus-allocated slack of PyTorch's caching allocator, as a fraction of the allocated peak.
Training loops that allocate the same shapes every step settle at a few percent of fragmentation;
6% is the middle of what ``torch.cuda.memory_stats`` shows for LLM fine-tuning (4-10%)."""

NF4_BLOCK = 64  # bitsandbytes 4-bit: one absmax per 64 weights
NF4_DQ_BLOCK = 256  # double quantization: the 8-bit absmaxes are themselves quantized in blocks of 256
BNB_OPTIM_BLOCK = 256  # bitsandbytes blockwise 8-bit optimizers: one fp32 absmax per 256 values
BNB_OPTIM_MIN_8BIT = 4096  # bitsandbytes keeps tensors smaller than this in 32-bit state
TRL_LOGPROB_TILE = (4096, 32768)  # TRL's chunked log-prob kernel: tokens x vocab tile in compute dtype

OPTIMIZERS = (
    "adamw",
    "adamw_8bit",
    "paged_adamw",
    "paged_adamw_8bit",
    "adafactor",
    "galore",
    "galore_8bit",
    "sgd",
)


# --------------------------------------------------------------------------------------------
# Settings and result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything about a run that changes its memory. Defaults follow our pipeline (TRL SFTTrainer)."""

    quant: str = "none"  # "none" | "8bit" | "4bit" (bitsandbytes LLM.int8 / NF4|FP4)
    bnb_4bit_quant_type: str = "nf4"  # "nf4" | "fp4": validated only; both store 4 bits + the same scales
    double_quant: bool = True
    lora_r: int | None = 16  # None = full fine-tune (all params trained)
    lora_targets: tuple[str, ...] = ("all-linear",)  # module names like q_proj,... or "all-linear"
    use_dora: bool = False
    lora_dropout: float = 0.0  # > 0 makes every adapted module save a dropped-out copy of its input
    modules_to_save: tuple[str, ...] = ()  # e.g. ("embed_tokens", "lm_head"): PEFT trains full copies
    adapter_dtype: str = "auto"  # auto: bf16 on quantized bases (TRL casts them), else fp32 (PEFT upcasts)
    optim: str = "adamw"  # one of OPTIMIZERS
    fused_optimizer: bool = True  # HF default adamw_torch_fused; False = foreach (one state-sized temp)
    galore_rank: int = 128
    galore_retain_grad: bool = True  # False = per-layer update (GaLore 'layerwise': no full gradient kept)
    batch_size: int = 1  # micro-batch per device
    seq_len: int = 512
    grad_accum: int = 1  # > 1 keeps all gradients alive while the next micro-batch runs forward
    grad_ckpt: bool = True
    attn: str = "sdpa"  # sdpa | flash_attention_2 | eager
    dtype: str = "bfloat16"  # compute/weight dtype: bfloat16 | float16 | float32
    master_weights_fp32: bool = False  # mixed precision with fp32 weights ("amp-fp32-master")
    packed: bool = False  # packed / padding-free batches: no padding mask, so SDPA keeps GQA un-repeated
    kbit_fp32_upcast: bool = False  # peft.prepare_model_for_kbit_training: non-quantized weights in fp32
    quantize_vision: bool = True  # bitsandbytes converts every nn.Linear, the vision tower's included
    # full: HF's loss on materialised logits (what published runs measured; the safe default) |
    # chunked: torchtune-style | fused: no logits (TRL >= 1.x SFTTrainer patches such an LM head)
    loss_impl: str = "full"
    opt_in_backward: bool = False  # optimizer step inside backward hooks: one gradient alive at a time
    offload_activations: bool = False  # checkpointed layer inputs kept in host memory
    image_patches: int = 0  # VLMs: vision-tower patches per sample (before the 2x2 merge)


@dataclass
class Estimate:
    """Peak memory per GPU by component, all in GiB (2**30 bytes). See the module docstring."""

    weights_gib: float
    adapter_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    overhead_gib: float
    total_gib: float

    def as_dict(self) -> dict:
        return {f.name: round(getattr(self, f.name), 4) for f in fields(self)}


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts; ``pc["total"]`` equals ``sum(p.numel())`` of the transformers model.

    ``attention``/``mlp``/``experts``/``router``/``norms`` are summed over all decoder layers;
    ``other`` holds per-layer extras (e.g. gpt-oss attention sinks) and encoder heads.
    """

    total: int
    embeddings: int
    lm_head: int  # 0 when tied to the embeddings
    attention: int
    mlp: int
    experts: int
    router: int
    norms: int
    vision: int
    other: int

    def __getitem__(self, key: str) -> int:
        return getattr(self, key)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# --------------------------------------------------------------------------------------------
# Architecture description
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Linear:
    """One nn.Linear per decoder layer (or vision block)."""

    name: str  # the module's own name (q_proj, qkv_proj, dense_h_to_4h, fc1, ...)
    aliases: tuple[str, ...]  # canonical llama names it implements (phi-3 qkv_proj = q_proj,k_proj,v_proj)
    in_f: int
    out_f: int
    bias: bool
    group: str  # "attention" | "mlp" | "vision"

    @property
    def params(self) -> int:
        return self.in_f * self.out_f + (self.out_f if self.bias else 0)


@dataclass(frozen=True)
class _Vision:
    depth: int
    embed_dim: int
    heads: int
    mlp_dim: int
    patch_params: int  # Conv3d patch embedding (not an nn.Linear: never quantized)
    linears: tuple[_Linear, ...]  # per block
    norm_params: int  # per block
    merger_linears: tuple[_Linear, ...]
    merger_norm_params: int

    @property
    def params(self) -> int:
        block = sum(lin.params for lin in self.linears) + self.norm_params
        merger = sum(lin.params for lin in self.merger_linears) + self.merger_norm_params
        return self.patch_params + self.depth * block + merger


@dataclass(frozen=True)
class _Arch:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int
    tied: bool
    linears: tuple[_Linear, ...]  # per layer, attention + dense MLP
    norm_params: int  # per layer
    norm_kind: str  # "rms" (fp32 upcast inside) | "layer" (nn.LayerNorm)
    norms_per_layer: int
    gated_mlp: bool
    embed_params: int  # token (+ position / token-type) embeddings
    lm_head_bias: bool
    final_norm_params: int
    experts: int = 0
    top_k: int = 0
    expert_params: int = 0  # per expert per layer, biases included
    expert_saved: int = 0  # intermediate-sized tensors one (token, expert) pair keeps for backward
    router_params: int = 0  # per layer
    layer_other_params: int = 0  # per layer (attention sinks, ...)
    head_other_params: int = 0  # encoder pooler + classifier
    encoder: bool = False  # BERT-style: classification head, bidirectional attention, no LM head
    dropout: float = 0.0  # attention-probability dropout active in training
    hidden_dropout: float = 0.0
    attn_softcap: bool = False
    final_softcap: bool = False
    attn_sinks: bool = False
    sdpa_supported: bool = True
    fused_qkv: bool = False  # one qkv Linear: the saved V is a view that keeps the whole output alive
    parallel_block: bool = False  # attention and MLP read the same norm output (phi, neox, falcon)
    gelu_composite: bool = False  # phi's gelu_new is written out in tensor ops that save ~4 tensors
    vision: _Vision | None = None

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


# Family defaults transformers' config classes use when config.json leaves a key out.
_TIED_DEFAULT = {"gemma": True, "gemma2": True, "falcon": True, "bert": True}
_RMS_FAMILIES = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "phi3",
    "mixtral",
    "gpt_oss",
    "qwen2_vl",
}


def _text_config(arch: dict) -> dict:
    """VLM configs may nest the language model under text_config (transformers 5) or keep it flat."""
    text = arch.get("text_config")
    return {**arch, **text} if isinstance(text, dict) else arch


def _parse(arch: dict) -> _Arch:
    cfg = _text_config(arch)
    mt = arch.get("model_type")
    if mt is None:
        raise ValueError("arch has no 'model_type': pass the model's config.json as a dict")
    try:
        h = cfg["hidden_size"]
        layers = cfg["num_hidden_layers"]
        heads = cfg["num_attention_heads"]
        vocab = cfg["vocab_size"]
    except KeyError as e:
        raise ValueError(f"arch ({mt}) lacks {e.args[0]!r}; it is needed to estimate memory") from e
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or h // heads
    inter = cfg.get("intermediate_size") or cfg.get("ffn_hidden_size") or 4 * h
    tied = cfg.get("tie_word_embeddings", _TIED_DEFAULT.get(mt, False))
    q, kvd = heads * head_dim, kv * head_dim

    def lin(name, aliases, i, o, bias, group):
        return _Linear(name, tuple(aliases), i, o, bool(bias), group)

    common = dict(
        model_type=mt,
        hidden=h,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        head_dim=head_dim,
        inter=inter,
        vocab=vocab,
        tied=tied,
        embed_params=vocab * h,
        lm_head_bias=False,
        final_norm_params=h,
        norm_kind="rms",
        gated_mlp=True,
    )

    if mt in _RMS_FAMILIES:
        abias = cfg.get("attention_bias", False)
        qkv_bias, o_bias = (True, False) if mt in ("qwen2", "qwen2_vl") else (abias, abias)
        if mt == "phi3":  # fused projections
            attn = [
                lin("qkv_proj", ("q_proj", "k_proj", "v_proj"), h, q + 2 * kvd, False, "attention"),
                lin("o_proj", ("o_proj",), q, h, False, "attention"),
            ]
        else:
            attn = [
                lin("q_proj", ("q_proj",), h, q, qkv_bias, "attention"),
                lin("k_proj", ("k_proj",), h, kvd, qkv_bias, "attention"),
                lin("v_proj", ("v_proj",), h, kvd, qkv_bias, "attention"),
                lin("o_proj", ("o_proj",), q, h, o_bias, "attention"),
            ]
        mbias = cfg.get("mlp_bias", False)
        if mt == "phi3":
            mlp = [
                lin("gate_up_proj", ("gate_proj", "up_proj"), h, 2 * inter, False, "mlp"),
                lin("down_proj", ("down_proj",), inter, h, False, "mlp"),
            ]
        elif mt in ("mixtral", "gpt_oss"):
            mlp = []  # experts are 3-D parameters, not nn.Linear (see below)
        else:
            mlp = [
                lin("gate_proj", ("gate_proj",), h, inter, mbias, "mlp"),
                lin("up_proj", ("up_proj",), h, inter, mbias, "mlp"),
                lin("down_proj", ("down_proj",), inter, h, mbias, "mlp"),
            ]
        norms_per_layer = 4 if mt == "gemma2" else 2
        a = _Arch(
            **common,
            linears=tuple(attn + mlp),
            norm_params=norms_per_layer * h + (2 * head_dim if mt == "qwen3" else 0),
            fused_qkv=mt == "phi3",
            norms_per_layer=norms_per_layer,
            attn_softcap=mt == "gemma2" and cfg.get("attn_logit_softcapping", 50.0) is not None,
            final_softcap=mt == "gemma2" and cfg.get("final_logit_softcapping", 30.0) is not None,
            # SDPA cannot soft-cap attention logits: transformers runs Gemma-2 eager (or flash)
            sdpa_supported=mt != "gemma2",
            dropout=cfg.get("attention_dropout", 0.0) or 0.0,
        )
        if mt == "mixtral":
            e = cfg.get("num_local_experts", 8)
            a = replace(
                a,
                experts=e,
                top_k=cfg.get("num_experts_per_tok", 2),
                expert_params=3 * h * inter,
                expert_saved=3,  # gate_up output (2 x ffn) + SiLU(gate) (ffn)
                router_params=e * h,
            )
        elif mt == "gpt_oss":
            # The hub ships gpt-oss expert weights in MXFP4; our training path dequantizes them to the
            # compute dtype on load, so they are counted (and stored) as bf16 here.
            e = cfg.get("num_local_experts", 32)
            a = replace(
                a,
                experts=e,
                top_k=cfg.get("num_experts_per_tok", cfg.get("experts_per_token", 4)),
                expert_params=3 * h * inter + 2 * inter + h,
                expert_saved=6,  # gate_up (2 x ffn), clamped gate, sigmoid, up + 1, gated product
                router_params=e * h + e,
                layer_other_params=heads,  # attention sinks
                attn_sinks=True,
                sdpa_supported=False,  # sinks are not expressible in SDPA: transformers runs eager
            )
        if mt == "qwen2_vl":
            a = replace(a, vision=_parse_qwen2_vl_vision(arch["vision_config"], h))
        return a

    if mt == "phi":  # phi-1.5 / phi-2: parallel attention + MLP from one LayerNorm, biases everywhere
        return _Arch(
            **{
                **common,
                "norm_kind": "layer",
                "gated_mlp": False,
                "lm_head_bias": True,
                "final_norm_params": 2 * h,
            },
            linears=(
                lin("q_proj", ("q_proj",), h, q, True, "attention"),
                lin("k_proj", ("k_proj",), h, kvd, True, "attention"),
                lin("v_proj", ("v_proj",), h, kvd, True, "attention"),
                lin("dense", ("o_proj",), q, h, True, "attention"),
                lin("fc1", ("up_proj",), h, inter, True, "mlp"),
                lin("fc2", ("down_proj",), inter, h, True, "mlp"),
            ),
            norm_params=2 * h,
            norms_per_layer=1,
            parallel_block=True,
            gelu_composite=cfg.get("hidden_act", "gelu_new") == "gelu_new",
            dropout=cfg.get("attention_dropout", 0.0) or 0.0,
            hidden_dropout=cfg.get("resid_pdrop", 0.0) or 0.0,
        )

    if mt == "gpt_neox":
        return _Arch(
            **{**common, "norm_kind": "layer", "gated_mlp": False, "final_norm_params": 2 * h},
            linears=(
                lin("query_key_value", ("q_proj", "k_proj", "v_proj"), h, 3 * h, True, "attention"),
                lin("dense", ("o_proj",), h, h, True, "attention"),
                lin("dense_h_to_4h", ("up_proj",), h, inter, True, "mlp"),
                lin("dense_4h_to_h", ("down_proj",), inter, h, True, "mlp"),
            ),
            norm_params=4 * h,
            norms_per_layer=2,
            fused_qkv=True,
        )

    if mt == "falcon":
        if cfg.get("new_decoder_architecture"):
            qkv_out = (heads + 2 * kv) * head_dim
            n_ln = cfg.get("num_ln_in_parallel_attn") or 2
        else:
            qkv_out = h + 2 * head_dim if cfg.get("multi_query", True) else 3 * h
            kv = 1 if cfg.get("multi_query", True) else heads
            n_ln = 1 if cfg.get("parallel_attn", True) else 2
        ffn = cfg.get("ffn_hidden_size") or 4 * h
        bias = cfg.get("bias", False)
        return _Arch(
            **{
                **common,
                "norm_kind": "layer",
                "gated_mlp": False,
                "kv_heads": kv,
                "inter": ffn,
                "final_norm_params": 2 * h,
            },
            linears=(
                lin("query_key_value", ("q_proj", "k_proj", "v_proj"), h, qkv_out, bias, "attention"),
                lin("dense", ("o_proj",), h, h, bias, "attention"),
                lin("dense_h_to_4h", ("up_proj",), h, ffn, bias, "mlp"),
                lin("dense_4h_to_h", ("down_proj",), ffn, h, bias, "mlp"),
            ),
            norm_params=n_ln * 2 * h,
            norms_per_layer=n_ln,
            fused_qkv=True,
            parallel_block=n_ln == 1 and cfg.get("parallel_attn", True),
        )

    if mt == "bert":  # counted as AutoModelForSequenceClassification (pooler + classifier)
        labels = cfg.get("num_labels", len(cfg.get("id2label", {})) or 2)
        embed = (vocab + cfg.get("max_position_embeddings", 512) + cfg.get("type_vocab_size", 2)) * h + 2 * h
        return _Arch(
            **{
                **common,
                "norm_kind": "layer",
                "gated_mlp": False,
                "tied": True,
                "embed_params": embed,
                "final_norm_params": 0,
            },
            linears=(
                lin("query", ("q_proj",), h, h, True, "attention"),
                lin("key", ("k_proj",), h, h, True, "attention"),
                lin("value", ("v_proj",), h, h, True, "attention"),
                lin("dense", ("o_proj",), h, h, True, "attention"),
                lin("intermediate", ("up_proj",), h, inter, True, "mlp"),
                lin("output", ("down_proj",), inter, h, True, "mlp"),
            ),
            norm_params=4 * h,
            norms_per_layer=2,
            head_other_params=h * h + h + h * labels + labels,
            encoder=True,
            dropout=cfg.get("attention_probs_dropout_prob", 0.1),
            hidden_dropout=cfg.get("hidden_dropout_prob", 0.1),
        )

    raise ValueError(
        f"model_type {mt!r} is not supported by the memory estimator; supported: "
        f"{sorted(_RMS_FAMILIES | {'phi', 'gpt_neox', 'falcon', 'bert'})}"
    )


def _parse_qwen2_vl_vision(v: dict, text_hidden: int) -> _Vision:
    ed = v.get("embed_dim", 1280)
    mlp_dim = int(ed * v.get("mlp_ratio", 4))
    merge = v.get("spatial_merge_size", 2) ** 2 * ed
    patch = (
        v.get("in_chans", v.get("in_channels", 3))
        * v.get("temporal_patch_size", 2)
        * v.get("patch_size", 14) ** 2
    )
    out = v.get("hidden_size", text_hidden)
    return _Vision(
        depth=v.get("depth", 32),
        embed_dim=ed,
        heads=v.get("num_heads", 16),
        mlp_dim=mlp_dim,
        patch_params=patch * ed,
        linears=(
            _Linear("qkv", ("q_proj", "k_proj", "v_proj"), ed, 3 * ed, True, "vision"),
            _Linear("proj", ("o_proj",), ed, ed, True, "vision"),
            _Linear("fc1", ("up_proj",), ed, mlp_dim, True, "vision"),
            _Linear("fc2", ("down_proj",), mlp_dim, ed, True, "vision"),
        ),
        norm_params=4 * ed,
        merger_linears=(
            _Linear("mlp.0", (), merge, merge, True, "vision"),
            _Linear("mlp.2", (), merge, out, True, "vision"),
        ),
        merger_norm_params=2 * ed,
    )


# --------------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------------


def count_params(arch: dict) -> ParamCount:
    """Exact parameter count of the transformers model built from ``arch`` (see tests)."""
    a = _parse(arch)
    L = a.layers
    attention = L * (sum(lin.params for lin in a.linears if lin.group == "attention"))
    mlp = L * (sum(lin.params for lin in a.linears if lin.group == "mlp"))
    experts = L * a.experts * a.expert_params
    router = L * a.router_params
    norms = L * a.norm_params + a.final_norm_params
    # tied heads share the embedding; an encoder's classification head is counted in `other`
    lm_head = 0 if (a.tied or a.encoder) else a.vocab * a.hidden + (a.vocab if a.lm_head_bias else 0)
    vision = a.vision.params if a.vision else 0
    other = L * a.layer_other_params + a.head_other_params
    total = a.embed_params + lm_head + attention + mlp + experts + router + norms + vision + other
    return ParamCount(total, a.embed_params, lm_head, attention, mlp, experts, router, norms, vision, other)


def reference_param_count(arch: dict) -> int:
    """sum(p.numel()) of the transformers model built on the meta device (no memory, no download).

    The one function here that imports torch/transformers, for tests and scripts.
    """
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoModelForSequenceClassification,
    )

    clean = {k: v for k, v in arch.items() if not k.startswith("_") and k != "quantization_config"}
    config = AutoConfig.for_model(**clean)
    if "vision_config" in clean:
        auto = AutoModelForImageTextToText
    elif clean["model_type"] == "bert":
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    return sum(p.numel() for p in model.parameters())


def load_arch(name_or_path: str) -> dict:
    """Read ``<folder>/config.json`` (or a path to a config.json) from local disk; keys starting with
    ``_`` (provenance notes) are dropped.  Planning never downloads: a hub id raises ValueError."""
    path = Path(name_or_path).expanduser()
    cfg_file = path / "config.json" if path.is_dir() else path
    if not (cfg_file.is_file() and cfg_file.name.endswith(".json")):
        raise ValueError(
            f"no config.json at {str(path)!r}: pass a local folder that holds the model's config.json "
            "(planning reads only the architecture and never downloads from the hub)"
        )
    try:
        arch = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from e
    return {k: v for k, v in arch.items() if not k.startswith("_")}


# --------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------


def _check(s: Settings, a: _Arch) -> None:
    """User errors: name the field and the fix."""
    choices = {
        "quant": ("none", "8bit", "4bit"),
        "bnb_4bit_quant_type": ("nf4", "fp4"),
        "optim": OPTIMIZERS,
        "attn": ("sdpa", "flash_attention_2", "eager"),
        "dtype": tuple(DTYPE_BYTES),
        "adapter_dtype": ("auto", *DTYPE_BYTES),
        "loss_impl": ("full", "chunked", "fused"),
    }
    for name, allowed in choices.items():
        if getattr(s, name) not in allowed:
            raise ValueError(f"Settings.{name}={getattr(s, name)!r} is not one of {allowed}")
    for name in ("batch_size", "seq_len", "grad_accum"):
        if getattr(s, name) < 1:
            raise ValueError(f"Settings.{name} must be >= 1, got {getattr(s, name)}")
    if s.lora_r is None and s.quant != "none":
        raise ValueError(
            "Settings.quant='4bit'/'8bit' needs LoRA (lora_r): quantized weights cannot be trained in full"
        )
    if s.lora_r is not None and s.lora_r < 1:
        raise ValueError(f"Settings.lora_r must be >= 1 or None (full fine-tune), got {s.lora_r}")
    if s.optim.startswith("galore") and s.lora_r is not None:
        raise ValueError(
            "GaLore trains the full weights: set Settings.lora_r=None with optim='galore'/'galore_8bit'"
        )
    if a.encoder and s.quant != "none":
        raise ValueError(
            "quantized training of encoder classifiers is not modelled: use Settings.quant='none'"
        )
    for name in s.modules_to_save:
        if name not in _EMBED_NAMES | _HEAD_NAMES:
            raise ValueError(
                f"Settings.modules_to_save: {name!r} is not modelled; use 'embed_tokens' / 'lm_head'"
            )
    if s.lora_r is not None:
        names = {n for lin, _ in _all_linears(a) for n in (lin.name, *lin.aliases)}
        known = (
            names | {"all-linear", "lm_head"} | ({"w1", "w2", "w3"} if a.model_type == "mixtral" else set())
        )
        unknown = sorted(set(s.lora_targets) - known)
        if unknown:
            raise ValueError(
                f"Settings.lora_targets {unknown} name no Linear of {a.model_type}; use 'all-linear' or some of "
                f"{sorted(n for n in names if '.' not in n)}"
            )


_EMBED_NAMES = {"embed_tokens", "wte", "word_embeddings", "embed_in"}
_HEAD_NAMES = {"lm_head", "embed_out"}


def _adapted(s: Settings, lin: _Linear) -> bool:
    """Does PEFT wrap this Linear with LoRA? 'all-linear' is every nn.Linear but the LM head; MoE
    experts (3-D parameters) and routers (plain parameters) are not nn.Linear in transformers 5."""
    if s.lora_r is None:
        return False
    targets = set(s.lora_targets)
    return "all-linear" in targets or lin.name in targets or bool(targets & set(lin.aliases))


def _expert_lora(a: _Arch, s: Settings) -> bool:
    """PEFT converts LoRA targets of Mixtral (transformers-4 names w1/w3/w2, or 'all-linear') into
    adapters on the fused 3-D expert stacks. gpt-oss experts were always fused: 'all-linear' leaves them."""
    if s.lora_r is None or a.model_type != "mixtral":
        return False
    return "all-linear" in s.lora_targets or bool({"w1", "w2", "w3"} & set(s.lora_targets))


def _head_trained(a: _Arch, s: Settings) -> bool:
    """Is the LM head's full weight trained (full fine-tune or a PEFT modules_to_save copy)?"""
    return not a.encoder and (s.lora_r is None or bool(set(s.modules_to_save) & _HEAD_NAMES))


def _adapter_bytes(s: Settings) -> int:
    if s.adapter_dtype != "auto":
        return DTYPE_BYTES[s.adapter_dtype]
    # TRL's SFTTrainer casts the adapters of quantized models to bf16 (QLoRA recipe); on an
    # unquantized base PEFT's autocast_adapter_dtype=True keeps them in fp32.
    return 2 if s.quant != "none" else 4


def _unquantized_bytes(s: Settings) -> int:
    """dtype of every weight bitsandbytes leaves alone (embeddings, norms, LM head, experts, routers,
    biases) and of all weights when nothing is quantized."""
    if s.dtype == "float32" or s.master_weights_fp32 or (s.quant != "none" and s.kbit_fp32_upcast):
        return 4
    return DTYPE_BYTES[s.dtype]


def _all_linears(a: _Arch) -> list[tuple[_Linear, int]]:
    """(linear, how many in the model): decoder layers, then the vision tower."""
    out = [(lin, a.layers) for lin in a.linears]
    if a.vision:
        out += [(lin, a.vision.depth) for lin in a.vision.linears] + [
            (lin, 1) for lin in a.vision.merger_linears
        ]
    return out


def _quantized(s: Settings, lin: _Linear) -> bool:
    """bitsandbytes converts exactly the nn.Linear modules, minus the LM head (transformers skips the
    output embedding), so the vision tower too unless the user skips it."""
    return s.quant != "none" and (lin.group != "vision" or s.quantize_vision)


def _quant_bytes(s: Settings, numel: int, rows: int) -> float:
    """Storage of one bitsandbytes-quantized weight matrix (bias excluded)."""
    if s.quant == "8bit":  # LLM.int8: int8 matrix + one fp32 scale per output row
        return numel + 4 * rows
    blocks = math.ceil(numel / NF4_BLOCK)  # 4-bit: two weights per byte, absmax per 64-block
    code = 16 * 4  # the 16-entry fp32 code book (NF4 or FP4)
    if s.double_quant:  # absmax as uint8 + one fp32 absmax per 256 blocks + their code book + offset
        return numel / 2 + code + blocks + 4 * math.ceil(blocks / NF4_DQ_BLOCK) + 256 * 4 + 4
    return numel / 2 + code + 4 * blocks


@dataclass(frozen=True)
class _Tensor:
    """A group of ``count`` equally shaped trainable tensors (lead x rows x cols)."""

    rows: int
    cols: int  # 1 for vectors
    count: int
    nbytes: int  # bytes per element of the parameter (and of its gradient)
    lead: int = 1  # experts: the leading dimension of a 3-D tensor
    galore_target: bool = False  # a 2-D weight of an attention/MLP Linear

    @property
    def numel(self) -> int:
        return self.lead * self.rows * self.cols


def _trainables(a: _Arch, s: Settings, pc: ParamCount) -> list[_Tensor]:
    """Every trainable tensor with its shape and dtype."""
    ub = _unquantized_bytes(s)
    if s.lora_r is None:  # full fine-tune: every parameter, in the weight dtype
        out = []
        for lin, n in _all_linears(a):
            out.append(_Tensor(lin.out_f, lin.in_f, n, ub, galore_target=lin.group != "vision"))
            if lin.bias:
                out.append(_Tensor(lin.out_f, 1, n, ub))
        if a.experts:  # gate_up (2 ffn x h) and down (h x ffn) per expert; HF GaLore skips 3-D tensors
            out.append(_Tensor(2 * a.inter, a.hidden, a.layers, ub, lead=a.experts))
            out.append(_Tensor(a.hidden, a.inter, a.layers, ub, lead=a.experts))
        out.append(_Tensor(a.vocab, a.hidden, 1, ub))
        if pc.lm_head:
            out.append(_Tensor(a.vocab, a.hidden, 1, ub))
        rest = pc.total - sum(t.numel * t.count for t in out)
        # norms, biases, routers, sinks, position embeddings, heads: vectors of about hidden size
        out.append(_Tensor(a.hidden, 1, rest // a.hidden, ub))
        if rest % a.hidden:
            out.append(_Tensor(rest % a.hidden, 1, 1, ub))
        return out
    ab, r = _adapter_bytes(s), s.lora_r
    out = []
    for lin, n in _all_linears(a):
        if _adapted(s, lin):
            out += [_Tensor(r, lin.in_f, n, ab), _Tensor(lin.out_f, r, n, ab)]  # A: r x in, B: out x r
            if s.use_dora:  # magnitude vector per output feature, kept in fp32 by PEFT and TRL
                out.append(_Tensor(lin.out_f, 1, n, 4))
    if _expert_lora(a, s):
        # transformers 5 fuses Mixtral's experts into 3-D stacks and its router into a parameter;
        # PEFT maps the v4 targets onto them (target_parameters), one rank-r factor per expert and
        # rank 2r on the fused gate_up stack (w1 + w3).
        E, h, ffn, L = a.experts, a.hidden, a.inter, a.layers
        out += [_Tensor(r, h, L, ab), _Tensor(E, r, L, ab)]  # router
        out += [_Tensor(2 * r * E, h, L, ab), _Tensor(2 * ffn, 2 * r * E, L, ab)]  # gate_up
        out += [_Tensor(r * E, ffn, L, ab), _Tensor(h, r * E, L, ab)]  # down
    if "lm_head" in s.lora_targets and not a.encoder:
        out += [_Tensor(r, a.hidden, 1, ab), _Tensor(a.vocab, r, 1, ab)]
    # modules_to_save: PEFT trains a full copy of the module, in the dtype of the original
    out += [_Tensor(a.vocab, a.hidden, 1, ub) for _ in s.modules_to_save]
    return out


def _weights_bytes(a: _Arch, s: Settings, pc: ParamCount) -> float:
    ub = _unquantized_bytes(s)
    total, linear_params = 0.0, 0
    for lin, n in _all_linears(a):
        linear_params += n * lin.params
        if _quantized(s, lin):
            total += n * (
                _quant_bytes(s, lin.in_f * lin.out_f, lin.out_f) + (lin.out_f * ub if lin.bias else 0)
            )
        else:
            total += n * lin.params * ub
    return total + (pc.total - linear_params) * ub


def _state_bytes(s: Settings, t: _Tensor) -> float:
    """Optimizer state of one tensor."""
    n = t.numel
    eight_bit = s.optim in ("adamw_8bit", "paged_adamw_8bit", "galore_8bit")
    if s.optim == "sgd":
        return 0.0
    if s.optim == "adafactor":  # HF Adafactor, beta1=None: factored second moment in fp32
        return 4 * t.lead * (t.rows + t.cols) if t.cols > 1 else 4 * n
    if s.optim.startswith("galore") and t.galore_target:
        rank = min(s.galore_rank, t.rows, t.cols)
        projected = rank * max(t.rows, t.cols)  # the gradient is projected along its smaller side
        projector = rank * min(t.rows, t.cols) * t.nbytes
        return projector + _adam_bytes(projected, t.nbytes, eight_bit)
    if s.optim == "paged_adamw":  # bitsandbytes 32-bit states are fp32 whatever the parameter dtype
        return 8 * n
    return _adam_bytes(n, t.nbytes, eight_bit)


def _adam_bytes(n: int, param_bytes: int, eight_bit: bool) -> float:
    """Two moments: torch AdamW allocates them like the parameter; bitsandbytes 8-bit stores uint8
    plus one fp32 absmax per 256 values, except for tensors under 4096 values (kept 32-bit)."""
    if eight_bit:
        return 2 * (n + 4 * math.ceil(n / BNB_OPTIM_BLOCK)) if n >= BNB_OPTIM_MIN_8BIT else 8 * n
    return 2 * n * param_bytes


def _optimizer_bytes(s: Settings, tensors: list[_Tensor]) -> tuple[float, float]:
    """(state bytes resident on the GPU, transient bytes of one optimizer step)."""
    states = [(_state_bytes(s, t), t) for t in tensors]
    total = sum(b * t.count for b, t in states)
    if s.optim.startswith("paged"):
        # Paged states live in CUDA unified memory: under memory pressure the driver evicts them to
        # host RAM and pages each tensor's state back in for its update. What must be resident is
        # the state of the largest tensor; the rest is resident only while the GPU has room (and
        # is invisible to torch's allocator statistics either way).
        total = max(b for b, _ in states)
    largest = max(tensors, key=lambda t: t.numel)
    if s.optim == "adamw" and not s.fused_optimizer:
        # foreach AdamW: torch._foreach_sqrt(exp_avg_sqs) materialises one state-sized copy
        temp = sum(t.numel * t.count * t.nbytes for t in tensors)
    elif s.optim == "adafactor":
        # per tensor: fp32 copies of grad and param (when half), the squared update and its scaling
        temp = 4 * largest.numel * (2 + (2 if largest.nbytes < 4 else 0))
    elif s.optim.startswith("galore"):
        # projector refresh (step 0 and every update_proj_gap steps): fp32 copy of the largest
        # target gradient, its SVD factors U and Vh, and the projected-back full-rank update
        targets = [t for t in tensors if t.galore_target] or [largest]
        g = max(targets, key=lambda t: t.numel)
        k = min(g.rows, g.cols)
        temp = 4 * (g.numel + g.rows * k + k * g.cols) + g.numel * g.nbytes
    else:  # fused AdamW, bitsandbytes kernels and SGD update in place
        temp = 0.0
    return total, temp


def _activation_phases(a: _Arch, s: Settings) -> dict[str, float]:
    """Activation bytes alive at the candidate peaks of one step.

    Phases: ``lm_fwd`` (loss computed, end of forward), ``lm_bwd`` (loss gradient), ``layer_fwd`` (a
    decoder layer running forward, for transients such as DoRA's), ``layer_bwd`` (the last layer
    recomputed and back-propagated). Per-layer accounting lists the tensors autograd saves in HF's
    modeling code under bf16 autocast; scripts/fake_tensor_check.py verifies it against MemTracker.
    """
    B, S = s.batch_size, s.seq_len
    t = B * S
    h, ffn, L = a.hidden, a.inter, a.layers
    q, kv, nh = a.q_dim, a.kv_dim, a.heads
    autocast = s.dtype != "float32"  # HF Trainer runs bf16/fp16 under torch.autocast
    c = DTYPE_BYTES[s.dtype]  # bytes of tensors computed by matmuls
    rb = _unquantized_bytes(s)  # residual stream: it starts at the embedding, in the weights' dtype
    ab = _adapter_bytes(s)
    full = s.lora_r is None
    norm_out = 4 if (a.norm_kind == "layer" and autocast) else rb  # LayerNorm autocasts to fp32

    def inputs_saved(src: int, lins: tuple[_Linear, ...]) -> float:
        """Bytes/token that the Linears reading one tensor (of ``src`` bytes/elt) keep for backward."""
        shared, per_module = False, 0.0
        for lin in lins:
            if s.quant == "8bit" and _quantized(s, lin):
                shared = True  # bitsandbytes' int8 matmul keeps its input for backward
            if full:  # the weight gradient needs the input, in compute dtype
                if not autocast or src == c:
                    shared = True
                else:  # autocast casts non-leaf inputs afresh for every op
                    per_module += c * lin.in_f
            elif _adapted(s, lin):
                # PEFT casts x to the adapter dtype (4-bit layers skip that under autocast), then
                # autocast casts it to the compute dtype for lora_A, which keeps it for backward
                x = src if (s.quant == "4bit" and autocast) else ab
                final = c if autocast else x
                if s.lora_dropout > 0:  # dropout mask (1 byte on CUDA) + the dropped-out copy
                    per_module += lin.in_f * (1 + final)
                elif x != src or final != x:
                    per_module += final * lin.in_f
                else:
                    shared = True
                per_module += s.lora_r * (c if autocast else ab)  # lora_A output, kept by lora_B
                if s.use_dora:  # base and LoRA results, kept for the magnitude gradient
                    per_module += 2 * c * lin.out_f
        return per_module + (src * lins[0].in_f if shared else 0)

    def norm_saved() -> float:
        # RMSNorm upcasts to fp32 and keeps that copy; LayerNorm autocasts to fp32 and keeps its
        # input. A trainable weight also keeps the normalised tensor.
        trainable = 0 if not full else (4 if a.model_type.startswith("gemma") else rb) * h
        return 4 * h + trainable

    attn_lins = tuple(lin for lin in a.linears if lin.group == "attention")
    qkv, o_lin = attn_lins[:-1], attn_lins[-1:]
    mlp_lins = tuple(lin for lin in a.linears if lin.group == "mlp")
    up_lins, down_lin = mlp_lins[:-1], mlp_lins[-1:]
    attn_norms = 2 if a.norms_per_layer == 4 else 1  # gemma-2 also norms the attention output
    mid = c if autocast else 4  # tensors produced inside the block (attention output, MLP product)

    eager = s.attn == "eager" or (s.attn == "sdpa" and not a.sdpa_supported)
    masked = a.encoder or eager or (s.attn == "sdpa" and B > 1 and not s.packed)
    repeat_kv = eager or (s.attn == "sdpa" and masked and kv < q)  # SDPA's GQA path needs no mask
    kv_saved = q if repeat_kv else kv

    # ---- attention block of one layer, bytes per token
    attn = norm_saved() * attn_norms
    attn += inputs_saved(norm_out, qkv + (up_lins if a.parallel_block else ()))
    v_storage = (q + 2 * kv) if a.fused_qkv else kv_saved  # V is a view into the fused output
    attn += c * (q + kv_saved) + c * v_storage  # q, k (after RoPE) and v kept by attention
    if eager:
        # scores -> softmax -> (dropout) -> matmul with V. HF upcasts the softmax to fp32 (explicitly,
        # or autocast does), except gpt-oss whose sink softmax stays in compute dtype; the matmul
        # keeps its input in compute dtype, a fresh copy whenever a cast or dropout intervenes.
        sm = c if (a.attn_sinks or not autocast) else 4
        probs = sm
        if a.dropout > 0:
            probs += 1 + (c if autocast else sm)  # mask (1 byte on CUDA) + the dropped-out copy
        elif sm != c:
            probs += c
        if a.attn_softcap:
            probs += c  # tanh output
        attn += nh * S * probs
        attn_bwd = nh * S * (c + 4)  # gradients of the probabilities and of the fp32 scores
    else:
        attn += c * q + 4 * nh  # attention output + logsumexp
        attn_bwd = c * (2 * q + 2 * kv_saved)  # gradients of q, k, v and of the output
    attn += inputs_saved(mid, o_lin)
    if a.hidden_dropout > 0:
        attn += h  # residual dropout mask (1 byte)

    # ---- MLP block
    expert_lora = _expert_lora(a, s)
    mlp_fixed = mlp_bwd_fixed = 0.0  # bytes independent of the token count
    mlp = norm_saved() * (a.norms_per_layer - attn_norms)
    if a.experts:
        # eager expert loop over t*k (token, expert) pairs: gate_up output and activation
        # intermediates, the expert output kept by the routing-weight multiply, fp32 router softmax
        per_pair = c * a.expert_saved * ffn + c * h
        if full or expert_lora:
            per_pair += c * (h + ffn)  # inputs of both expert matmuls, for the weight gradients
        router_in = rb * h if (full or expert_lora) else 0  # kept for the router weight gradient
        mlp += a.top_k * per_pair + 8 * a.experts + router_in
        mlp_bwd = c * 3 * ffn * a.top_k
        if expert_lora:
            # PEFT folds the factors into the stacks, W' = W + B@A (one baddbmm per stack, in the
            # weights' dtype), and the expert matmuls keep W' for backward. Backward then builds
            # the full gradient of the gate_up stack once the down stack's W' has been released.
            mlp_fixed = rb * a.experts * 3 * h * ffn
            mlp_bwd_fixed = rb * a.experts * h * ffn
    else:
        if not a.parallel_block:
            mlp += inputs_saved(norm_out, up_lins)
        act_copies = 4 if a.gelu_composite else 1
        mlp += c * ffn * ((2 + act_copies) if a.gated_mlp else act_copies)
        mlp += inputs_saved(mid, down_lin)
        mlp_bwd = c * ffn * (3 if a.gated_mlp else 2)
    if a.hidden_dropout > 0:
        mlp += h
    layer = attn + mlp
    # Backward of a layer on top of its saved tensors: the MLP runs first (with everything saved),
    # then attention (the MLP's tensors released); the residual-stream gradient flows in and out.
    bwd_extra = max(mlp_bwd * t + mlp_bwd_fixed, attn_bwd * t - mlp * t - mlp_fixed) + 2 * rb * h * t
    # bitsandbytes dequantizes a quantized weight to compute dtype for each matmul's backward
    quantized = [lin.in_f * lin.out_f for lin, _ in _all_linears(a) if _quantized(s, lin)]
    dequant = c * max(quantized, default=0)

    # ---- autocast copies of fp32 weights: kept (cached) until the forward ends, and saved by
    # their matmuls, i.e. for the whole step without checkpointing
    fp32_trainable = autocast and (full and rb == 4 or not full and ab == 4)
    cast_layer = c * _trainable_matmul_params(a, s) if fp32_trainable else 0.0
    head_fp32 = autocast and rb == 4 and not a.encoder  # amp master weights or kbit fp32 upcast
    cast_head = c * a.vocab * h if head_fp32 else 0.0

    # ---- the LM head and loss, bytes per token
    head_in = c * h if (_head_trained(a, s) or "lm_head" in s.lora_targets) else 0
    final_norm = (0 if a.encoder else norm_saved()) + head_in
    V = 0 if a.encoder else a.vocab
    if s.loss_impl == "full":
        # HF: logits in compute dtype, upcast to fp32 for cross-entropy, whose log-softmax output is
        # kept; accelerate returns another fp32 copy of the logits. Backward: the NLL gradient and
        # the log-softmax gradient (both fp32 t x V) while the saved log-softmax is still alive.
        soft = c if a.final_softcap else 0  # tanh output of logit soft-capping
        lm_fwd = V * ((c if autocast else 0) + 8 + soft)
        lm_bwd = V * (12 + soft)
    elif s.loss_impl == "chunked":
        # logits produced in 8 chunks, each upcast and cross-entropied; the log-softmax outputs stay
        lm_fwd, lm_bwd = V * (c + 4 + 4 / 8), V * (4 + 8 / 8)
    else:  # fused (TRL chunked log-prob / Liger / cut-cross-entropy): a tile instead of the logits
        tile = min(t, TRL_LOGPROB_TILE[0]) * min(V, TRL_LOGPROB_TILE[1]) * c / t
        lm_fwd, lm_bwd = tile, tile + 4 * h  # + fp32 gradient of the hidden states
        if head_in:  # fp32 accumulator of the LM head weight gradient
            lm_bwd += 4 * V * h / t

    # ---- whole model
    ckpt_input = 0 if s.offload_activations else rb * h  # non-reentrant checkpoint keeps the layer input
    if s.grad_ckpt:
        kept, casts_fwd, casts_bwd = L * ckpt_input * t, L * cast_layer, cast_layer
    else:
        kept, casts_fwd, casts_bwd = L * (layer * t + mlp_fixed + cast_layer), 0.0, 0.0
    recompute = layer * t + mlp_fixed if s.grad_ckpt else 0.0  # the layer rebuilt in backward
    shared = (B * S * S * (1 if s.attn != "eager" else c)) if masked else 0  # 4-D attention mask
    base = kept + shared + _vision_activations(a, s, c, rb)
    dora = _dora_transient(a, s, c) if s.use_dora else 0.0
    return {
        "lm_fwd": base + casts_fwd + cast_head + (final_norm + lm_fwd) * t,
        "lm_bwd": base + cast_head + (final_norm + lm_bwd) * t,
        "layer_fwd": base + casts_fwd + recompute + max(dora, dequant),
        "layer_bwd": base + casts_bwd + recompute + bwd_extra + max(dora if s.grad_ckpt else 0, dequant),
    }


def _trainable_matmul_params(a: _Arch, s: Settings) -> int:
    """Per decoder layer: trainable parameters that feed a matmul (what autocast casts)."""
    if s.lora_r is None:
        return sum(lin.params for lin in a.linears) + a.experts * a.expert_params
    return sum(s.lora_r * (lin.in_f + lin.out_f) for lin in a.linears if _adapted(s, lin))


def _dora_transient(a: _Arch, s: Settings, c: int) -> float:
    """DoRA rebuilds each adapted weight every forward: an identity matrix (in x in, fp32 and its
    autocast copy) pushed through the adapter, then fp32 copies of W, B@A and their sum for the
    column norms. The largest module sets the transient."""
    worst = 0.0
    for lin, _ in _all_linears(a):
        if _adapted(s, lin):
            i, o = lin.in_f, lin.out_f
            worst = max(worst, i * i * (4 + c) + c * i * o, i * i * c + 16 * i * o)
    return worst


def _vision_activations(a: _Arch, s: Settings, c: int, rb: int) -> float:
    """Qwen2-VL's vision tower over ``image_patches`` per sample. A block keeps what a decoder layer
    does: two LayerNorm inputs in fp32, the fused qkv output, q/k after RoPE, attention output and
    logsumexp, fc1 output with its QuickGELU pieces (x, sigmoid, product = fc2 input); then the
    2x2 patch merger. Not covered by the fake-tensor check, which runs text-only models."""
    v = a.vision
    if not v or not s.image_patches:
        return 0.0
    p = s.batch_size * s.image_patches
    ed, m = v.embed_dim, v.mlp_dim
    block = 2 * 4 * ed + c * (3 * ed + 2 * ed + ed) + 4 * v.heads + c * 3 * m
    if s.lora_r is not None:
        block += c * (2 * ed + m)  # adapter input casts: qkv, proj, fc2 (fc1 reads a LayerNorm too)
    kept = v.depth * (rb * ed if s.grad_ckpt else block) * p
    recompute = block * p if s.grad_ckpt else 0
    merger = (4 + c) * ed * p  # its LayerNorm input (fp32) and the merged MLP input
    return kept + recompute + merger


def estimate(arch: dict, s: Settings = Settings()) -> Estimate:
    """Peak training memory per GPU for ``arch`` (a config.json dict) under settings ``s``."""
    a = _parse(arch)
    _check(s, a)
    pc = count_params(arch)
    tensors = _trainables(a, s, pc)
    trainable_bytes = sum(t.numel * t.count * t.nbytes for t in tensors)

    weights = _weights_bytes(a, s, pc)
    adapter = 0.0 if s.lora_r is None else trainable_bytes
    states, step_temp = _optimizer_bytes(s, tensors)
    per_tensor_update = (s.optim.startswith("galore") and not s.galore_retain_grad) or s.opt_in_backward
    # The LM head's gradient (when trained) exists from the first backward step on. A tied embedding
    # receives a second full-size gradient at the very end, added in place into the LM head's.
    head = a.vocab * a.hidden * _unquantized_bytes(s) if _head_trained(a, s) else 0.0
    tied_extra = head if (a.tied and s.lora_r is None) else 0.0
    if per_tensor_update:  # the optimizer steps each tensor inside backward and frees its gradient
        grads = max(t.numel * t.nbytes for t in tensors)
    else:
        grads = trainable_bytes + tied_extra

    acts = _activation_phases(a, s)
    activations = max(acts.values())
    static = weights + adapter + states
    if per_tensor_update:
        dynamic = activations + grads + step_temp
    else:
        # Gradients reach full size at the end of backward, after the activation peak, unless
        # gradient accumulation keeps earlier micro-batches' gradients alive throughout.
        early = trainable_bytes if s.grad_accum > 1 else 0.0
        dynamic = max(
            max(acts["lm_fwd"], acts["lm_bwd"], acts["layer_fwd"]) + early,
            acts["layer_bwd"] + max(early, head),
            trainable_bytes + max(step_temp, tied_extra),
        )
    allocated = static + dynamic
    overhead = CUDA_CONTEXT_GIB * GIB + ALLOCATOR_SLACK * allocated
    return Estimate(
        weights_gib=weights / GIB,
        adapter_gib=adapter / GIB,
        gradients_gib=grads / GIB,
        optimizer_gib=(states + step_temp) / GIB,
        activations_gib=activations / GIB,
        overhead_gib=overhead / GIB,
        total_gib=(allocated + overhead) / GIB,
    )
