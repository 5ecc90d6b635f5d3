"""Several processes: which rank this is, the world size, and the accelerate configuration a run's
dist settings turn into (FSDP2 or DeepSpeed), written into the run folder and used to launch.

`python -m finetune hw.num_gpus=N` on a machine with N GPUs starts N processes through accelerate's
launcher (`spawn`); `torchrun --nproc_per_node N -m finetune ...` and `accelerate launch -m finetune
...` start them directly. Every rank plans the same run; rank 0 alone prints, writes the run folder
and saves. The run folder's name is made by rank 0 and broadcast (`shared_run_dir`), never derived
from the clock on each rank (hydra#2070). No torch import at module level: planning imports this.

Checkpoints, Ctrl-C and `resume=` across processes: every rank writes its part of a checkpoint
between barriers (finetune/oom.py), the ranks agree at every step end whether a signal arrived
(`agree_max`, finetune/lifecycle.py) and resume from the checkpoint rank 0 chose (`from_main`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from finetune.schema import Config

SPAWNED = "FINETUNE_LAUNCHED"
"""Set in the processes `spawn` starts: they train instead of launching again."""
CONFIG_ENV = "FINETUNE_ACCELERATE_CONFIG"
"""The accelerate config `spawn` wrote, which rank 0 copies into the run folder."""


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def world_size(cfg: Config | None = None) -> int:
    """Processes taking part: the launcher's WORLD_SIZE, else the GPUs the plan is for."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return max(cfg.hw.num_gpus, 1) if cfg is not None else 1


def quiet_replicas() -> None:
    """Rank 0 alone prints the plan, the data report and the result: the others' stdout is dropped
    (stderr stays, so a failing rank still says why)."""
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def _process_group():
    import torch.distributed as dist

    if not dist.is_initialized():
        import torch

        # accelerate reuses a group that exists; gloo where there is no GPU (CPU runs under torchrun)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist


def shared_run_dir(make: Callable[[], Path]) -> Path:
    """One run folder per run: rank 0 makes it, the other ranks are told its name."""
    if world_size() == 1:
        return make()
    dist = _process_group()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = str(make())
        except Exception as err:  # the others must not wait for a folder that never comes
            box[0] = err
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    run_dir = Path(box[0])
    if is_main() and os.environ.get(CONFIG_ENV):
        Path(run_dir / "accelerate.yaml").write_text(Path(os.environ[CONFIG_ENV]).read_text())
    return run_dir


def barrier() -> None:
    if world_size() > 1:
        _process_group().barrier()


def from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object; `value` itself in one process)."""
    if world_size() == 1:
        return value
    box = [value]
    _process_group().broadcast_object_list(box, src=0)
    return box[0]


def agree_max(value: int) -> int:
    """The largest of every rank's `value` (one all-reduce of one number; `value` in one process)."""
    if world_size() == 1:
        return value
    import torch

    dist = _process_group()
    nccl = "nccl" in str(dist.get_backend()) and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    total = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return int(total.item())


