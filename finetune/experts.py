"""Fused 3-D mixture-of-experts weights, quantized by us and adapted by per-expert LoRA.

In transformers 5 the experts of Mixtral, Qwen-MoE, DeepSeek, OLMoE and gpt-oss are one module with
two 3-D parameters (``gate_up_proj``, ``down_proj``: [experts, ...]). bitsandbytes only replaces
``nn.Linear``, so under ``quant=4bit`` those stacks -- about 90% of the weights -- stayed 16-bit, and
PEFT's parameter LoRA builds ``W + B@A`` for every expert in every forward. Here each experts module
is swapped for a twin that

* stores every expert's matrices quantized (NF4/FP4 with bitsandbytes' double quantization, one
  ``quantize_4bit`` per expert, or 8-bit blockwise), or 16-bit under ``quant=none``;
* dequantizes one expert's matrix at a time inside an autograd function that keeps nothing for
  backward and dequantizes again there, so the 16-bit copy lives for one matmul only;
* keeps only the gate_up output of each (token, expert) pair for the gate's backward, recomputing the
  activation's elementwise steps there;
* adds LoRA on the activations, ``x @ A_e^T @ B_e^T * alpha/r`` per expert (A: [E, r, in],
  B: [E, out, r]), never a merged weight; the first A reads the layer's shared input, kept once;
* scatters the routed outputs back without keeping them (torch's index_add_ would).

The adapters are not PEFT modules (PEFT freezes what it did not create, and saves only its own
layers): ``attach`` turns them back on after the trainer wrapped the model, ``save_adapters`` writes
``expert_adapters.safetensors`` next to PEFT's adapter, ``load_adapters`` reads it back (resume,
chat) and ``merge_expert_adapters`` folds it into a 16-bit model.

Placement (``load``): on the CPU everything is built in place. On a GPU the checkpoint is read
into host memory (16-bit experts in RAM, never on the GPU), then each decoder layer's experts are
quantized on the GPU one expert at a time and the layer moved there, so the GPU never holds more than
the quantized model plus one 16-bit expert. The GPU path has not been run on a GPU in this project.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from finetune.memory.tensors import EXPERT_KINDS, expert_kinds

ADAPTER_FILE = "expert_adapters.safetensors"
NF4_BLOCK = 64  # bitsandbytes' 4-bit block; the same constants the estimator counts
INT8_BLOCK = 256  # 8-bit blockwise: one fp32 absmax per 256 weights


def fused_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules holding fused 3-D gate_up_proj / down_proj stacks (already-swapped twins excluded)."""
    found = []
    for name, m in model.named_modules():
        gate_up, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
        if isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3:
            found.append((name, m))
    return found


class _DequantMatmul(torch.autograd.Function):
    """y = x @ W_e^T with W_e rebuilt from its quantized storage in forward and again in backward:
    nothing weight-sized is saved, and the frozen weight gets no gradient."""

    @staticmethod
    def forward(ctx, x, store, kind, e):
        ctx.store, ctx.kind, ctx.e = store, kind, e
        return x @ store.weight(kind, e, x.dtype).t()

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.store.weight(ctx.kind, ctx.e, grad.dtype), None, None, None


class _ScatterAdd(torch.autograd.Function):
    """out[tok] += y, in place. torch's index_add_ keeps y for its backward (it needs only y's shape):
    one hidden-sized copy per (token, expert) pair; this keeps the token indices alone."""

    @staticmethod
    def forward(ctx, out, tok, y):
        ctx.save_for_backward(tok)
        ctx.mark_dirty(out)
        return out.index_add_(0, tok, y)

    @staticmethod
    def backward(ctx, grad):
        (tok,) = ctx.saved_tensors
        return grad, None, grad.index_select(0, tok)


