"""The auto-fit resolver: fill every setting left on `auto` so the run fits the GPU, and say why.

Preference order (documented in the README):
1. quality first: no quantization, then 8-bit, then 4-bit; AdamW, then 8-bit AdamW, then paged 8-bit
   AdamW. The first (quantization, optimizer) level where anything fits is taken.
2. within that level, the fastest (checkpointing, micro-batch) pair that fits, by the speed model
   below: no checkpointing when the run fits without it, the largest micro-batch that fits.
3. `batch.effective` never changes: micro-batch x accumulation x GPUs stays equal to it.
4. across GPUs (`dist=auto`): one process when there is one GPU; with several, the first of
   `dist.candidates` (DDP, FSDP2, FSDP2 with CPU offload) that fits each GPU and the host RAM.
5. host RAM only where nothing fits at a level without it (one process or DDP): the frozen input
   embedding of a LoRA run, then also the checkpointed layer inputs (`_offload_tiers`).
Nothing the user pinned is ever changed: only fields whose value is `auto` are filled.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any

from finetune import UserError, config_dir, hardware, launch, memory, source, warn
from finetune.memory import distributed, tensors
from finetune.schema import AUTO, FULL_LR, LORA_LR, Config, HardwareConfig, command_line_keys, targets

SAFETY_MARGIN = 0.10
"""Plan to 90% of the GPU's memory: the estimate is a model, long batches vary, other processes live."""
CPU_RESERVE_GIB = 4.0
"""On a CPU the plan may use total RAM less this (the OS, the shell, the data loader) and the margin:
total, not free, memory, so the same command gives the same plan every time."""

HOST_GIB_PER_GPU = 256
"""dist.host_memory_gb=auto for a GPU preset: 8-GPU servers of the A100/H100 class ship 2 TB of RAM."""
MAX_GPUS = 64
"""The largest GPU count finetune.plan and the "does not fit" message look for."""

QUANT_ORDER = ("none", "8bit", "4bit")
OPTIM_ORDER = ("adamw", "adamw_8bit", "paged_adamw_8bit")
BATCH_SIZES = (32, 16, 8, 4, 2, 1)
LORA_RANK = 16  # the seed guide's "better" rank: r barely moves memory (adapters are <1% of a 7B)

PEAK_UTILISATION = 0.40
"""Share of the GPU's dense 16-bit FLOP/s a Hugging Face training step reaches with a large
micro-batch (model FLOPs utilisation; 35-45% is typical for 7B-class LoRA/full runs with SDPA)."""
SATURATION_TOKENS = 512
"""Tokens per micro-batch at which utilisation reaches half its peak: small micro-batches leave
the tensor cores idle between kernel launches."""
QUANT_TIME = {"none": 1.0, "8bit": 1 / 0.8, "4bit": 1 / 0.6}
"""Dequantization cost: the memory guide's speed column (8-bit 0.8x, 4-bit 0.6x of fp16)."""


@dataclass
class Plan:
    cfg: Config  # the resolved config: no `auto` left
    decisions: list[tuple[str, str, str]]  # (setting, value, why)
    estimate: memory.Estimate
    budget_gib: float
    fits: bool
    params: int
    active_params: int  # per token: differs from params for mixtures of experts and VLMs
    tokens_per_second: float | None  # None where the hardware's FLOP/s are unknown (CPU)
    lr_why: str = ""  # why this learning rate, when it was auto


def budget_gib(hw: HardwareConfig) -> float:
    """Memory the plan may use on one device: the GPU's, or the machine's RAM on a CPU."""
    if hw.num_gpus > 0:
        return hw.gpu_memory_gb * (1 - SAFETY_MARGIN)
    import psutil

    total = psutil.virtual_memory().total / 2**30
    return max(total - CPU_RESERVE_GIB, total / 2) * (1 - SAFETY_MARGIN)


def host_budget_gib(cfg: Config, world: int) -> float:
    """Host RAM the plan may use for offloaded state, for the whole machine."""
    host = cfg.dist.host_memory_gb
    if host == AUTO:
        if cfg.hw.num_gpus == 0:
            import psutil

            host = psutil.virtual_memory().total / 2**30
        else:
            host = HOST_GIB_PER_GPU * world
    return host * (1 - SAFETY_MARGIN)


