"""Check the memory estimator's tensor accounting against PyTorch, without a GPU.

Builds a real-size model from an arch dict under ``FakeTensorMode`` (no memory is allocated),
applies PEFT LoRA the way our pipeline does (or trains it in full), runs one forward + backward +
optimizer step under bf16 autocast with gradient checkpointing, and records the per-category peaks
that ``torch.distributed._tools.mem_tracker.MemTracker`` sees (parameters, gradients, optimizer
states, activations = its "Activation" + "Temp" categories, which it may mis-split under
checkpointing).  Those peaks are compared with ``finetune.memory.estimate`` components.

    python scripts/fake_tensor_check.py            # the table recorded in BENCHMARKS.md (~4 min)
    python scripts/fake_tensor_check.py --quick    # small subset, < 1 min
    python scripts/fake_tensor_check.py --extra    # narrower mechanisms and known CPU/CUDA gaps

bitsandbytes 4-bit cannot run under fake tensors, so :func:`nf4_storage_bytes` quantizes a real
tiny ``Linear4bit`` on CPU and reports its bytes for comparison with the analytic formula.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune.memory import GIB, Settings, describe, estimate  # noqa: E402

ARCHS = Path(__file__).resolve().parents[1] / "tests" / "archs"


def _install_fake_friendly_module_to() -> None:
    """``nn.Module.to`` swaps parameters via ``torch.utils.swap_tensors`` for fake tensors, which
    fails when FakeTensorMode holds a weakref to them; PEFT calls ``.to`` when it injects adapters.
    Everything lives on the fake CPU device, so only a dtype change matters: apply it via ``.data``."""

    def to(self, *args, **kwargs):
        dtype = kwargs.get("dtype") or next((x for x in args if isinstance(x, torch.dtype)), None)
        if dtype is not None:
            for t in list(self.parameters()) + list(self.buffers()):
                if t.dtype.is_floating_point:
                    t.data = t.data.to(dtype)
        return self

    torch.nn.Module.to = to


class _PeakTracker:
    """MemTracker plus per-category peaks (MemTracker itself keeps the breakdown at the total peak)."""

    def __new__(cls):
        from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

        class Tracker(MemTracker):
            def __init__(self):
                super().__init__()
                self.peaks: dict[str, int] = {}

            def _update_peak_stats(self, peak_state):
                super()._update_peak_stats(peak_state)
                for snap in self._curr_mem_snap.values():
                    act = snap.get(_MemRefType.ACT, 0) + snap.get(_MemRefType.TEMP, 0)
                    for key, val in (
                        ("params", snap.get(_MemRefType.PARAM, 0)),
                        ("grads", snap.get(_MemRefType.GRAD, 0)),
                        ("optim", snap.get(_MemRefType.OPT, 0)),
                        ("acts", act),
                    ):
                        self.peaks[key] = max(self.peaks.get(key, 0), val)

            def _track(self, reftype, t):
                # A weight gradient is created as "Temp" and only re-tagged "Gradient" when its hook
                # fires after the op; count it as a gradient from birth so activations stay clean.
                if reftype == _MemRefType.TEMP and (tuple(t.shape), t.dtype) in self.grad_shapes:
                    reftype = _MemRefType.GRAD
                super()._track(reftype, t)

            def track_external(self, *external):
                super().track_external(*external)
                self.grad_shapes = {
                    (tuple(p.shape), p.dtype)
                    for m in external
                    if isinstance(m, torch.nn.Module)
                    for p in m.parameters()
                    if p.requires_grad and p.dim() >= 2
                }

                # MemTracker hooks every parameter's gradient, which torch refuses for frozen ones
                # (LoRA): mark those as already hooked with a no-op handle.
                class NoHook:
                    def remove(self):
                        pass

                for obj in external:
                    if isinstance(obj, torch.nn.Module):
                        for p in obj.parameters():
                            if not p.requires_grad:
                                self._param_to_grad_hook_handles[p] = (NoHook(), NoHook())

        return Tracker()


def measure(arch: dict, s: Settings) -> dict[str, float]:
    """Per-category peak bytes of one training step of ``arch`` under ``s``, on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if s.quant != "none":
        raise ValueError("bitsandbytes layers do not run under fake tensors; use nf4_storage_bytes()")
    _install_fake_friendly_module_to()
    dtype = torch.float32 if (s.dtype == "float32" or s.master_weights_fp32) else getattr(torch, s.dtype)
    with FakeTensorMode():
        config = AutoConfig.for_model(
            **{k: v for k, v in arch.items() if not k.startswith("_") and k != "quantization_config"}
        )
        # flash-attention kernels do not run on CPU; SDPA saves the same tensors (q, k, v, out, lse).
        # Architectures without an SDPA path (gpt-oss sinks, Gemma-2 soft-capping) run eager, as the
        # estimator assumes.
        attn = "sdpa" if s.attn == "flash_attention_2" else s.attn
        config._attn_implementation = attn if describe(arch).sdpa_supported else "eager"
        encoder = arch["model_type"] == "bert"  # the estimator models BERT as a sequence classifier
        auto = AutoModelForSequenceClassification if encoder else AutoModelForCausalLM
        model = auto.from_config(config, dtype=dtype)
        if s.lora_r is not None:
            from peft import LoraConfig, get_peft_model

            targets = "all-linear" if "all-linear" in s.lora_targets else list(s.lora_targets)
            lora = LoraConfig(
                r=s.lora_r,
                target_modules=targets,
                lora_dropout=s.lora_dropout,
                use_dora=s.use_dora,
                modules_to_save=list(s.modules_to_save) or None,
            )
            model = get_peft_model(model, lora)
        if s.grad_ckpt:
            model.gradient_checkpointing_enable()
            if s.lora_r is not None:
                model.enable_input_require_grads()  # what TRL does for PEFT + checkpointing
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        if s.optim == "adamw":
            opt = torch.optim.AdamW(params, lr=1e-4, fused=s.fused_optimizer, foreach=not s.fused_optimizer)
        elif s.optim == "adafactor":
            from transformers.optimization import Adafactor

            opt = Adafactor(params, lr=1e-4, scale_parameter=False, relative_step=False)
        elif s.optim == "sgd":
            opt = torch.optim.SGD(params, lr=1e-4)
        else:
            raise ValueError(f"optim {s.optim!r} is not run under fake tensors here")
        ids = torch.randint(0, arch["vocab_size"], (s.batch_size, s.seq_len))
        mask = torch.ones_like(ids) if (s.batch_size > 1 and not s.packed) or encoder else None
        labels = torch.zeros(s.batch_size, dtype=torch.long) if encoder else ids
        tracker = _PeakTracker()
        tracker.track_external(model, opt, ids)
        autocast = torch.autocast("cpu", dtype=getattr(torch, s.dtype), enabled=s.dtype != "float32")
        with tracker:
            for _ in range(s.grad_accum):
                with autocast:
                    loss = model(
                        input_ids=ids, attention_mask=mask, labels=labels, use_cache=False
                    ).loss  # as TRL calls it
                loss.backward()
                del loss
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {k: v / GIB for k, v in tracker.peaks.items()}


