"""Analytic estimate of peak training memory per GPU, by component.

The estimator takes a Hugging Face ``config.json`` dict (``arch``) and the run settings and adds up
the bytes that are alive at the peak of one training step of the Hugging Face + PEFT + TRL stack:

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

The architecture comes from transformers itself (``reading``: the model built on the meta device,
its modules read, PEFT's choice of LoRA targets recorded); ``arch`` matches the reading's layers
against the activation table; ``tensors`` and ``activations`` count bytes. Importing this package
imports neither torch nor transformers: catalog architectures ship as readings, others are read
once and cached. Every number comes from a mechanism; ``scripts/fake_tensor_check.py`` checks the
tensor accounting against PyTorch's ``MemTracker`` and ``scripts/calibrate.py`` scores totals
against published measurements (results in BENCHMARKS.md).
"""

from __future__ import annotations

from finetune.memory import activations, tensors
from finetune.memory.arch import Arch, describe
from finetune.memory.settings import (
    ALLOCATOR_SLACK,
    CUDA_CONTEXT_GIB,
    DTYPE_BYTES,
    GIB,
    OPTIMIZERS,
    Estimate,
    ParamCount,
    Settings,
)

__all__ = [
    "ALLOCATOR_SLACK",
    "CUDA_CONTEXT_GIB",
    "DTYPE_BYTES",
    "GIB",
    "OPTIMIZERS",
    "Arch",
    "Estimate",
    "ParamCount",
    "Settings",
    "count_params",
    "attention_implementations",
    "describe",
    "dims",
    "estimate",
    "lora_target_names",
    "reference_param_count",
]


def count_params(arch: dict, task: str = "causal-lm") -> ParamCount:
    """Exact parameter count of the transformers model built from ``arch``, by bucket."""
    return describe(arch, task).params


def dims(arch: dict) -> dict:
    """Canonical sizes whatever the config's own key names (n_head, n_embd, ...): hidden, heads,
    head_dim, layers, vocab, the summed key/value width over layers (the KV cache per token), and
    the experts and experts per token of a mixture of experts (0 for a dense model)."""
    a = describe(arch)
    moe = [layer for layer in a.layers if layer.experts]
    return {
        "hidden": a.hidden,
        "heads": a.heads,
        "head_dim": a.head_dim,
        "layers": a.n_layers,
        "vocab": a.vocab,
        "kv_width": sum(layer.count * layer.kv_dim for layer in a.layers),
        "experts": max((layer.experts for layer in moe), default=0),
        "top_k": max((layer.top_k for layer in moe), default=0),
    }


def attention_implementations(arch: dict) -> list[str]:
    """The attention kernels the model class supports (eager always): for attn_implementation=auto."""
    r = describe(arch)
    # sinks: finetune.attention's SDPA; FlashAttention-2 would drop them (FA3/FA4 kernels take them)
    if r.sinks:
        return ["eager", "sdpa", *(k for k in r.attn_kernels if k != "flash_attention_2")]
    return ["eager", *(["sdpa"] if r.sdpa_supported else [])] + list(r.attn_kernels)


def lora_target_names(arch: dict) -> list[str]:
    """Module names a user can give in ``lora.target_modules`` (q_proj, c_attn, query_key_value, ...)."""
    return tensors.target_names(describe(arch))


def reference_param_count(arch: dict, task: str = "causal-lm") -> int:
    """sum(p.numel()) of the transformers model built on the meta device, read afresh (for tests)."""
    from finetune.memory.reading import build

    return sum(p.numel() for p in build(arch, task).parameters())


def check(s: Settings, a: Arch) -> None:
    """Settings the estimator cannot model: name the field and the fix."""
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
    whole = {m.leaf for m in a.modules if m.kind == "embedding" or m.group == "head"} | tensors.HEAD_NAMES
    for name in s.modules_to_save:
        if name not in whole:
            raise ValueError(
                f"Settings.modules_to_save: {name!r} is not modelled; use some of {sorted(whole)}"
            )
    tensors.adapted(a, s)  # named LoRA targets must exist
    stays = tensors.embedding_stays(a, s) if s.offload_embedding else ""
    if stays:
        raise ValueError(f"Settings.offload_embedding: the input embedding stays on the GPU, {stays}")


def estimate(arch: dict, s: Settings = Settings(), task: str = "causal-lm") -> Estimate:  # noqa: B008
    """Peak training memory per GPU for ``arch`` (a config.json dict) under settings ``s``.

    ``task="sequence-classification"`` models an encoder classifier (the calibration's BERT rows);
    training runs here are causal language models.
    """
    a = describe(arch, task)
    check(s, a)
    trainable = tensors.trainables(a, s)
    trainable_bytes = sum(t.numel * t.count * t.nbytes for t in trainable)

    weights = tensors.weights_bytes(a, s)
    adapter = 0.0 if s.lora_r is None else trainable_bytes
    states, step_temp = tensors.optimizer_bytes(s, trainable) if trainable else (0.0, 0.0)
    per_tensor_update = (s.optim.startswith("galore") and not s.galore_retain_grad) or s.opt_in_backward
    # The LM head's gradient (when trained) exists from the first backward step on. A tied embedding
    # receives a second full-size gradient at the very end, added in place into the LM head's.
    head = a.vocab * a.hidden * tensors.unquantized_bytes(s) if tensors.head_trained(a, s) else 0.0
    tied_extra = head if (a.tied and s.lora_r is None) else 0.0
    if per_tensor_update:  # the optimizer steps each tensor inside backward and frees its gradient
        grads = max((t.numel * t.nbytes for t in trainable), default=0)
    else:
        grads = trainable_bytes + tied_extra

    acts = activations.phases(a, s)
    peak_acts = max(acts.values())
    static = weights + adapter + states
    if per_tensor_update:
        dynamic = peak_acts + grads + step_temp
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
        activations_gib=peak_acts / GIB,
        overhead_gib=overhead / GIB,
        total_gib=(allocated + overhead) / GIB,
        approximate=bool(a.unknown),
        notes=tuple(f"activations approximate (not in the mechanism table): {u}" for u in a.unknown),
    )
