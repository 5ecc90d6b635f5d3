"""Peak memory per device when a run is spread over several GPUs: DDP, FSDP2 and DeepSpeed ZeRO.

The single-device estimate (``memory.estimate``) is split by component and each component is
divided the way the strategy divides it:

* ``ddp``   -- every GPU holds the whole run; DDP's gradient buckets add a copy of the gradients.
* ``fsdp``  -- FSDP2 full shard (``fully_shard`` per decoder layer, as accelerate wraps it):
  parameters, gradients and optimizer state are divided by N. accelerate upcasts trainable
  parameters to fp32 under mixed precision (not with 4-bit weights), so a full fine-tune keeps fp32
  masters, fp32 gradients and fp32 Adam moments (16 bytes a parameter, divided by N). On top: the
  largest all-gathered unit in the compute dtype twice (the unit running and the one prefetched;
  the whole model when parameters are not resharded after forward) and one unit's unsharded
  gradient for the reduce-scatter. With QLoRA the 4-bit weights are sharded too, which needs
  ``bnb_4bit_quant_storage`` equal to the compute dtype. The fused MoE experts that
  finetune.experts quantizes are buffers, which FSDP and ZeRO-3 neither shard nor offload: every
  GPU holds all of them (their per-expert adapters are parameters and are sharded).
* ``zero2`` / ``zero3`` -- the ZeRO paper's mixed-precision accounting: 16-bit parameters and
  gradients, fp32 master weights and Adam moments (12 bytes a trained parameter). ZeRO-2 divides
  the optimizer state and the gradients by N, ZeRO-3 the parameters too; buckets as configured in
  the DeepSpeed config finetune writes.
* CPU offload moves the optimizer state (and with it the fp32 step) or the parameters to host RAM,
  which ``host_gib`` plans for the whole machine: all N ranks' offloaded state, or one copy of the
  weights (loading passes through host RAM before the optimizer exists), whichever is larger.

Activations do not change: each GPU runs its own micro-batch. No torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from finetune.memory import estimate as single_device
from finetune.memory import tensors
from finetune.memory.arch import describe
from finetune.memory.settings import ALLOCATOR_SLACK, CUDA_CONTEXT_GIB, DTYPE_BYTES, GIB, Estimate, Settings

STRATEGIES = ("none", "ddp", "fsdp", "zero2", "zero3")
NCCL_GIB = 0.5
"""GPU memory NCCL's communicators take outside torch's allocator (channels, proxy buffers)."""
ZERO2_BUCKET = 5e8
"""DeepSpeed's default reduce and all-gather bucket sizes (elements) for ZeRO-2, as finetune writes them."""
ADAM_MASTER_BYTES = 12
"""ZeRO mixed precision: fp32 master weights plus two fp32 Adam moments per trained parameter."""


@dataclass(frozen=True)
class Layout:
    """How a run is spread: the strategy, the number of processes and what goes to the CPU."""

    strategy: str = "none"  # one of STRATEGIES
    world: int = 1  # processes, one GPU each
    offload_optimizer: bool = False  # optimizer state and step in host RAM (FSDP2 cpu_offload, ZeRO)
    offload_params: bool = False  # parameters in host RAM between uses (FSDP2 cpu_offload, ZeRO-3)
    reshard_after_forward: bool = True  # FSDP2 / ZeRO-3: free gathered parameters after each forward


@dataclass
class DeviceEstimate(Estimate):
    """Estimate per GPU under a Layout, with what the sharding adds and what lives on the host."""

    strategy: str = "none"
    world_size: int = 1
    gathered_gib: float = 0.0  # all-gathered parameters of the units in flight (inside weights_gib)
    comm_gib: float = 0.0  # gradient buckets / reduce-scatter buffers (inside gradients_gib)
    host_gib: float = 0.0  # host RAM for the whole machine: offloaded state, or a weights copy

    def as_dict(self) -> dict:
        """The plan's public ``estimate`` object: the seven components, as for one GPU."""
        keep = {f.name for f in fields(Estimate)}
        return {k: v for k, v in super().as_dict().items() if k in keep}

    def layout_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "world_size": self.world_size,
            "gathered_gib": round(self.gathered_gib, 3),
            "comm_gib": round(self.comm_gib, 3),
            "host_gib": round(self.host_gib, 3),
        }


def _units(arch: dict, s: Settings) -> list[float]:
    """Bytes of each FSDP unit once gathered: each decoder layer, the embedding, the LM head (as
    accelerate wraps them), in the dtype they are all-gathered in."""
    a = describe(arch)
    c = DTYPE_BYTES[s.dtype]

    def size(lin) -> float:
        return (
            tensors.quant_bytes(s, lin.in_f * lin.out_f, lin.out_f)
            if tensors.quantized(s, lin)
            else lin.params * c
        )

    units = []
    for layer in a.layers:
        units += [sum(size(lin) for lin in layer.linears)] * layer.count
    units.append(a.vocab * a.hidden * c)  # embedding (the LM head too when tied)
    if not a.tied:
        units.append(a.vocab * a.hidden * c)
    return units


