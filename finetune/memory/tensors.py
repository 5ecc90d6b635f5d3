"""The tensors a training step holds besides activations: weights (bf16, fp32, int8 or NF4), LoRA
adapters, gradients, and the optimizer's state and step temporaries.

What LoRA adapts is PEFT's choice, read from the model: ``all-linear`` is the list PEFT picked on the
meta model while reading it; named targets follow PEFT's rule for a list of names (a module is
adapted when its path equals a name or ends with ``.name``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune import UserError
from finetune.memory.arch import Arch, Linear
from finetune.memory.settings import (
    BNB_OPTIM_BLOCK,
    BNB_OPTIM_MIN_8BIT,
    DTYPE_BYTES,
    NF4_BLOCK,
    NF4_DQ_BLOCK,
    Settings,
)

HEAD_NAMES = {"lm_head", "embed_out"}
EXPERT_KINDS = ("gate_up_proj", "down_proj")  # the two fused 3-D stacks of a transformers-5 experts module


ROUTERS = r".*\.(mlp|block_sparse_moe)\.(gate|router|shared_expert_gate)"
"""MoE routers, which all-linear leaves frozen (finetune.models excludes them from PEFT's targets)."""


def expert_kinds(targets: tuple[str, ...]) -> tuple[str, ...]:
    """The fused expert stacks LoRA adapts (finetune.experts puts per-expert adapters on them):
    both under all-linear or when ``experts`` is named, else the stacks named (``down_proj`` names a
    dense MLP's Linear and the expert stack alike, as PEFT's suffix rule would)."""
    picked = set()
    for t in targets:
        leaf = t.rpartition(".")[2]
        if t == "all-linear" or leaf == "experts":
            picked |= set(EXPERT_KINDS)
        elif leaf in EXPERT_KINDS:
            picked.add(leaf)
    return tuple(k for k in EXPERT_KINDS if k in picked)


def adapter_bytes(s: Settings) -> int:
    if s.adapter_dtype != "auto":
        return DTYPE_BYTES[s.adapter_dtype]
    # TRL's SFTTrainer casts the adapters of quantized models to bf16 (QLoRA recipe); on an
    # unquantized base PEFT's autocast_adapter_dtype=True keeps them in fp32.
    return 2 if s.quant != "none" else 4


def unquantized_bytes(s: Settings) -> int:
    """dtype of every weight bitsandbytes leaves alone (embeddings, norms, LM head, experts, routers,
    biases) and of all weights when nothing is quantized."""
    if s.dtype == "float32" or s.master_weights_fp32 or (s.quant != "none" and s.kbit_fp32_upcast):
        return 4
    return DTYPE_BYTES[s.dtype]


def target_names(a: Arch) -> list[str]:
    """The module names a user can give in lora.target_modules: leaf names of the Linear/Conv1D
    modules (and the embeddings, which PEFT can adapt too)."""
    return sorted(
        {m.leaf for m in a.modules if not m.leaf.isdigit()}
        | {".".join(m.name.split(".")[-2:]) for m in a.modules if m.leaf.isdigit()}
    )


def _matches(name: str, target: str) -> bool:
    # PEFT: a list entry matches a module whose full name equals it or ends with "." + it; our
    # names carry '*' for list indices, which a user's name (q_proj, mlp.down_proj) never contains
    return name == target or name.endswith("." + target)


def fused_expert_layers(a: Arch):
    """Decoder layers whose routed experts are fused 3-D stacks (what finetune.experts swaps)."""
    return [layer for layer in a.layers if layer.experts and layer.expert_fused and layer.expert_inter > 0]


def expert_stacks(a: Arch) -> list[tuple[str, int, int, int, int]]:
    """(kind, in, out, experts, layers) of every fused stack, as [out, in] per expert."""
    out = []
    for layer in fused_expert_layers(a):
        ffn = layer.expert_inter
        out += [
            ("gate_up_proj", a.hidden, 2 * ffn, layer.experts, layer.count),
            ("down_proj", ffn, a.hidden, layer.experts, layer.count),
        ]
    return out


def twinned(a: Arch, s: Settings) -> bool:
    """finetune.experts replaces the fused experts under quant=4bit/8bit (16-bit runs keep PEFT's
    parameter LoRA on them)."""
    return bool(fused_expert_layers(a)) and s.lora_r is not None and s.quant != "none"


def adapted(a: Arch, s: Settings) -> list[tuple[str, int, int, int, int]]:
    """(module pattern, in, out, rank multiple, count) of every module LoRA wraps. Fused expert stacks
    get one adapter per expert from finetune.experts (rank multiple = experts), not PEFT's."""
    if s.lora_r is None:
        return []
    import re

    targets = set(s.lora_targets)
    if "all-linear" in targets and a.all_linear_error:
        raise UserError(
            f"PEFT cannot apply lora.target_modules=all-linear to {a.model_type} ({a.all_linear_error}); "
            f"name the modules instead, some of {target_names(a)}"
        )
    has_stacks = twinned(a, s)
    out = []
    if "all-linear" in targets:
        out = [x for x in a.all_linear if not (has_stacks and (x[3] > 1 or re.fullmatch(ROUTERS, x[0])))]
    picked = {x[0] for x in out}
    named = targets - {"all-linear"}
    hit = {t for t in named if has_stacks and expert_kinds((t,))}
    for m in a.modules:
        for t in named:
            if _matches(m.name, t):
                hit.add(t)
                if m.name not in picked:
                    picked.add(m.name)
                    out.append((m.name, m.in_f, m.out_f, 1, m.count))
    missing = sorted(named - hit)
    if missing:
        import difflib

        names = target_names(a) + (list(EXPERT_KINDS) if has_stacks else [])
        close = difflib.get_close_matches(missing[0], names, n=1, cutoff=0.6)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(
            f"lora.target_modules: {', '.join(missing)} names no module of this {a.model_type} model.{hint} "
            f"Its modules: {', '.join(names)}; or all-linear (every linear layer but the LM head)."
        )
    if twinned(a, s):
        kinds = expert_kinds(s.lora_targets)
        out += [(f"experts.{kind}", i, o, e, n) for kind, i, o, e, n in expert_stacks(a) if kind in kinds]
    return out


def adapted_names(a: Arch, s: Settings) -> frozenset[str]:
    return frozenset(x[0] for x in adapted(a, s))


def expert_lora(a: Arch, s: Settings) -> bool:
    """Adapters on the fused stacks: finetune.experts' per-expert LoRA under quantization, else PEFT's
    parameter LoRA (Mixtral's all-linear in transformers 5; gpt-oss's not)."""
    if twinned(a, s):
        return bool(expert_kinds(s.lora_targets))
    return any(x[0].rpartition(".")[2].startswith("experts") for x in adapted(a, s))


def expert_storage_bytes(a: Arch, s: Settings) -> float:
    """The fused expert stacks as finetune.experts stores them: per expert one bitsandbytes
    quantize_4bit (packed nibbles, absmax per 64, with double quantization uint8 absmax + an fp32
    absmax per 256 of them + an fp32 offset) or 8-bit blockwise (int8 + fp32 absmax per 256), plus the
    code books per stack (16 fp32 for NF4/FP4, 256 fp32 for the blockwise code). Biases excluded."""
    total = 0.0
    for _kind, i, o, experts, layers in expert_stacks(a):
        n = i * o
        if s.quant == "none":
            per, shared = n * unquantized_bytes(s), 0
        elif s.quant == "8bit":
            per, shared = n + 4 * math.ceil(n / BNB_OPTIM_BLOCK), 256 * 4
        else:
            blocks = math.ceil(n / NF4_BLOCK)
            if s.double_quant:
                per, shared = n / 2 + blocks + 4 * math.ceil(blocks / NF4_DQ_BLOCK) + 4, 16 * 4 + 256 * 4
            else:
                per, shared = n / 2 + 4 * blocks, 16 * 4
        total += layers * (experts * per + shared)
    return total


def expert_dequant_bytes(a: Arch, s: Settings) -> float:
    """The transient 16-bit copy of one expert's largest matrix, rebuilt in forward and backward."""
    if not twinned(a, s) or s.quant == "none":
        return 0.0
    return DTYPE_BYTES[s.dtype] * max((i * o for _k, i, o, _e, _n in expert_stacks(a)), default=0)


def head_trained(a: Arch, s: Settings) -> bool:
    """Is the LM head's full weight trained (full fine-tune or a PEFT modules_to_save copy)?"""
    return not a.encoder and (s.lora_r is None or bool(set(s.modules_to_save) & HEAD_NAMES))


def quantized(s: Settings, lin: Linear) -> bool:
    """bitsandbytes converts every nn.Linear and Conv1D but the LM head (transformers skips the output
    embedding), so the vision tower too unless the user skips it."""
    if s.quant == "none" or lin.kind != "linear" or lin.group == "head":
        return False
    return lin.group != "vision" or s.quantize_vision


def quant_bytes(s: Settings, numel: int, rows: int) -> float:
    """Storage of one bitsandbytes-quantized weight matrix (bias excluded)."""
    if s.quant == "8bit":  # LLM.int8: int8 matrix + one fp32 scale per output row
        return numel + 4 * rows
    blocks = math.ceil(numel / NF4_BLOCK)  # 4-bit: two weights per byte, absmax per 64-block
    code = 16 * 4  # the 16-entry fp32 code book (NF4 or FP4)
    if s.double_quant:  # absmax as uint8 + one fp32 absmax per 256 blocks + their code book + offset
        return numel / 2 + code + blocks + 4 * math.ceil(blocks / NF4_DQ_BLOCK) + 256 * 4 + 4
    return numel / 2 + code + 4 * blocks


@dataclass(frozen=True)
class Tensor:
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


def trainables(a: Arch, s: Settings) -> list[Tensor]:
    """Every trainable tensor with its shape and dtype."""
    ub = unquantized_bytes(s)
    if s.lora_r is None:  # full fine-tune: every parameter of the model, in the weight dtype
        return [Tensor(rows, cols, n, ub, lead=lead, galore_target=g) for rows, cols, lead, g, n in a.tensors]
    ab, r = adapter_bytes(s), s.lora_r
    out = []
    for _name, in_f, out_f, mult, n in adapted(a, s):
        out += [Tensor(mult * r, in_f, n, ab), Tensor(out_f, mult * r, n, ab)]  # A: r x in, B: out x r
        if s.use_dora and mult == 1:  # magnitude vector per output feature, kept in fp32 by PEFT and TRL
            out.append(Tensor(out_f, 1, n, 4))
    # modules_to_save: PEFT trains a full copy of the module, in the dtype of the original
    out += [Tensor(a.vocab, a.hidden, 1, ub) for _ in s.modules_to_save]
    return out


def embedding_stays(a: Arch, s: Settings) -> str:
    """Why the input embedding must stay on the GPU ('' when finetune.models may keep it in host
    memory): it is trained, or shared with the LM head, which runs on the GPU."""
    if a.tied:
        return "it is tied to the LM head"
    if s.lora_r is None:
        return "a full fine-tune trains it"
    names = {m.leaf for m in a.modules if m.kind == "embedding"}
    if names & (set(s.modules_to_save) | {x[0].rpartition(".")[2] for x in adapted(a, s)}):
        return "LoRA or modules_to_save trains it"
    return ""


def weights_bytes(a: Arch, s: Settings) -> float:
    ub = unquantized_bytes(s)
    host = a.vocab * a.hidden * ub if s.offload_embedding else 0  # memory.check: only when allowed
    total, linear_params = 0.0, 0
    for lin in a.modules:
        if quantized(s, lin):
            linear_params += lin.count * lin.params
            total += lin.count * (
                quant_bytes(s, lin.in_f * lin.out_f, lin.out_f) + (lin.out_f * ub if lin.bias else 0)
            )
    if twinned(a, s):  # the fused experts in finetune.experts' storage instead of the weights' dtype
        linear_params += sum(i * o * e * n for _k, i, o, e, n in expert_stacks(a))
        total += expert_storage_bytes(a, s)
    return total + (a.params.total - linear_params) * ub - host


def state_bytes(s: Settings, t: Tensor) -> float:
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
        return projector + adam_bytes(projected, t.nbytes, eight_bit)
    if s.optim == "paged_adamw":  # bitsandbytes 32-bit states are fp32 whatever the parameter dtype
        return 8 * n
    return adam_bytes(n, t.nbytes, eight_bit)


def adam_bytes(n: int, param_bytes: int, eight_bit: bool) -> float:
    """Two moments: torch AdamW allocates them like the parameter; bitsandbytes 8-bit stores uint8
    plus one fp32 absmax per 256 values, except for tensors under 4096 values (kept 32-bit)."""
    if eight_bit:
        return 2 * (n + 4 * math.ceil(n / BNB_OPTIM_BLOCK)) if n >= BNB_OPTIM_MIN_8BIT else 8 * n
    return 2 * n * param_bytes


def optimizer_bytes(s: Settings, tensors: list[Tensor]) -> tuple[float, float]:
    """(state bytes resident on the GPU, transient bytes of one optimizer step)."""
    states = [(state_bytes(s, t), t) for t in tensors]
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
