"""The plan: every setting a run will use and why, the memory it needs, and whether it fits.

`python -m finetune.plan <the same overrides as training> [format=table|json] [chart=<file.png>]`
resolves the config exactly as a training run would, prints the plan and a methods table for the
model (full fine-tune, LoRA, LoRA + 4-bit, LoRA + 8-bit, inference), and loads no weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys

from finetune import autofit, hardware, launch, memory, source
from finetune.memory import distributed
from finetune.schema import Config, HardwareConfig
from finetune.schema import targets as lora_targets


def seconds_per_100_steps(p: autofit.Plan) -> float | None:
    if not p.tokens_per_second:
        return None
    c = p.cfg
    return 100 * c.batch.effective * c.data.max_length / p.tokens_per_second


def rows(p: autofit.Plan) -> list[tuple[str, str, str]]:
    """(setting, value, why) for the plan table of a resolved plan (finetune.autofit.Plan)."""
    c = p.cfg
    m, lo, o, d, t = c.model, c.lora, c.optim, c.data, c.train
    prec = hardware.precision(c)
    size = f"{p.params / 1e9:.2f}B parameters"
    if p.active_params < 0.7 * p.params:  # a mixture of experts
        size += f", {p.active_params / 1e9:.2f}B active per token"
    out = [("model", m.name_or_path, size), *p.decisions[:1]]
    out.append(("precision", prec.weights, prec.why))
    if lo.enabled:
        kind = "DoRA" if lo.use_dora else "LoRA"
        out.append(("adapters", f"{kind} r={lo.r} alpha={lo.alpha}", ",".join(lora_targets(lo))))
    else:
        out.append(("adapters", "none", "full fine-tune: every weight is trained"))
    out += p.decisions[1:]
    out += [
        (
            "effective batch",
            str(c.batch.effective),
            f"{c.batch.size} x {c.batch.grad_accum} x {launch.world_size(c)} GPU(s)",
        ),
        ("learning rate", f"{o.lr:g}", f"{o.lr_scheduler}, warmup {o.warmup_ratio:g}{p.lr_why}"),
        ("data", d.name if d.name == "demo" else str(d.path), f"max_length={d.max_length}"),
        ("length", f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.epochs:g} epochs", ""),
    ]
    e = p.estimate
    out.append(
        (
            "memory per device",
            f"{e.total_gib:.1f} GiB",
            f"weights {e.weights_gib:.1f} + adapters {e.adapter_gib:.2f} + gradients {e.gradients_gib:.2f} + "
            f"optimizer {e.optimizer_gib:.2f} + activations {e.activations_gib:.1f} + overhead {e.overhead_gib:.1f}",
        )
    )
    if e.world_size > 1:
        out.append(
            (
                "per GPU, sharding",
                f"{e.strategy} x {e.world_size}",
                f"all-gathered layers {e.gathered_gib:.1f} GiB, communication buffers {e.comm_gib:.1f} GiB, "
                f"host RAM {e.host_gib:.0f} GiB for the machine",
            )
        )
    if e.approximate:
        out.append(("estimate", "approximate", "; ".join(e.notes)))
    verdict = "fits" if p.fits else "DOES NOT FIT"
    out.append(("budget", f"{p.budget_gib:.1f} GiB", f"{verdict} (90% of the device, a safety margin)"))
    if p.tokens_per_second:
        out.append(
            (
                "speed (estimate)",
                f"{p.tokens_per_second:,.0f} tokens/s",
                f"{seconds_per_100_steps(p) / 60:.1f} min per 100 steps at {c.hw.tflops:g} TFLOP/s, "
                "40% peak utilisation",
            )
        )
    return out


def _console():
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=140)  # piped: don't squeeze into 80 columns


def _table(title: str, header: tuple[str, ...], body: list[tuple[str, ...]]):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in header:
        table.add_column(column)
    for row in body:
        table.add_row(*row)
    return table


def show(p: autofit.Plan) -> None:
    c = p.cfg
    _console().print(
        _table(f"finetune plan: {c.model.name} on {c.hw.name}", ("setting", "value", "why"), rows(p))
    )


def methods(cfg: Config) -> dict:
    """The seed guide's comparison for one model: training memory of each method with the smallest
    GPU that holds it, and inference memory at 16/8/4 bits. Micro-batch 1, gradient checkpointing,
    AdamW, the config's max_length; LoRA at the config's rank (16 when auto)."""
    arch = source.architecture(cfg.model)
    r = cfg.lora.r if cfg.lora.r != "auto" else autofit.LORA_RANK
    base = {"optim": "adamw", "size": 1, "accum": 1, "ckpt": True, "r": r}
    full, lora = copy.deepcopy(cfg), copy.deepcopy(cfg)
    full.lora.enabled, lora.lora.enabled = False, True
    gpus = hardware.presets()

    def smallest(gib: float) -> str:
        fit = next((g["name"] for g in gpus if g["gpu_memory_gb"] * (1 - autofit.SAFETY_MARGIN) >= gib), None)
        return fit or "none (shard across GPUs)"

    # a method no single GPU holds: the fewest of the named GPU (else the largest preset) that do
    sharded = copy.deepcopy(cfg)
    if cfg.hw.num_gpus == 0:
        sharded.hw = HardwareConfig(**max(gpus, key=lambda g: g["gpu_memory_gb"]))

    def several(s: memory.Settings) -> dict | None:
        budget = autofit.budget_gib(sharded.hw)
        for n in range(2, autofit.MAX_GPUS + 1):
            if cfg.batch.effective is not None and cfg.batch.effective % n:
                continue  # the effective batch stays fixed: it must split over the GPUs
            for option, layout, _ in autofit.layouts(sharded, n):
                est = distributed.per_device(arch, s, layout)
                if est.total_gib <= budget and est.host_gib <= autofit.host_budget_gib(sharded, n):
                    return {
                        "num_gpus": n,
                        "gpu": sharded.hw.name,
                        "dist": option,
                        "per_device_gib": round(est.total_gib, 2),
                        "host_gib": round(est.host_gib, 1),
                    }
        return None

    training = {}
    for label, c, quant in (
        ("full", full, "none"),
        ("lora", lora, "none"),
        ("lora_4bit", lora, "4bit"),
        ("lora_8bit", lora, "8bit"),
    ):
        s = autofit.settings(c, arch, quant=quant, **base)
        gib = memory.estimate(arch, s).total_gib
        training[label] = {"gib": round(gib, 2), "smallest_gpu": smallest(gib)}
        if training[label]["smallest_gpu"].startswith("none"):
            found = several(s)
            training[label]["gpus"] = found  # num_gpus, gpu, dist, per_device_gib, host_gib
            if found:
                training[label]["smallest_gpu"] = f"{found['num_gpus']} x {found['gpu']} ({found['dist']})"
    kv_cache = 2 * memory.dims(arch)["kv_width"] * 2048 * 2 / 2**30  # keys and values, 16-bit
    inference = {}
    for label, quant in (("16bit", "none"), ("8bit", "8bit"), ("4bit", "4bit")):
        weights = memory.estimate(arch, autofit.settings(lora, arch, quant=quant, **base)).weights_gib
        inference[label] = round(weights + kv_cache + memory.CUDA_CONTEXT_GIB, 2)
    return {"training": training, "inference": inference, "assumptions": methods.__doc__.split("GPUs, ")[0]}


def show_methods(cfg: Config, table: dict) -> None:
    t, i = table["training"], table["inference"]
    train_row = tuple(
        f"{t[k]['gib']:.1f} GiB ({t[k]['smallest_gpu']})" for k in ("full", "lora", "lora_4bit", "lora_8bit")
    )
    console = _console()
    console.print(
        _table(
            f"{cfg.model.name}: training memory (smallest GPU), micro-batch 1, checkpointing, AdamW, "
            f"max_length={cfg.data.max_length}",
            ("Full FT", "LoRA", "LoRA + 4bit", "LoRA + 8bit"),
            [train_row],
        )
    )
    console.print(
        _table(
            f"{cfg.model.name}: inference memory (weights + 2048-token KV cache + CUDA context)",
            ("16-bit", "8-bit", "4-bit"),
            [tuple(f"{i[k]:.1f} GiB" for k in ("16bit", "8bit", "4bit"))],
        )
    )


def as_json(p: autofit.Plan, table: dict) -> dict:
    """The object `format=json` prints (its keys are a public contract: see the README)."""
    c = p.cfg
    resolved = dataclasses.asdict(c)
    settings = {
        group: resolved[group] for group in ("quant", "lora", "batch", "optim", "hw", "data", "train", "dist")
    }
    settings["model"] = {k: v for k, v in resolved["model"].items() if k != "arch"}
    settings["precision"] = hardware.precision(c).weights
    return {
        "model": {
            "name": c.model.name,
            "name_or_path": c.model.name_or_path,
            "params": p.params,
            "active_params": p.active_params,
        },
        "settings": settings,
        "decisions": [{"setting": s, "value": v, "why": w} for s, v, w in p.decisions],
        "estimate": {k: round(v, 3) for k, v in p.estimate.as_dict().items()},
        "distributed": p.estimate.layout_dict(),  # strategy, world_size, gathered/comm/host GiB
        "estimate_approximate": p.estimate.approximate,
        "estimate_notes": list(p.estimate.notes),
        "budget_gib": round(p.budget_gib, 3),
        "fits": p.fits,
        "tokens_per_second": p.tokens_per_second and round(p.tokens_per_second, 1),
        "seconds_per_100_steps": seconds_per_100_steps(p) and round(seconds_per_100_steps(p), 1),
        "methods": table,
    }


def make(cfg: Config, planning: bool | None = None) -> autofit.Plan:
    """Validate, measure data.max_length=auto, auto-fit: the plan that training and finetune.plan
    both print (a finetune.autofit.Plan). Fills data.max_length in `cfg` itself."""
    from finetune import data

    _name_the_model(cfg)
    source.architecture(cfg.model)  # a model that cannot be read stops here, before the data is read
    length, why = data.resolve_max_length(cfg, planning=planning)
    p = autofit.resolve(cfg)
    if why.startswith("auto"):
        p.decisions.append(("max length", str(length), why))
    return p


def _name_the_model(cfg: Config) -> None:
    """Run folders and plan titles name the model trained: a model.name_or_path that is not the
    catalog model gets its own name, unless model.name was set too."""
    from finetune.schema import command_line_keys

    if not source.is_catalog(cfg.model) and "model.name" not in command_line_keys():
        from hydra.core.hydra_config import HydraConfig

        group = HydraConfig.get().runtime.choices.get("model") if HydraConfig.initialized() else None
        if group is not None and cfg.model.name == group:
            cfg.model.name = source.display_name(cfg.model)
    if cfg.model.gguf_file and not source.is_catalog(cfg.model) and "model.gguf_file" in command_line_keys():
        from finetune import warn

        warn(
            f"model.gguf_file={cfg.model.gguf_file} has no effect: it is the offline copy of "
            f"{cfg.model.arch.get('_name_or_path')}, and model.name_or_path={cfg.model.name_or_path} names another model."
        )


def _plan_job(cfg: Config, output: str, chart: str | None) -> None:
    p = make(cfg, planning=True)
    table = methods(cfg)
    if output == "json":
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        print(json.dumps(as_json(p, table), indent=None if sweep else 2))  # a sweep: JSON lines
    else:
        show(p)
        show_methods(p.cfg, table)
    if chart:
        from finetune import chart as charts

        charts.galore_chart(chart, p.cfg.hw)
        print(f"chart written to {chart}", file=sys.stderr if output == "json" else sys.stdout)


def main() -> None:
    """Hydra composes the config exactly as for training; format= and chart= are this command's own."""
    from finetune.errors import own_args, run_cli

    own = own_args({"format": "table", "chart": None})
    if own["format"] not in ("table", "json"):
        print(f"finetune: error: format={own['format']} must be table or json.", file=sys.stderr)
        sys.exit(2)
    run_cli(
        lambda cfg: _plan_job(cfg, own["format"], own["chart"]),
        command="finetune.plan",
        summary="Plan a run without loading anything: every setting and why, the memory per device, "
        "and the memory of each method (full, LoRA, LoRA + 4/8-bit) with the smallest GPU for it.",
        options={
            "format": "table|json   a table (default), or one JSON object on stdout (with -m: one per line)",
            "chart": "<file.png>     also draw the GaLore memory chart (BF16, Adafactor, 8-bit Adam, GaLore)",
        },
        machine_output=own["format"] == "json",
    )


if __name__ == "__main__":
    main()