class _GatheredLoraA(torch.autograd.Function):
    """source[tok] @ A^T, for the LoRA A of an expert's first matmul. Backward gathers the rows again
    from ``source``, the layer's input that every expert shares, so that input is kept once instead of
    one hidden-sized copy of it per (token, expert) pair. Computed in the autocast dtype when on."""

    @staticmethod
    def forward(ctx, source, tok, a):
        device = source.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else a.dtype
        ctx.save_for_backward(source, tok, a)
        ctx.dtype = dtype
        return source[tok].to(dtype) @ a.to(dtype).t()

    @staticmethod
    def backward(ctx, grad):
        source, tok, a = ctx.saved_tensors
        grad = grad.to(ctx.dtype)
        grad_source = grad_a = None
        if ctx.needs_input_grad[0]:
            grad_source = torch.zeros_like(source).index_add_(
                0, tok, (grad @ a.to(ctx.dtype)).to(source.dtype)
            )
        if ctx.needs_input_grad[2]:
            grad_a = (grad.t() @ source[tok].to(ctx.dtype)).to(a.dtype)
        return grad_source, None, grad_a


class QuantizedExperts(nn.Module):
    """A fused experts module with quantized (or plain 16-bit) storage and optional per-expert LoRA.

    Storage is kept as [out, in] per expert whatever the original layout (gpt-oss stores [in, out]),
    so one code path serves every family; the gate activation is the original class's own."""

    def __init__(
        self, original: nn.Module, bits: str, quant_type: str = "nf4", double_quant: bool = True, device=None
    ):
        super().__init__()
        device = torch.device(device) if device is not None else original.gate_up_proj.device
        self.bits, self.quant_type, self.double_quant = bits, quant_type, double_quant
        self.num_experts = original.gate_up_proj.shape[0]
        # gpt-oss (not decorated with transformers' experts interface) stores [in, out] with biases
        transposed = getattr(original, "is_transposed", "gate_up_proj_bias" in original._parameters)
        self.dtype = original.gate_up_proj.dtype
        self.shapes: dict[str, tuple[int, int]] = {}
        for kind in EXPERT_KINDS:
            stack = getattr(original, kind).detach()
            if transposed:
                stack = stack.transpose(1, 2)
            self.shapes[kind] = (stack.shape[1], stack.shape[2])
            self._store(kind, stack, device)
            delattr(original, kind)  # the 16-bit stack goes as soon as its quantized twin exists
            bias = original._parameters.get(kind + "_bias")
            if bias is not None:
                self.register_parameter(
                    kind + "_bias", nn.Parameter(bias.detach().to(device), requires_grad=False)
                )
        # the gate (SwiGLU, gpt-oss's clamped variant, ...) is the original class's method and attributes
        self._gate = type(original)._apply_gate if hasattr(type(original), "_apply_gate") else None
        for attr in ("act_fn", "alpha", "limit", "is_concatenated"):
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))
        self.scale = 0.0
        self.adapted: tuple[str, ...] = ()

    # ---- storage
    def _store(self, kind: str, stack: torch.Tensor, device) -> None:
        import bitsandbytes.functional as bnbf

        E = stack.shape[0]
        if self.bits == "none":
            self.register_buffer(kind, stack.to(device).contiguous())
            return
        parts: dict[str, list] = {}
        for e in range(E):  # one expert at a time on the device: its 16-bit copy is the only transient
            w = stack[e].to(device)
            if self.bits == "4bit":
                q, qs = bnbf.quantize_4bit(
                    w, blocksize=NF4_BLOCK, compress_statistics=self.double_quant, quant_type=self.quant_type
                )
                pieces = {"q": q.view(-1), "absmax": qs.absmax}
                self._code = qs.code
                if qs.nested:
                    pieces |= {"absmax2": qs.state2.absmax, "offset": qs.offset.view(1)}
                    self._code2 = qs.state2.code
            else:
                q, qs = bnbf.quantize_blockwise(w.float(), blocksize=INT8_BLOCK)
                pieces = {"q": q.view(-1), "absmax": qs.absmax}
                self._code = qs.code
            for k, v in pieces.items():
                parts.setdefault(k, []).append(v)
            del w
        for k, v in parts.items():
            self.register_buffer(f"{kind}_{k}", torch.stack(v))
        self.register_buffer(f"{kind}_code", self._code.clone())
        if self.bits == "4bit" and self.double_quant:
            self.register_buffer(f"{kind}_code2", self._code2.clone())
        del self._code
        self.__dict__.pop("_code2", None)

    def weight(self, kind: str, e: int, dtype) -> torch.Tensor:
        """Expert ``e``'s [out, in] matrix in ``dtype``: a transient copy unless storage is 16-bit."""
        import bitsandbytes.functional as bnbf
        from bitsandbytes.functional import QuantState

        if self.bits == "none":
            return getattr(self, kind)[e].to(dtype)
        b = lambda name: getattr(self, f"{kind}_{name}")  # noqa: E731
        shape = self.shapes[kind]
        # dequantized straight into ``dtype``: one transient copy (the estimator's), not an fp32/bf16 one too
        if self.bits == "8bit":
            qs = QuantState(absmax=b("absmax")[e], code=b("code"), blocksize=INT8_BLOCK, dtype=dtype)
            return bnbf.dequantize_blockwise(b("q")[e], qs).view(shape)
        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=b("absmax2")[e], code=b("code2"), blocksize=256, dtype=torch.float32)
        qs = QuantState(
            absmax=b("absmax")[e],
            shape=torch.Size(shape),
            code=b("code"),
            blocksize=NF4_BLOCK,
            quant_type=self.quant_type,
            dtype=dtype,
            offset=b("offset")[e] if self.double_quant else None,
            state2=state2,
        )
        return bnbf.dequantize_4bit(b("q")[e].view(-1, 1), qs)

    # ---- LoRA
    def add_adapters(self, r: int, alpha: float, kinds: tuple[str, ...], dtype) -> None:
        """Per-expert LoRA on ``kinds``: A like PEFT's kaiming-uniform init, B zero (starts as the base)."""
        device = getattr(self, f"{EXPERT_KINDS[0]}_q", getattr(self, EXPERT_KINDS[0], None)).device
        self.scale, self.adapted = alpha / r, tuple(kinds)
        for kind in kinds:
            out_f, in_f = self.shapes[kind]
            bound = 1 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)) on an [r, in] matrix
            a = torch.empty(self.num_experts, r, in_f, device=device, dtype=dtype).uniform_(-bound, bound)
            self.register_parameter(f"{kind}_lora_A", nn.Parameter(a))
            self.register_parameter(
                f"{kind}_lora_B",
                nn.Parameter(torch.zeros(self.num_experts, out_f, r, device=device, dtype=dtype)),
            )

    def _project(self, kind: str, e: int, x: torch.Tensor, rows=None) -> torch.Tensor:
        """x @ W_e^T (+ bias, + LoRA); ``rows`` = (source, tok) when x is source[tok]."""
        y = _DequantMatmul.apply(x, self, kind, e)
        bias = self._parameters.get(kind + "_bias")
        if bias is not None:
            y = y + bias[e]
        if kind in self.adapted:
            a, b = getattr(self, f"{kind}_lora_A")[e], getattr(self, f"{kind}_lora_B")[e]
            xa = _GatheredLoraA.apply(*rows, a) if rows is not None else x.to(a.dtype) @ a.t()
            y = y + (xa @ b.t()).to(y.dtype) * self.scale
        return y

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self._gate is not None:
            return self._gate(self, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, hidden_states, top_k_index, top_k_weights):
        # the eager expert loop of transformers' own classes, with the projections swapped
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e == self.num_experts:
                continue
            pos, tok = torch.where(mask[e])
            gate_up = self._project("gate_up_proj", e, hidden_states[tok], rows=(hidden_states, tok))
            if gate_up.requires_grad:
                # the gate's elementwise intermediates (gpt-oss: clamps, sigmoid, products, four
                # expert widths a token) are rebuilt from gate_up in backward instead of kept
                h = checkpoint(self._apply_gate, gate_up, use_reentrant=False, preserve_rng_state=False)
            else:
                h = self._apply_gate(gate_up)
            y = self._project("down_proj", e, h) * top_k_weights[tok, pos, None]
            out = _ScatterAdd.apply(out, tok, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, storage={self.bits}, shapes={self.shapes}, lora={self.adapted}"


def twins(model: nn.Module) -> list[tuple[str, QuantizedExperts]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedExperts)]