def layouts(cfg: Config, world: int) -> list[tuple[str, distributed.Layout, dict]]:
    """(dist option, layout, the dist keys it sets) to try, in order of preference."""
    d = cfg.dist

    def layout(name: str, keys: dict) -> tuple[str, distributed.Layout, dict]:
        merged = {
            **{
                k: getattr(d, k)
                for k in ("reshard_after_forward", "cpu_offload", "offload_optimizer", "offload_params")
            },
            **keys,
        }
        strategy = merged.get("strategy", d.strategy)
        return (
            name,
            distributed.Layout(
                strategy=strategy,
                world=world,
                offload_optimizer=bool(merged["cpu_offload"] or merged["offload_optimizer"]),
                offload_params=bool(merged["cpu_offload"] or merged["offload_params"]),
                reshard_after_forward=bool(merged["reshard_after_forward"]),
            ),
            keys,
        )

    if d.strategy != AUTO:
        return [layout(d.strategy, {})]
    if world == 1:
        return [layout("none", {"strategy": "none"})]
    if cfg.hw.num_gpus == 0:  # accelerate runs every strategy as DDP on CPU
        return [layout("ddp", {"strategy": "ddp"})]
    import yaml

    return [
        layout(n, yaml.safe_load((config_dir() / "dist" / f"{n}.yaml").read_text())) for n in d.candidates
    ]


def settings(cfg: Config, arch: dict, **pick: Any) -> memory.Settings:
    """The estimator's view of a config, with the candidate values in `pick`."""
    lo, q = cfg.lora, cfg.quant
    return memory.Settings(
        quant=pick["quant"],
        bnb_4bit_quant_type=q.bnb_4bit_quant_type,
        double_quant=q.double_quant,
        lora_r=pick["r"] if lo.enabled else None,
        lora_targets=tuple(targets(lo)),
        use_dora=lo.use_dora,
        lora_dropout=lo.dropout,
        optim=pick["optim"],
        galore_rank=cfg.optim.galore_rank,
        galore_retain_grad=not cfg.optim.galore_layerwise,
        batch_size=pick["size"],
        seq_len=cfg.data.max_length,
        grad_accum=pick["accum"],
        grad_ckpt=pick["ckpt"],
        attn=attention(cfg, arch),
        # GPU memory only: on a CPU the host is the device
        offload_embedding=bool(pick.get("embed")) and cfg.hw.num_gpus > 0,
        offload_activations=bool(pick.get("offload_acts")) and cfg.hw.num_gpus > 0,
        dtype=hardware.precision(cfg).weights,
        loss_impl="fused",  # TRL's SFTTrainer computes the loss in chunks: the full logits never exist
    )


def active_params(arch: dict) -> int:
    """Parameters one token multiplies through: not the idle experts of a mixture of experts, not the
    vision tower (it runs per image), not an untied embedding table (a lookup). gpt-oss-20b: 3.6B."""
    counts, d = memory.count_params(arch), memory.dims(arch)
    idle = counts.experts * (1 - d["top_k"] / d["experts"]) if d["experts"] else 0
    lookup = counts.embeddings if counts.lm_head else 0  # tied: the same matrix is the LM head
    return round(counts.total - counts.vision - idle - lookup)


def tokens_per_second(
    arch: dict, s: memory.Settings, hw: HardwareConfig, relative: bool = False
) -> float | None:
    """Training throughput from FLOPs per token and the GPU's rate (see the constants above).

    Forward: 2 FLOPs per active weight per token, plus causal attention. Backward: twice the forward
    for a full fine-tune; once for LoRA (input gradients only: frozen weights get none). Gradient
    checkpointing recomputes the forward. `relative=True` ranks settings when FLOP/s are unknown.
    """
    if hw.tflops <= 0 and not relative:
        return None
    d = memory.dims(arch)
    active = active_params(arch)
    attention = 2 * d["layers"] * s.seq_len * d["heads"] * d["head_dim"]  # QK^T and AV, causal half
    forward = 2 * active + attention
    backward = forward if s.lora_r is not None else 2 * forward
    flops = (forward + backward + (forward if s.grad_ckpt else 0)) * QUANT_TIME[s.quant]
    tokens = s.batch_size * s.seq_len
    utilisation = PEAK_UTILISATION * tokens / (tokens + SATURATION_TOKENS)
    rate = (hw.tflops if hw.tflops > 0 else 1.0) * 1e12
    return rate * utilisation / flops * max(hw.num_gpus, 1)


