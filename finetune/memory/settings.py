"""What a run is (Settings) and what the estimator answers (Estimate, ParamCount), with its constants."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

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
    offload_embedding: bool = False  # the frozen, untied input embedding kept in host memory
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
    # True when the architecture has layers the activation table does not know: their activations
    # are a conservative guess (``notes`` says which mechanisms), the rest stays exact
    approximate: bool = False
    notes: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict:
        """The GiB components (the plan's public ``estimate`` object)."""
        return {f.name: round(getattr(self, f.name), 4) for f in fields(self) if f.name.endswith("_gib")}


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts; ``pc["total"]`` equals ``sum(p.numel())`` of the transformers model.

    Buckets by where a parameter lives in the module tree: nn.Embedding -> ``embeddings``, norms ->
    ``norms``, routed experts and their router, the decoder layers' attention and MLP, the vision tower
    of a vision-language model; ``other`` holds the rest (encoder heads, unrecognised modules).
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