def compare(arch: dict, s: Settings) -> dict[str, float]:
    """Measured vs estimated GiB per category (params = weights + adapter)."""
    est = estimate(arch, s)
    got = measure(arch, s)
    return {
        "params": (got["params"], est.weights_gib + est.adapter_gib),
        "grads": (got["grads"], est.gradients_gib),
        "optim": (got["optim"], est.optimizer_gib),
        "acts": (got["acts"], est.activations_gib),
    }


def nf4_storage_bytes(in_f: int, out_f: int, double_quant: bool, quant_type: str = "nf4") -> int:
    """Bytes a real bitsandbytes ``Linear4bit`` holds after quantizing on CPU (weight + quant state)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        in_f,
        out_f,
        bias=False,
        compute_dtype=torch.bfloat16,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    layer = layer.to("cpu")  # quantization happens on the move to a device
    if getattr(layer.weight, "quant_state", None) is None:
        layer.weight = bnb.nn.Params4bit(
            torch.randn(out_f, in_f, dtype=torch.bfloat16),
            requires_grad=False,
            compress_statistics=double_quant,
            quant_type=quant_type,
        )._quantize("cpu")
    qs = layer.weight.quant_state
    tensors = [layer.weight.data, qs.absmax, qs.code]
    if qs.nested:
        tensors += [qs.state2.absmax, qs.state2.code, qs.offset]
    return sum(t.numel() * t.element_size() for t in tensors)


def load(name: str, layers: int | None = None) -> dict:
    arch = json.loads((ARCHS / f"{name}.json").read_text())
    if layers is not None:
        arch["num_hidden_layers"] = layers
        if "layer_types" in arch:
            arch["layer_types"] = arch["layer_types"][:layers]
    return arch


# (label, arch file, layers or None for all, settings)
CASES = [
    ("qwen2.5-7b LoRA r16 all-linear, S=2048", "qwen2.5-7b", None, Settings(seq_len=2048)),
    ("qwen2.5-7b full FT AdamW, S=1024", "qwen2.5-7b", None, Settings(lora_r=None, seq_len=1024)),
    ("llama-3-8b LoRA r16, B=2 S=1024", "llama-3-8b", None, Settings(batch_size=2, seq_len=1024)),
    ("mixtral (4 of 32 layers) LoRA r16, S=1024", "mixtral-8x7b", 4, Settings(seq_len=1024)),
    ("gpt-oss-20b (4 of 24 layers) LoRA r16, S=1024", "gpt-oss-20b", 4, Settings(seq_len=1024)),
    (
        "gemma-2-2b LoRA q,v r8, eager, S=1024",
        "gemma-2-2b",
        None,
        Settings(lora_r=8, lora_targets=("q_proj", "v_proj"), attn="eager", seq_len=1024),
    ),
    (
        "phi-3-mini full FT, no ckpt, S=512",
        "phi-3-mini",
        4,
        Settings(lora_r=None, grad_ckpt=False, seq_len=512),
    ),
    ("llama-3-8b (2 layers) DoRA r16, S=1024", "llama-3-8b", 2, Settings(use_dora=True, seq_len=1024)),
]
QUICK = [CASES[3], CASES[6]]
# Narrower mechanisms, and the cases where CPU fake tensors and CUDA differ (see BENCHMARKS.md)
EXTRA = [
    (
        "phi-3-mini (2 layers) full FT amp fp32 master, S=1024",
        "phi-3-mini",
        2,
        Settings(lora_r=None, master_weights_fp32=True, seq_len=1024),
    ),
    (
        "phi-3-mini (2 layers) full FT fp32, no ckpt, S=512",
        "phi-3-mini",
        2,
        Settings(lora_r=None, dtype="float32", grad_ckpt=False),
    ),
    (
        "phi-3-mini (2 layers) full FT adafactor, S=512",
        "phi-3-mini",
        2,
        Settings(lora_r=None, optim="adafactor"),
    ),
    (
        "phi-3-mini (2 layers) full FT foreach AdamW, S=512",
        "phi-3-mini",
        2,
        Settings(lora_r=None, fused_optimizer=False),
    ),
    (
        "llama-3-8b (4 layers) LoRA eager, no ckpt, S=1024",
        "llama-3-8b",
        4,
        Settings(attn="eager", grad_ckpt=False, seq_len=1024),
    ),
    (
        "llama-3-8b (4 layers) LoRA B=2 padded, no ckpt",
        "llama-3-8b",
        4,
        Settings(batch_size=2, grad_ckpt=False),
    ),
    ("mixtral (2 layers) LoRA, no ckpt, S=1024", "mixtral-8x7b", 2, Settings(grad_ckpt=False, seq_len=1024)),
    (
        "llama-3-8b (4 layers) LoRA dropout 0.05, no ckpt [CPU]",
        "llama-3-8b",
        4,
        Settings(lora_dropout=0.05, grad_ckpt=False, seq_len=1024),
    ),
    (
        "gemma-2-2b (4 layers) full FT, tied, no ckpt [CPU]",
        "gemma-2-2b",
        4,
        Settings(lora_r=None, grad_ckpt=False, seq_len=1024),
    ),
    (
        "llama-3-8b (2 layers) DoRA, no ckpt [gap]",
        "llama-3-8b",
        2,
        Settings(use_dora=True, grad_ckpt=False, seq_len=1024),
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small cases only")
    parser.add_argument("--extra", action="store_true", help="narrower mechanisms and known CPU/CUDA gaps")
    args = parser.parse_args()
    cases = QUICK if args.quick else EXTRA if args.extra else CASES
    print(f"{'case':48} {'category':8} {'measured':>9} {'estimate':>9} {'error':>7}  (GiB)")
    worst = {"params": 0.0, "grads": 0.0, "optim": 0.0, "acts": 0.0}
    for label, name, layers, s in cases:
        t0 = time.time()
        rows = compare(load(name, layers), s)
        for cat, (got, est) in rows.items():
            err = 0.0 if got == est == 0 else (est - got) / got * 100
            worst[cat] = max(worst[cat], abs(err))
            print(f"{label:48} {cat:8} {got:9.3f} {est:9.3f} {err:+6.1f}%")
        print(f"{'':48} ({time.time() - t0:.0f} s)")
    print("worst |error| per category: " + ", ".join(f"{k} {v:.1f}%" for k, v in worst.items()))


if __name__ == "__main__":
    main()