def _pinned(value: Any) -> bool:
    return value != AUTO


def _search(cfg: Config, arch: dict, budget: float, world: int | None = None):
    """(pick, estimate, fits): the preferred candidate that fits, or the smallest one if none does."""
    gpus = world or launch.world_size(cfg)
    b, host = cfg.batch, host_budget_gib(cfg, gpus)
    quants = (
        [cfg.quant.load_in]
        if _pinned(cfg.quant.load_in)
        else (QUANT_ORDER if cfg.lora.enabled else ("none",))
    )
    optims = [cfg.optim.name] if _pinned(cfg.optim.name) else OPTIM_ORDER
    ckpts = [cfg.train.gradient_checkpointing] if _pinned(cfg.train.gradient_checkpointing) else (False, True)
    # validate() guarantees batch.effective splits exactly into the pinned factors and the GPUs.
    if _pinned(b.size):
        sizes = [b.size]
    elif _pinned(b.grad_accum):
        sizes = [b.effective // (b.grad_accum * gpus)]
    else:
        sizes = [n for n in BATCH_SIZES if b.effective % (n * gpus) == 0] or [1]
    rank = cfg.lora.r if _pinned(cfg.lora.r) else LORA_RANK
    tiers = _offload_tiers(cfg, arch, rank)
    smallest = None
    for quant in quants:
        for optim in optims:
            for dist_name, layout, dist_keys in layouts(cfg, gpus):
                if (
                    optim != "adamw"
                    and not _pinned(cfg.optim.name)
                    and layout.strategy not in ("none", "ddp")
                ):
                    continue  # bitsandbytes' states over FSDP2's DTensor shards are untested; DeepSpeed has its own
                for embed, offload_acts in tiers:  # host-memory offloads only when nothing fits without
                    if (embed or offload_acts) and layout.strategy not in ("none", "ddp"):
                        continue  # FSDP / DeepSpeed place weights and checkpoint layers themselves
                    fitting = []
                    for ckpt in ckpts if not offload_acts else [c for c in ckpts if c]:
                        for size in sizes:
                            # no effective batch means both are pinned (validate)
                            accum = b.grad_accum if b.effective is None else b.effective // (size * gpus)
                            pick = {
                                "quant": quant,
                                "optim": optim,
                                "ckpt": ckpt,
                                "size": size,
                                "accum": accum,
                                "r": rank,
                                "dist": dist_name,
                                "dist_keys": dist_keys,
                                "embed": embed,
                                "offload_acts": offload_acts,
                            }
                            s = settings(cfg, arch, **pick)
                            est = distributed.per_device(arch, s, layout)
                            if est.total_gib <= budget and (layout.world == 1 or est.host_gib <= host):
                                fitting.append((tokens_per_second(arch, s, cfg.hw, relative=True), pick, est))
                            if smallest is None or est.total_gib < smallest[1].total_gib:
                                smallest = (pick, est)
                    if fitting:
                        _, pick, est = max(fitting, key=lambda f: f[0])
                        return pick, est, True
    return smallest[0], smallest[1], False


def _offload_tiers(cfg: Config, arch: dict, rank: int) -> list[tuple[bool, bool]]:
    """(input embedding, activations) in host RAM, cheapest first: the embedding costs a CPU lookup,
    the activations a copy each way per layer. auto tries them only on a GPU and where allowed."""
    gpu = cfg.hw.num_gpus > 0
    emb, acts = cfg.model.offload_embedding, cfg.train.offload_activations
    probe = settings(cfg, arch, quant="none", r=rank, optim="adamw", size=1, accum=1, ckpt=True)
    stays = tensors.embedding_stays(memory.describe(arch), probe)
    if emb is True and stays:
        raise UserError(
            f"model.offload_embedding=true: the input embedding must stay on the GPU ({stays}). "
            "Use model.offload_embedding=false, or auto."
        )
    embeds = [emb] if _pinned(emb) else [False, True] if gpu and not stays else [False]
    ckpt_possible = cfg.train.gradient_checkpointing is not False
    offloads = [acts] if _pinned(acts) else [False, True] if gpu and ckpt_possible else [False]
    return sorted(itertools.product(embeds, offloads), key=lambda t: (t[1], t[0]))


def _resolve_hw(cfg: Config) -> str:
    if cfg.hw.name != AUTO:
        reason = f"preset hw={cfg.hw.name}"
    else:
        # Detection fills what the user left alone: hw.num_gpus=1 or hw.gpu_memory_gb=20 are kept.
        defaults, named = HardwareConfig(), command_line_keys()
        found = hardware.detect()
        kept = [
            k
            for k in found
            if k != "name" and (f"hw.{k}" in named or getattr(cfg.hw, k) != getattr(defaults, k))
        ]
        for key, value in found.items():
            if key not in kept:
                setattr(cfg.hw, key, value)
        if cfg.hw.num_gpus == 0:
            reason = "detected: no GPU, planning for this machine's RAM"
        else:
            reason = f"detected: {found['num_gpus']} GPU(s), {found['gpu_memory_gb']:g} GiB free each"
        if kept:
            reason += f" (kept yours: {', '.join(f'hw.{k}={getattr(cfg.hw, k)}' for k in kept)})"
    if cfg.hw.bf16 and cfg.hw.compute_capability is not None and cfg.hw.compute_capability < 8.0:
        warn(
            f"hw.bf16=true is ignored: {cfg.hw.name} (compute capability {cfg.hw.compute_capability:g}) has no "
            "bfloat16 math; training uses float16 with loss scaling."
        )
        cfg.hw.bf16 = False
    return reason


def _resolve_lr(cfg: Config) -> str:
    if cfg.optim.lr != AUTO:
        return ""
    cfg.optim.lr = LORA_LR if cfg.lora.enabled else FULL_LR
    return f" (auto: the {'LoRA' if cfg.lora.enabled else 'full fine-tune'} default)"


def attention(cfg: Config, arch: dict) -> str:
    """model.attn_implementation, with auto as FlashAttention-2 where the GPU, the installed kernels
    and the model class have it, else PyTorch's SDPA where the class has it, else eager."""
    if cfg.model.attn_implementation != AUTO:
        return cfg.model.attn_implementation
    supported = memory.attention_implementations(arch)
    if cfg.hw.flash_attention and hardware.has_flash_attn() and "flash_attention_2" in supported:
        return "flash_attention_2"
    return "sdpa" if "sdpa" in supported else "eager"


def _resolve_attention(cfg: Config, arch: dict) -> tuple[str, str, str] | None:
    supported = memory.attention_implementations(arch)
    if cfg.model.attn_implementation != AUTO:
        if cfg.model.attn_implementation not in supported:
            raise UserError(
                f"model.attn_implementation={cfg.model.attn_implementation}: this model class "
                f"({memory.describe(arch).model_type}) supports {', '.join(supported)}"
                + (" (FlashAttention-2 has no attention sinks)" if memory.describe(arch).sinks else "")
                + ". Use one of them, or auto."
            )
        return None
    cfg.model.attn_implementation = attention(cfg, arch)
    if cfg.model.attn_implementation == "flash_attention_2":
        why = "the GPU supports FlashAttention-2 and flash-attn is installed"
    elif cfg.model.attn_implementation == "eager":
        why = "the model class has no SDPA kernel"
    elif memory.describe(arch).sinks:
        why = "PyTorch SDPA with finetune's attention sinks (FlashAttention-2 has none; transformers runs them eagerly)"
    elif cfg.hw.flash_attention and hardware.has_flash_attn():
        why = "PyTorch SDPA: the model class has no FlashAttention-2"
    elif cfg.hw.flash_attention:
        why = "PyTorch SDPA: the GPU supports FlashAttention-2 but the flash-attn package is not installed"
    else:
        why = "PyTorch SDPA: no FlashAttention-2 on this hardware"
    return ("attention", cfg.model.attn_implementation, f"auto: {why}")


def resolve(cfg: Config) -> Plan:
    """A copy of `cfg` with every `auto` filled, the reasons, and the memory estimate."""
    cfg = copy.deepcopy(cfg)
    hw_reason = _resolve_hw(cfg)
    arch = source.architecture(cfg.model)
    extra_rows = [row for row in (_resolve_attention(cfg, arch),) if row]
    lr_why = _resolve_lr(cfg)
    budget = budget_gib(cfg.hw)
    pick, est, fits = _search(cfg, arch, budget)
    before = {
        "quant": cfg.quant.load_in,
        "optim": cfg.optim.name,
        "ckpt": cfg.train.gradient_checkpointing,
        "size": cfg.batch.size,
        "accum": cfg.batch.grad_accum,
        "r": cfg.lora.r,
        "embed": cfg.model.offload_embedding,
        "offload_acts": cfg.train.offload_activations,
    }
    cfg.quant.load_in, cfg.optim.name = pick["quant"], pick["optim"]
    cfg.model.offload_embedding, cfg.train.offload_activations = pick["embed"], pick["offload_acts"]
    cfg.train.gradient_checkpointing = pick["ckpt"]
    cfg.batch.size, cfg.batch.grad_accum = pick["size"], pick["accum"]
    if cfg.lora.enabled:
        cfg.lora.r = pick["r"]
    if cfg.batch.effective is None:
        cfg.batch.effective = pick["size"] * pick["accum"] * launch.world_size(cfg)
    dist_row = _resolve_dist(cfg, pick, est, fits)

    speed = tokens_per_second(arch, settings(cfg, arch, **pick), cfg.hw)
    why = _reasons(before, pick, fits, _offloaded_gib(cfg, arch, pick))
    decisions = [("hardware", cfg.hw.name, hw_reason), *why, dist_row, *extra_rows]
    return Plan(
        cfg, decisions, est, budget, fits, memory.count_params(arch).total, active_params(arch), speed, lr_why
    )


def _resolve_dist(
    cfg: Config, pick: dict, est: distributed.DeviceEstimate, fits: bool
) -> tuple[str, str, str]:
    """Fill dist=auto with the chosen option's keys; the plan row says what each GPU holds."""
    auto = cfg.dist.strategy == AUTO
    for key, value in pick["dist_keys"].items():
        setattr(cfg.dist, key, value)
    n = est.world_size
    value = "one process" if cfg.dist.strategy == "none" else f"{cfg.dist.strategy} x {n}"
    if cfg.dist.strategy in ("fsdp", "zero2", "zero3") and (
        cfg.dist.cpu_offload or cfg.dist.offload_optimizer
    ):
        value += f" (CPU offload, {est.host_gib:.0f} GiB host RAM)"
    if not auto:
        return ("distribution", value, "set by you or a config file: kept as is")
    if n == 1:
        return ("distribution", value, "auto: one GPU" if cfg.hw.num_gpus else "auto: one process")
    verdict = "fits" if fits else "comes closest"
    return (
        "distribution",
        value,
        f"auto: the first of {', '.join(cfg.dist.candidates)} that {verdict} each GPU",
    )


def _offloaded_gib(cfg: Config, arch: dict, pick: dict) -> dict[str, float]:
    """GPU memory each host offload of the pick frees: the estimate without it minus with it."""
    if not (pick["embed"] or pick["offload_acts"]):
        return {}
    total = memory.estimate(arch, settings(cfg, arch, **pick)).total_gib
    return {
        key: memory.estimate(arch, settings(cfg, arch, **(pick | {key: False}))).total_gib - total
        for key in ("embed", "offload_acts")
        if pick[key]
    }


def _reasons(before: dict, pick: dict, fits: bool, freed: dict[str, float]) -> list[tuple[str, str, str]]:
    def why(key: str, auto_reason: str) -> str:
        return auto_reason if before[key] == AUTO else "set by you or a config file: kept as is"

    verdict = "fits" if fits else "comes closest (nothing fits)"
    rows = [
        (
            "quantization",
            pick["quant"],
            why("quant", f"auto: least quantization that {verdict} (none, 8bit, 4bit)"),
        ),
        ("optimizer", pick["optim"], why("optim", f"auto: fullest-precision optimizer that {verdict}")),
        (
            "gradient checkpointing",
            "on" if pick["ckpt"] else "off",
            why("ckpt", "auto: " + ("needed to fit" if pick["ckpt"] else "fits without it, ~30% faster")),
        ),
        (
            "micro-batch",
            str(pick["size"]),
            why("size", "auto: the fastest micro-batch that fits, accumulation keeps the effective batch"),
        ),
        ("accumulation", str(pick["accum"]), why("accum", "auto: effective batch / (micro-batch x GPUs)")),
    ]
    offloads = (
        ("embed", "input embedding", ("host RAM", "GPU"), "frees {:.1f} GiB, rows looked up on the CPU"),
        (
            "offload_acts",
            "activation offload",
            ("on", "off"),
            "checkpointed layer inputs in host RAM free {:.1f} GiB",
        ),
    )
    for key, setting, (on, off), effect in offloads:
        if pick[key] or before[key] != AUTO:
            reason = why(key, "auto: needed to fit; " + effect.format(freed.get(key, 0.0)))
            rows.append((setting, on if pick[key] else off, reason))
    if before["r"] == AUTO:
        rows.append(
            ("lora rank", str(pick["r"]), "auto: r16, the usual sweet spot; rank barely moves memory")
        )
    return rows


def smallest_gpu(cfg: Config, arch: dict) -> str | None:
    """The smallest GPU preset on which this config (its `auto` fields re-resolved) fits."""
    for preset in hardware.presets():
        trial = copy.deepcopy(cfg)
        for key, value in preset.items():
            setattr(trial.hw, key, value)
        if _search(trial, arch, budget_gib(trial.hw), world=1)[2]:
            return preset["name"]
    return None


def smallest_count(cfg: Config, arch: dict, hw: HardwareConfig) -> tuple[int, str, Any] | None:
    """(GPU count, dist option, estimate per GPU): the fewest GPUs like `hw` that hold this config
    (its `auto` fields re-resolved, batch.effective kept), or None up to MAX_GPUS."""
    if hw.num_gpus == 0:
        return None
    b = cfg.batch
    pinned = (b.size if _pinned(b.size) else 1) * (b.grad_accum if _pinned(b.grad_accum) else 1)
    for n in range(2, MAX_GPUS + 1):
        if b.effective is not None and b.effective % (pinned * n):
            continue  # batch.effective stays fixed: it must split over n GPUs
        trial = copy.deepcopy(cfg)
        trial.hw = copy.deepcopy(hw)
        trial.hw.num_gpus = n
        pick, est, fits = _search(trial, arch, budget_gib(trial.hw), world=n)
        if fits:
            return n, pick["dist"], est
    return None


def multi_gpu_line(model: str, full: bool, count: tuple[int, str, Any], gpu: str) -> str:
    """'llama-3-70b full fine-tune: 8 x a100-80gb with dist=fsdp_offload (12.6 GiB per GPU)'."""
    n, option, est = count
    host = f", {est.host_gib:.0f} GiB host RAM" if "offload" in option else ""
    kind = "full fine-tune" if full else "LoRA"
    return f"{model} {kind}: {n} x {gpu} with dist={option} ({est.total_gib:.1f} GiB per GPU{host})"


def require_fit(p: Plan, original: Config) -> None:
    """Stop before loading weights when the plan does not fit, with the numbers and the way out."""
    if p.fits:
        return
    arch = source.architecture(original.model)
    gpu = smallest_gpu(original, arch)
    count = smallest_count(original, arch, p.cfg.hw)
    several = (
        f"{multi_gpu_line(p.cfg.model.name, not original.lora.enabled, count, p.cfg.hw.name)}: "
        f"add hw.num_gpus={count[0]}"
        if count
        else ""
    )
    if gpu:
        where = f"The smallest preset GPU that fits is hw={gpu}" + (f"; or {several}" if several else "")
    elif several:
        where = f"No single preset GPU fits; {several}"
    else:
        where = f"No single preset GPU fits, nor up to {MAX_GPUS} of {p.cfg.hw.name}: use a smaller model"
    levers = (
        "quant=4bit, "
        if original.lora.enabled
        else "LoRA instead of a full fine-tune (lora=r16 quant=4bit), "
    )
    raise UserError(
        f"this run needs about {p.estimate.total_gib:.1f} GiB per device but {p.cfg.hw.name} allows "
        f"{p.budget_gib:.1f} GiB ({1 - SAFETY_MARGIN:.0%} of its memory). {where}. Or lower the memory: "
        f"{levers}batch.size=1, train.gradient_checkpointing=true, a smaller data.max_length "
        "(leave them on auto to let finetune choose). See the breakdown above."
    )