def swap(model: nn.Module, bits: str, quant_type: str = "nf4", double_quant: bool = True, device=None) -> int:
    """Replace every fused experts module by its quantized twin, layer by layer; returns how many."""
    found = fused_experts(model)
    for name, m in found:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, QuantizedExperts(m, bits, quant_type, double_quant, device))
        if device is not None:  # the rest of the layer follows its experts onto the device
            nn.Module.to(parent, device)
    return len(found)


def add_adapters(model: nn.Module, targets: list[str], r: int, alpha: float, dtype) -> int:
    kinds = expert_kinds(tuple(targets))
    if not kinds:
        return 0
    found = twins(model)
    for _, m in found:
        m.add_adapters(r, alpha, kinds, dtype)
    return len(found)


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Expert adapters by name, relative to the base transformers model (PEFT's wrapper prefix removed)."""
    out = {}
    for n, p in model.named_parameters():
        if "_lora_A" in n or "_lora_B" in n:
            out[n.removeprefix("base_model.model.")] = p
    return out


def attach(trainer) -> None:
    """After the trainer wrapped the model in PEFT (which froze everything it did not create): train
    the expert adapters again, in the dtype TRL gave PEFT's adapters. The trainer (finetune.oom) saves
    them into each checkpoint before it is sealed and loads them back on resume."""
    params = adapter_parameters(trainer.model)
    if not params:
        return
    peft_dtypes = [p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad]
    for p in params.values():
        if peft_dtypes:
            p.data = p.data.to(peft_dtypes[0])
        p.requires_grad_(True)


def save_adapters(model: nn.Module, folder) -> Path | None:
    """``<folder>/expert_adapters.safetensors`` with each tensor [E, r, in] / [E, out, r] and the scale."""
    from safetensors.torch import save_file

    params = adapter_parameters(model)
    if not params:
        return None
    scales = {n: m.scale for n, m in twins(model)}
    target = Path(folder) / ADAPTER_FILE
    save_file(
        {n: p.detach().contiguous().cpu() for n, p in params.items()},
        str(target),
        metadata={
            "scales": repr(sorted({round(s, 8) for s in scales.values()})),
            "scale": str(next(iter(scales.values()))),
        },
    )
    return target


def _read(folder):
    from safetensors import safe_open

    path = Path(folder) / ADAPTER_FILE
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, float(f.metadata()["scale"])


def load_adapters(model: nn.Module, folder) -> None:
    """Copy saved expert adapters into a model whose twins already carry adapters of the same shape."""
    tensors, _ = _read(folder)
    params = adapter_parameters(model)
    missing = sorted(set(tensors) - set(params))
    assert not missing, f"expert adapters without a place in the model: {missing[:3]}"
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)


def merge_expert_adapters(model: nn.Module, adapter_dir) -> int:
    """Fold ``<adapter_dir>/expert_adapters.safetensors`` into the 16-bit fused experts of ``model``
    (a plain transformers model, loaded unquantized): W_e += scale * B_e @ A_e in the stored layout.
    Returns the number of stacks changed (0 when the run trained no expert adapter)."""
    if not (Path(adapter_dir) / ADAPTER_FILE).is_file():
        return 0
    tensors, scale = _read(adapter_dir)
    modules = dict(model.named_modules())
    done = 0
    with torch.no_grad():
        for key, a in tensors.items():
            if "_lora_A" not in key:
                continue
            module_name, _, leaf = key.rpartition(".")
            kind = leaf.removesuffix("_lora_A")
            b = tensors[f"{module_name}.{kind}_lora_B"]
            module = modules.get(module_name) or modules[module_name.removeprefix("base_model.model.")]
            w = getattr(module, kind)
            delta = scale * torch.bmm(b.float(), a.float())  # [E, out, in]
            transposed = getattr(module, "is_transposed", "gate_up_proj_bias" in module._parameters)
            if transposed:
                delta = delta.transpose(1, 2)
            w.add_(delta.to(w.dtype))
            done += 1
    return done