def per_device(arch: dict, s: Settings, layout: Layout = Layout()) -> DeviceEstimate:  # noqa: B008
    """Peak memory per GPU for ``arch`` under settings ``s`` spread as ``layout``."""
    if layout.strategy not in STRATEGIES:
        raise ValueError(f"Layout.strategy={layout.strategy!r} is not one of {STRATEGIES}")
    base, a = single_device(arch, s), describe(arch)
    n = max(layout.world, 1)
    if layout.strategy == "none" or (layout.strategy == "ddp" and n == 1):
        return DeviceEstimate(**{f.name: getattr(base, f.name) for f in fields(Estimate)}, world_size=1)

    full = s.lora_r is None
    half = s.dtype != "float32"
    weights, adapter = base.weights_gib * GIB, base.adapter_gib * GIB
    grads, optim = base.gradients_gib * GIB, base.optimizer_gib * GIB
    acts = base.activations_gib * GIB
    trained = grads / tensors.unquantized_bytes(s) if full else adapter / tensors.adapter_bytes(s)
    units = _units(arch, s)
    shard_params = layout.strategy in ("fsdp", "zero3")
    gathered = 0.0
    if shard_params:
        gathered = sum(units) if not layout.reshard_after_forward else 2 * max(units)

    if layout.strategy == "fsdp" and full and half and s.quant == "none":
        # accelerate's FSDP2 upcasts trainable parameters to fp32: masters, gradients and states follow
        fp32 = single_device(arch, replace(s, master_weights_fp32=True))
        weights, grads, optim = fp32.weights_gib * GIB, fp32.gradients_gib * GIB, fp32.optimizer_gib * GIB
    if layout.strategy in ("zero2", "zero3") and half:
        # fp32 master copies live in the optimizer; Adam moments are fp32 whatever the weights' dtype
        optim = max(optim, trained * ADAM_MASTER_BYTES)

    if layout.strategy == "ddp":
        comm = grads  # DDP's buckets hold a second copy of every gradient for the all-reduce
    elif layout.strategy == "fsdp":
        comm = max(units) if full else 0.0  # one unit's unsharded gradient, reduce-scattered
    elif layout.strategy == "zero2":
        comm = 2 * ZERO2_BUCKET * DTYPE_BYTES[s.dtype]
    else:  # zero3: reduce and prefetch buckets of hidden^2 elements
        comm = 2 * a.hidden**2 * DTYPE_BYTES[s.dtype]

    p_div = n if shard_params else 1
    g_div = 1 if layout.strategy == "ddp" else n
    # quantized experts (finetune.experts) are buffers: replicated on every GPU, never offloaded
    kept = tensors.expert_storage_bytes(a, s) if tensors.twinned(a, s) else 0.0
    weights -= kept
    gpu_weights = kept + (0.0 if layout.offload_params else weights / p_div)
    gpu_adapter = 0.0 if layout.offload_params else adapter / p_div
    gpu_grads = grads / g_div
    gpu_optim = 0.0 if layout.offload_optimizer else optim / g_div
    host = (optim / g_div if layout.offload_optimizer else 0.0) + (
        (weights + adapter) / p_div if layout.offload_params else 0.0
    )
    if layout.offload_optimizer:
        host += gpu_grads  # the fp32 step reads its gradients in host memory
        gpu_grads = grads / g_div if layout.strategy == "ddp" else 0.0

    early = gpu_grads if s.grad_accum > 1 else 0.0
    dynamic = max(acts + early, gpu_grads) + gathered + comm
    allocated = gpu_weights + gpu_adapter + gpu_optim + dynamic
    overhead = (CUDA_CONTEXT_GIB + NCCL_GIB) * GIB + ALLOCATOR_SLACK * allocated
    return DeviceEstimate(
        weights_gib=(gpu_weights + gathered) / GIB,
        adapter_gib=gpu_adapter / GIB,
        gradients_gib=(gpu_grads + comm) / GIB,
        optimizer_gib=gpu_optim / GIB,
        activations_gib=acts / GIB,
        overhead_gib=overhead / GIB,
        total_gib=(allocated + overhead) / GIB,
        approximate=base.approximate,
        notes=base.notes,
        strategy=layout.strategy,
        world_size=n,
        gathered_gib=gathered / GIB,
        comm_gib=comm / GIB,
        host_gib=max(host * n, weights + kept) / GIB,
    )