def under_agent() -> bool:
    """Started by torchrun's agent (also what `accelerate launch` runs), which passes every SIGINT and
    SIGTERM it gets on to the workers: a Ctrl-C in a terminal reaches each worker twice."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def command() -> str:
    """How to start this run's processes again (the resume line): `python -m finetune` for one
    process or a run `spawn` started (the saved config has the GPU count), else torchrun."""
    n = world_size()
    if n == 1 or os.environ.get(SPAWNED):
        return "python -m finetune"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", n))
    if local == n:
        return f"torchrun --nproc_per_node {n} -m finetune"
    return f"torchrun --nnodes {n // local} --nproc_per_node {local} <rendezvous options> -m finetune"


def mixed_precision(cfg: Config) -> str:
    from finetune import hardware

    return hardware.precision(cfg).mixed


def fsdp_settings(cfg: Config, layer_classes: list[str] | None = None) -> dict:
    """accelerate's FSDP2 settings for this run, by their config-file names (fsdp_*).

    The mixed precision policy is not among them: neither accelerate's config file (FSDP_* variables)
    nor TrainingArguments.fsdp_config can name one, so accelerate would reduce gradients in the
    16-bit dtype. StepDownTrainer.train puts ours on the plugin (`use_fsdp_mixed_precision`)."""
    d = cfg.dist
    ckpt = (
        cfg.train.gradient_checkpointing
        if d.activation_checkpointing == "auto"
        else d.activation_checkpointing
    )
    out = {
        "fsdp_version": 2,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # one unit per decoder layer
        "fsdp_reshard_after_forward": bool(d.reshard_after_forward),
        "fsdp_offload_params": bool(d.cpu_offload),
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_cpu_ram_efficient_loading": True,  # rank 0 reads the weights, the others get their shards
        "fsdp_activation_checkpointing": bool(ckpt),
    }
    if layer_classes:
        out["fsdp_transformer_layer_cls_to_wrap"] = ",".join(layer_classes)
    return out


def deepspeed_settings(cfg: Config) -> dict:
    """The DeepSpeed JSON for dist=zero2/zero3 (buckets as memory/distributed.py plans them)."""
    d, stage = cfg.dist, 2 if cfg.dist.strategy == "zero2" else 3
    prec = mixed_precision(cfg)
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if stage == 2:
        zero.update(reduce_bucket_size=int(5e8), allgather_bucket_size=int(5e8))
    else:
        zero.update(
            reduce_bucket_size="auto",  # hidden^2, filled in by transformers' DeepSpeed integration
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            stage3_gather_16bit_weights_on_model_save=True,
        )
        if d.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16"},
        "gradient_accumulation_steps": cfg.batch.grad_accum,
        "train_micro_batch_size_per_gpu": cfg.batch.size,
        "gradient_clipping": "auto",
    }


def accelerate_config(cfg: Config, deepspeed_file: Path | None = None) -> dict:
    """The YAML `accelerate launch --config_file` reads for this run (one machine)."""
    s, n = cfg.dist.strategy, world_size(cfg)
    out: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "num_machines": 1,
        "machine_rank": 0,
        "num_processes": n,
        "mixed_precision": mixed_precision(cfg),
        "use_cpu": cfg.hw.num_gpus == 0,
        "gpu_ids": "all",
        "main_training_function": "main",
        "rdzv_backend": "static",
        "same_network": True,
        "distributed_type": {"none": "NO", "ddp": "MULTI_GPU", "fsdp": "FSDP"}.get(s, "DEEPSPEED"),
    }
    if cfg.hw.num_gpus == 0:
        out["distributed_type"] = "MULTI_CPU" if n > 1 else "NO"
    if s == "fsdp":
        out["fsdp_config"] = fsdp_settings(cfg)
    elif s in ("zero2", "zero3"):
        ds = deepspeed_settings(cfg)
        z = ds["zero_optimization"]
        out["deepspeed_config"] = {
            "zero_stage": z["stage"],
            "offload_optimizer_device": "cpu" if cfg.dist.offload_optimizer else "none",
            "offload_param_device": "cpu" if cfg.dist.offload_params else "none",
            "gradient_accumulation_steps": cfg.batch.grad_accum,
            "zero3_init_flag": z["stage"] == 3,
            "zero3_save_16bit_model": z["stage"] == 3,
        }
        if deepspeed_file is not None:  # the full JSON, with our bucket sizes
            out["deepspeed_config"] = {
                "deepspeed_config_file": str(deepspeed_file),
                "zero3_init_flag": z["stage"] == 3,
            }
    return out


def write_accelerate_config(cfg: Config, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ds_file = None
    if cfg.dist.strategy in ("zero2", "zero3"):
        import json

        ds_file = folder / "deepspeed.json"
        ds_file.write_text(json.dumps(deepspeed_settings(cfg), indent=2))
    target = folder / "accelerate.yaml"
    target.write_text(
        f"# accelerate launch --config_file {target} -m finetune <the run's overrides>\n"
        + yaml.safe_dump(accelerate_config(cfg, ds_file), sort_keys=False)
    )
    return target


def trainer_kwargs(cfg: Config) -> dict:
    """The TrainingArguments that carry dist into the HF Trainer when no accelerate config set the
    environment (torchrun, or one process): FSDP2 or DeepSpeed through accelerate's plugins."""
    s = cfg.dist.strategy
    if s == "fsdp":
        fsdp = {k.removeprefix("fsdp_"): v for k, v in fsdp_settings(cfg).items()}
        return {
            "fsdp": "full_shard auto_wrap" + (" offload" if cfg.dist.cpu_offload else ""),
            "fsdp_config": fsdp,
        }
    if s in ("zero2", "zero3"):
        return {"deepspeed": deepspeed_settings(cfg)}
    return {}


def should_spawn(cfg: Config) -> bool:
    """`python -m finetune` planned for N > 1 GPUs and no launcher started us: start N processes."""
    return world_size(cfg) > 1 and "WORLD_SIZE" not in os.environ and not os.environ.get(SPAWNED)


def spawn(cfg: Config, argv: list[str]) -> int:
    """Start the run again under accelerate's launcher with the generated config; returns its exit code."""
    import subprocess
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="finetune-launch-"))
    config = write_accelerate_config(cfg, folder)
    env = {**os.environ, SPAWNED: "1", CONFIG_ENV: str(config)}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "-m",
        "finetune",
        *argv,
    ]
    print(
        f"finetune: launching {world_size(cfg)} processes with dist={cfg.dist.strategy}: {' '.join(command[2:])}"
    )
    sys.stdout.flush()
    import signal

    # A Ctrl-C in the terminal reaches the launcher and the workers by itself: they save and stop
    # (finetune/lifecycle.py) while this process waits for them. A SIGTERM sent to this process
    # alone is passed on to the launcher, which passes it on to the workers.
    got: list[int] = []
    child = subprocess.Popen(command, env=env)

    def wait_for_workers(signum, frame):
        got.append(signum)
        if signum != signal.SIGINT:
            child.send_signal(signum)

    old = {sig: signal.signal(sig, wait_for_workers) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    # the launcher itself exits 1 with a traceback after a signal; the workers said what happened
    return 128 + got[0] if got and code != 0 else code


def fsdp_mixed_precision(mixed: str):
    """The MixedPrecisionPolicy our FSDP2 runs use: layers gathered and computed in the 16-bit dtype,
    gradients reduced in fp32 (summing shards in bf16 loses bits at large GPU counts)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed)
    return MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32 if half else None)


def use_fsdp_mixed_precision(plugin: Any, mixed: str) -> None:
    """Put our policy on accelerate's FSDP2 plugin before it wraps the model. Set there, accelerate
    keeps it (its own would reduce in the 16-bit dtype); FSDP1 and fp32 runs are left as they are."""
    if getattr(plugin, "fsdp_version", 1) == 2 and mixed in ("bf16", "fp16"):
        plugin.mixed_precision_policy = fsdp_mixed_precision(mixed)
