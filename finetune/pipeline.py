"""One fine-tuning run, top to bottom: plan -> tokenizer -> data -> model -> peft -> SFTTrainer -> save.

A run writes checkpoints as it goes, stops cleanly on Ctrl-C or SIGTERM, and `resume=<run folder>`
continues it in its own folder (finetune/lifecycle.py, finetune/checkpoints.py).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from finetune import UserError, autofit, data, hardware, launch, lifecycle, plan, schema
from finetune.schema import Config


@dataclass
class Result:
    run_dir: Path
    model: Any  # the trained model (peft-wrapped for LoRA), for callers that want to inspect it
    summary: dict


def run(cfg: Config) -> Result | None:
    cfg = copy.deepcopy(cfg)  # plan.make fills data.max_length=auto in place
    launch.quiet_replicas()  # several processes (#13): rank 0 alone prints
    resume = lifecycle.resume_point(cfg, lifecycle.command_line()) if cfg.resume else None
    if resume is not None:
        if resume.finished:
            print(f"finetune: {resume.finished}")
            return None
        cfg = resume.cfg  # the run's own resolved config: nothing is left on auto
    resolved = plan.make(cfg)
    plan.show(resolved)
    if cfg.dry_run:
        print(OmegaConf.to_yaml(resolved.cfg, resolve=True))
        try:
            autofit.require_fit(resolved, cfg)
        except UserError as err:
            print(f"Would stop here: {err}")
        print("dry_run=true: nothing loaded, nothing trained.")
        return None
    autofit.require_fit(resolved, cfg)
    cfg = resolved.cfg
    _check_output_dir(cfg)
    _check_runtime(cfg)
    if launch.should_spawn(cfg):  # hw.num_gpus=N > 1 without a launcher (#13): start N processes
        sys.exit(launch.spawn(cfg, sys.argv[1:]))
    if resume is None and cfg.run_name and (Path(cfg.output_dir) / cfg.run_name).exists():
        raise UserError(  # fail before minutes of loading
            f"{Path(cfg.output_dir) / cfg.run_name} already exists: choose another run_name, or continue it "
            f"with resume={Path(cfg.output_dir) / cfg.run_name}."
        )
    with lifecycle.Signals() as signals:
        try:
            return _train(cfg, resume, signals)
        except lifecycle.Interrupted as err:  # a second Ctrl-C, or one outside the training loop
            signals.interrupted(err)


def _check_output_dir(cfg: Config) -> None:
    """output_dir must be a folder we can write, found out now and not after minutes of loading."""
    base = Path(cfg.output_dir).expanduser()
    if base.exists() and not base.is_dir():
        raise UserError(f"output_dir={cfg.output_dir} is a file: give a folder for the run folders.")
    try:
        base.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as err:
        raise UserError(
            f"output_dir={cfg.output_dir} is not writable ({err.strerror or err}): give a folder you can write."
        ) from None


def _check_runtime(cfg: Config) -> None:
    """Fail before loading anything when the machine cannot run what the config asks for."""
    import torch

    if cfg.hw.num_gpus > 0 and not torch.cuda.is_available():
        raise UserError(
            f"hw={cfg.hw.name} plans for a GPU, but torch sees none on this machine. "
            "Add dry_run=true to see the plan only, or hw=cpu to train on the CPU (small models only)."
        )
    if cfg.model.attn_implementation == "flash_attention_2" and not hardware.has_flash_attn():
        raise UserError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package "
            "(pip install flash-attn), or use model.attn_implementation=sdpa (or auto)."
        )
    if cfg.optim.name == "galore_8bit" and not torch.cuda.is_available():
        raise UserError(
            "optim=galore_8bit needs a CUDA GPU (bitsandbytes 8-bit GaLore); on CPU use optim=galore."
        )
    if cfg.hw.num_gpus > torch.cuda.device_count() > 0:
        raise UserError(
            f"hw.num_gpus={cfg.hw.num_gpus} but torch sees {torch.cuda.device_count()} GPU(s); "
            f"set hw.num_gpus={torch.cuda.device_count()}."
        )
    import importlib.util

    for tracker in _trackers(cfg):
        packages = schema.TRACKERS[tracker]
        if not any(importlib.util.find_spec(p) for p in packages):
            raise UserError(
                f"train.report_to={tracker} needs the {packages[0]} package: pip install {packages[0]} "
                "(or train.report_to=none)."
            )


def _trackers(cfg: Config) -> list[str]:
    value = cfg.train.report_to
    names = [value] if isinstance(value, str) else list(value)
    return [n for n in names if n != "none"]


def _new_run_dir(cfg: Config) -> Path:
    """A fresh folder for this run; never reuses (and so never overwrites) an earlier one."""
    base = Path(cfg.output_dir)
    base.mkdir(parents=True, exist_ok=True)
    if cfg.run_name:
        run_dir = base / cfg.run_name
        try:
            run_dir.mkdir()
        except FileExistsError:
            raise UserError(f"{run_dir} already exists: choose another run_name.") from None
        return run_dir
    stamp = f"{cfg.model.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    for n in range(1, 1000):
        run_dir = base / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise UserError(f"could not create a new run folder under {base}.")


def _sft_config(cfg: Config, run_dir: Path, prec: hardware.Precision):
    from trl import SFTConfig

    o, t = cfg.optim, cfg.train
    galore = o.name.startswith("galore")
    optim = schema.OPTIMIZERS[o.name] + ("_layerwise" if galore and o.galore_layerwise else "")
    return SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=cfg.batch.size,
        gradient_accumulation_steps=cfg.batch.grad_accum,
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        lr_scheduler_type=o.lr_scheduler,
        warmup_steps=o.warmup_ratio,  # a float below 1 is a ratio of the total steps
        optim=optim,
        optim_target_modules=[r".*.attn.*", r".*.mlp.*"] if galore else None,
        optim_args=(
            f"rank={o.galore_rank},update_proj_gap={o.galore_update_proj_gap},scale={o.galore_scale}"
            if galore
            else None
        ),
        max_steps=cfg.train.max_steps,
        num_train_epochs=cfg.train.epochs,
        activation_checkpointing=cfg.train.gradient_checkpointing,
        # train.offload_activations: transformers keeps each checkpointed layer's inputs in host memory
        activation_checkpointing_kwargs={"offload": True} if cfg.train.offload_activations is True else None,
        bf16=prec.mixed == "bf16",
        fp16=prec.mixed == "fp16",
        use_cpu=cfg.hw.num_gpus == 0,
        dataloader_pin_memory=cfg.hw.num_gpus > 0,
        **data.sft_kwargs(cfg),  # max_length, packing, padding_free
        **launch.trainer_kwargs(cfg),  # dist=fsdp/zero*: accelerate's FSDP2 / DeepSpeed plugins (#13)
        logging_steps=cfg.train.logging_steps,
        # MoE load-balancing loss off: routers stay frozen under LoRA, and transformers 5.23's GPT-OSS
        # balancing loss fails on padded batches (shape mismatch in load_balancing_loss_func).
        router_aux_loss_coef=0.0,
        # Checkpoints every train.save_steps; auto saves by wall time (lifecycle.Schedule) and 0 only
        # on a signal. Either way the Trainer writes into a staging folder that StepDownTrainer renames.
        save_strategy="no" if t.save_steps == 0 else "steps",
        save_steps=2**31 - 1 if t.save_steps in (0, "auto") else t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="no",  # lifecycle.Schedule asks for evaluations: every eval_steps, at saves, at the end
        per_device_eval_batch_size=cfg.batch.size,
        report_to=_trackers(cfg) or "none",
        run_name=run_dir.name,  # the trackers' name for the run
        seed=cfg.seed,
    )


def _train(cfg: Config, resume: lifecycle.Resume | None, signals: lifecycle.Signals) -> Result:
    import logging

    # On CPU, bitsandbytes tries to fetch an optional kernel from the hub at import and logs a
    # warning when it cannot; its built-in CPU path is what runs either way.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import torch
    from transformers import set_seed

    from finetune import evaluate, experts, models
    from finetune.oom import StepDownTrainer

    set_seed(cfg.seed)
    prec = hardware.precision(cfg)
    path = models.weights_path(cfg.model)
    processor = models.load_processor(path, cfg.model)  # the tokenizer, or a VLM's processor
    tokenizer = getattr(processor, "tokenizer", processor)
    data.use_chat_template(tokenizer, cfg.data)
    train_set, eval_set = data.load(cfg.data, cfg.train.eval_samples, cfg.seed)
    # Checked and tokenized before the model loads: bad data stops the run here, with its line.
    train_tokens, data_report = data.prepare(train_set, tokenizer, cfg.data)
    print(data_report.summary())
    eval_tokens = data.prepare(eval_set, tokenizer, cfg.data)[0] if eval_set is not None else None
    model = models.load_model(path, cfg, getattr(torch, prec.weights))
    pairs = data.scoring_pairs(eval_set, cfg.train.eval_samples)
    # Only now: a run that cannot load leaves no folder behind. A resumed run keeps its own; a new
    # one gets one folder for all its processes (#13).
    run_dir = resume.run_dir if resume else launch.shared_run_dir(lambda: _new_run_dir(cfg))
    signals.run_dir, signals.fresh = run_dir, resume is None
    if launch.is_main():  # (#13)
        _write_config(cfg, run_dir)

    facts = {}
    if resume is None:
        with torch.random.fork_rng(devices=[]):  # scoring must not move the RNG: resumed runs skip it
            before, _ = evaluate.exact_match(model, tokenizer, pairs)
        facts = {"accuracy_before": before}
        if before is not None:
            print(f"held-out exact match before training: {before:.0%} of {len(pairs)}")

    trainer = StepDownTrainer(
        model=model,
        args=_sft_config(cfg, run_dir, prec),
        train_dataset=train_tokens,
        eval_dataset=eval_tokens,
        processing_class=processor,
        peft_config=models.peft_config(cfg, vision=models.is_vision_language(path, cfg.model)),
        callbacks=[
            *lifecycle.callbacks(signals, cfg, run_dir, has_eval=eval_tokens is not None),
            *([_gpu_memory_log()] if torch.cuda.is_available() else []),
        ],
    )
    trainer.run_facts = facts
    checkpoint = resume.checkpoint if resume else None
    experts.attach(trainer)  # quantized MoE: our expert adapters train (and checkpoint, finetune.oom)
    if resume is not None:
        print(
            f"resuming {run_dir} from {checkpoint.name}"
            if checkpoint
            else f"resuming {run_dir}: no complete checkpoint, starting again from step 0"
        )
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if signals.signum is not None:
        signals.stopped(trainer.state)  # exits 130 / 143 with the resume line
    wall = trainer.wall_seconds()

    after, samples = evaluate.exact_match(trainer.model, tokenizer, pairs)
    _save(trainer, processor, run_dir / ("adapter" if cfg.lora.enabled else "model"), cfg)
    summary = _summary(trainer, wall, trainer.run_facts.get("accuracy_before"), after, samples)
    summary["world_size"] = launch.world_size(cfg)  # (#13)
    if launch.is_main():
        _write_atomically(run_dir / "summary.json", json.dumps(summary, indent=2))
    _report(summary, samples, run_dir)
    return Result(run_dir, trainer.model, summary)


def _write_config(cfg: Config, run_dir: Path) -> None:
    """<run>/config.yaml: the fully resolved config, which resume, merge, export and chat read."""
    saved = copy.deepcopy(cfg)
    saved.resume = None  # how this process was started, not part of the run
    _write_atomically(run_dir / "config.yaml", OmegaConf.to_yaml(saved, resolve=True))


def _write_atomically(target: Path, text: str) -> None:
    partial = target.with_name(f".{target.name}.partial")
    partial.write_text(text)
    partial.replace(target)


def _gpu_memory_log():
    from transformers import TrainerCallback

    class GpuMemoryLog(TrainerCallback):
        """Adds GPU memory (allocated and reserved by torch, GiB) to every logged step."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            import torch

            if logs is not None:
                logs["gpu_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
                logs["gpu_reserved_gib"] = round(torch.cuda.memory_reserved() / 2**30, 2)

    return GpuMemoryLog()


def _save(trainer, processor, target: Path, cfg: Config) -> None:
    """Write the weights aside and rename: a crash mid-save never leaves a half-written model."""
    partial = target.with_name(f".{target.name}.partial")
    if launch.is_main():  # (#13) every rank takes part in save_model, rank 0 alone writes the rest
        shutil.rmtree(partial, ignore_errors=True)
    launch.barrier()
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is not None:  # dist=fsdp: checkpoints stay sharded, but save_model writes no weights
        plugin.set_state_dict_type("FULL_STATE_DICT")  # for a sharded state dict: gather them whole
    trainer.save_model(str(partial))
    launch.barrier()
    if not launch.is_main():
        return
    from finetune import experts, runfolder

    experts.save_adapters(trainer.model, partial)  # quantized MoE: the expert adapters, beside PEFT's
    processor.save_pretrained(str(partial))
    runfolder.point_adapter_at_user_base(partial, cfg)  # name the model users load, not our cache copy
    if target.exists():  # a finished run trained on (resume with a larger train.max_steps)
        shutil.rmtree(target)
    partial.rename(target)


def _peak_memory_gib() -> dict:
    import resource

    import torch

    peak = {"peak_cpu_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if torch.cuda.is_available():
        peak["peak_gpu_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        peak["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    return peak


def _summary(trainer, wall: float, before, after, samples) -> dict:
    history = trainer.state.log_history  # the whole run's: a resumed state carries the earlier logs
    logged = [(h["step"], h["loss"]) for h in history if "loss" in h]
    # Each logged loss is the mean over the steps since the previous log: weight it by them.
    spans = [step - prev for (step, _), prev in zip(logged, [0] + [s for s, _ in logged])]
    mean_loss = sum(w * loss for w, (_, loss) in zip(spans, logged)) / sum(spans) if logged else None
    if not logged:  # shorter than train.logging_steps: the Trainer's own mean over this session
        mean_loss = next((h["train_loss"] for h in reversed(history) if "train_loss" in h), None)
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    tokens = max((h.get("num_tokens", 0) for h in history), default=0)
    return {
        "steps": trainer.state.global_step,
        "oom_events": trainer.oom_events,
        "oom_overrides": trainer.oom_overrides(),
        "final_loss": round(logged[-1][1] if logged else mean_loss, 4),  # the last logged loss
        "mean_loss": round(mean_loss, 4),
        "eval_loss": round(evals[-1], 4) if evals else None,  # the last evaluation's, on the held-out split
        "train_tokens": int(tokens),
        "tokens_per_second": round(tokens / wall, 1) if wall else None,
        "wall_seconds": round(wall, 1),  # training, over every resume
        "checkpoint_seconds": round(trainer.checkpoint_seconds, 2),  # writing them, this session
        **_peak_memory_gib(),
        "accuracy_before": before,
        "accuracy_after": after,
        "samples": samples[:5],
        "log_history": history,
    }


def _report(summary: dict, samples: list[dict], run_dir: Path) -> None:
    from rich.console import Console

    console = Console()
    for s in samples[:5]:
        mark = "[green]ok[/]" if s["correct"] else "[red]x[/]"
        console.print(
            f"  {mark} {s['prompt']!r} -> {s['answer']!r} (expected {s['reference']!r})", soft_wrap=True
        )
    if summary["accuracy_after"] is not None:
        console.print(
            f"held-out exact match: {summary['accuracy_before']:.0%} before -> {summary['accuracy_after']:.0%} after"
        )
    if summary["oom_events"]:
        console.print(
            f"ran out of memory and stepped down ({', '.join(e['rung'] for e in summary['oom_events'])}); "
            f"start the next run there: {' '.join(summary['oom_overrides'])}",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"{summary['steps']} steps in {summary['wall_seconds']:.0f}s, final loss {summary['final_loss']}, "
        f"{summary['tokens_per_second']} tokens/s. Saved to {run_dir}",
        highlight=False,
        soft_wrap=True,
    )
    sys.stdout.flush()
