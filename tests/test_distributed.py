"""Beyond one GPU (#13): the plan per device for each strategy, auto-fit across GPUs, the generated
accelerate config read back by accelerate, FSDP2 wrapping with torch's fully_shard on 2 CPU
processes, and a real 2-process data-parallel run through `torchrun -m finetune` (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import compose, tiny_overrides

from finetune import UserError, autofit, launch, memory
from finetune.memory.distributed import Layout, per_device

HELPERS = Path(__file__).parent / "dist_helpers"
REAL_DATA = ["data=file", "data.path=x.jsonl", "data.max_length=512"]


def _arch(name: str) -> dict:
    arch = yaml.safe_load((Path(__file__).parents[1] / "configs" / "model" / f"{name}.yaml").read_text())[
        "arch"
    ]
    return {k: v for k, v in arch.items() if not k.startswith("_")}


def test_per_device_divides_what_each_strategy_shards():
    arch, s = _arch("llama-3-8b"), memory.Settings(lora_r=None, seq_len=512, loss_impl="fused")
    one = memory.estimate(arch, s)
    assert per_device(arch, s, Layout("ddp", 1)).total_gib == one.total_gib  # one GPU: unchanged
    ddp = per_device(arch, s, Layout("ddp", 8))
    assert ddp.weights_gib == one.weights_gib and ddp.comm_gib == pytest.approx(one.gradients_gib)
    f4, f8 = per_device(arch, s, Layout("fsdp", 4)), per_device(arch, s, Layout("fsdp", 8))
    # fp32 masters, gradients and Adam moments (accelerate upcasts trainables): 16 bytes / parameter / N
    n = memory.count_params(arch).total
    assert f8.optimizer_gib == pytest.approx(8 * n / 8 / 2**30, rel=0.01)
    assert f8.total_gib < f4.total_gib < one.total_gib and f8.gathered_gib > 0
    z2, z3 = per_device(arch, s, Layout("zero2", 8)), per_device(arch, s, Layout("zero3", 8))
    assert z3.total_gib < z2.total_gib < ddp.total_gib and z2.weights_gib == one.weights_gib
    off = per_device(arch, s, Layout("zero3", 8, offload_optimizer=True))
    assert off.optimizer_gib == 0 and off.host_gib > 12 * n / 2**30 and off.total_gib < z3.total_gib
    # no resharding after forward keeps every layer gathered until backward
    assert (
        per_device(arch, s, Layout("fsdp", 8, reshard_after_forward=False)).gathered_gib > 5 * f8.gathered_gib
    )


def test_qlora_shards_the_4bit_weights():
    arch, s = _arch("llama-3-70b"), memory.Settings(quant="4bit", lora_r=16, seq_len=512, loss_impl="fused")
    one, two = memory.estimate(arch, s), per_device(arch, s, Layout("fsdp", 2))
    assert two.weights_gib - two.gathered_gib == pytest.approx(one.weights_gib / 2)
    # the layers are all-gathered in their 4-bit storage, not in bf16
    kept = Layout("fsdp", 2, reshard_after_forward=False)
    bf16 = per_device(arch, memory.Settings(lora_r=16, seq_len=512, loss_impl="fused"), kept)
    assert per_device(arch, s, kept).gathered_gib < 0.4 * bf16.gathered_gib


def test_70b_full_fine_tune_fits_8_a100_per_device():
    cfg = compose(["model=llama-3-70b", "lora=none", "hw=a100-80gb", "hw.num_gpus=8", *REAL_DATA])
    p = autofit.resolve(cfg)
    assert p.fits and p.estimate.world_size == 8 and p.estimate.total_gib <= p.budget_gib
    assert p.cfg.dist.strategy == "fsdp" and p.cfg.batch.effective == 16
    assert p.cfg.batch.size * p.cfg.batch.grad_accum * 8 == 16
    assert "distribution" in [d[0] for d in p.decisions]
    one = compose(["model=llama-3-70b", "lora=none", "hw=a100-80gb", *REAL_DATA])
    with pytest.raises(
        UserError, match=r"llama-3-70b full fine-tune: 8 x a100-80gb with dist=fsdp.*hw.num_gpus=8"
    ):
        autofit.require_fit(autofit.resolve(one), one)


def test_lora_70b_in_16_bit_shards_over_two_gpus_and_one_gpu_stays_single():
    cfg = compose(
        ["model=llama-3-70b", "lora=r16", "quant=none", "hw=a100-80gb", "hw.num_gpus=4", *REAL_DATA]
    )
    p = autofit.resolve(cfg)
    assert p.fits and p.cfg.dist.strategy == "fsdp" and not p.cfg.dist.cpu_offload
    small = autofit.resolve(compose(["model=llama-3-8b", "hw=a100-80gb", "hw.num_gpus=4", *REAL_DATA]))
    assert small.cfg.dist.strategy == "ddp"  # fits one GPU: replicate, fastest
    single = autofit.resolve(compose(["model=llama-3-8b", "hw=a100-80gb", *REAL_DATA]))
    assert single.cfg.dist.strategy == "none" and single.estimate.world_size == 1


def test_plan_json_shows_strategy_and_world_size():
    from finetune import plan

    cfg = compose(["model=llama-3-70b", "lora=none", "hw=a100-80gb", "hw.num_gpus=8", *REAL_DATA])
    out = plan.as_json(plan.make(cfg), plan.methods(cfg))
    assert out["distributed"]["world_size"] == 8 and out["distributed"]["strategy"] == "fsdp"
    assert out["settings"]["dist"]["strategy"] == "fsdp"
    full = out["methods"]["training"]["full"]
    assert full["gpus"]["num_gpus"] == 8 and full["smallest_gpu"].startswith("8 x a100-80gb")


@pytest.mark.parametrize("option", ["fsdp", "fsdp_offload", "zero2", "zero3", "zero3_offload"])
def test_generated_accelerate_config_reads_back(option, tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    p = autofit.resolve(
        compose([f"dist={option}", "model=llama-3-8b", "hw=a100-80gb", "hw.num_gpus=8", *REAL_DATA])
    )
    path = launch.write_accelerate_config(p.cfg, tmp_path)
    read = load_config_from_file(str(path))
    assert read.num_processes == 8 and read.mixed_precision == "bf16"
    if option.startswith("fsdp"):
        assert read.distributed_type.value == "FSDP"
        assert read.fsdp_config["fsdp_version"] == 2
        assert read.fsdp_config["fsdp_offload_params"] is (option == "fsdp_offload")
        assert read.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    else:
        assert read.distributed_type.value == "DEEPSPEED"
        ds = json.loads(Path(read.deepspeed_config["deepspeed_config_file"]).read_text())
        zero = ds["zero_optimization"]
        assert zero["stage"] == (2 if option == "zero2" else 3) and ds["bf16"]["enabled"]
        assert ("offload_optimizer" in zero) is option.endswith("offload")


def test_trainer_arguments_carry_fsdp2(tmp_path):
    from transformers import TrainingArguments

    p = autofit.resolve(
        compose(["dist=fsdp", "model=llama-3-8b", "hw=a100-80gb", "hw.num_gpus=8", *REAL_DATA])
    )
    kwargs = launch.trainer_kwargs(p.cfg)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **kwargs)
    assert args.fsdp_config["version"] == 2 and args.fsdp_config["reshard_after_forward"] is True


def _torchrun(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """torchrun in its own process group, so a timeout ends its workers too."""
    import signal

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    full = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@pytest.mark.parametrize("reshard", ["true", "false"])
def test_our_fsdp2_units_and_mixed_precision_with_fully_shard_on_two_cpu_processes(reshard, tmp_path):
    out = tmp_path / "shards.json"
    result = _torchrun(str(HELPERS / "fully_shard_check.py"), str(out), reshard, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads(out.read_text())
    for r in ranks:
        assert r["units"] == ["model.layers.0", "model.layers.1"] and r["layers_are_units"]
        assert r["local_rows"] * 2 == r["full_rows"]  # each rank holds half of every parameter
        assert r["param_dtype"] == "torch.float32" and r["compute_dtype"] == "torch.bfloat16"
        assert r["grad_dtype"] == "torch.float32"
    assert ranks[0]["loss"] != ranks[1]["loss"]  # each rank its own batch


def _adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_torchrun_two_processes_train_one_run(tiny_model, tmp_path):
    common = ["hw=cpu", "lora.dropout=0", "train.eval_samples=0", "optim.warmup_ratio=0", "optim.lr=1e-3"]
    trace = tmp_path / "trace"
    trace.mkdir()
    two = tmp_path / "two"
    result = _torchrun(
        "-m",
        "finetune",
        *tiny_overrides(tiny_model, two, *common),
        env={
            "PYTHONPATH": f"{HELPERS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "FINETUNE_TEST_TRACE": str(trace),
        },
    )
    assert result.returncode == 0, result.stderr[-4000:]
    runs = [p for p in two.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs  # one run folder for both ranks
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert result.stdout.count("finetune plan") == 1  # rank 0 alone prints
    seen = {
        r: [json.loads(line) for line in (trace / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)
    }
    assert len(seen[0]) == len(seen[1]) == 2
    rows0 = {tuple(x) for step in seen[0] for x in step}
    rows1 = {tuple(x) for step in seen[1] for x in step}
    assert rows0 and rows1 and not rows0 & rows1  # the ranks trained on different examples

    one = tmp_path / "one"
    single = subprocess.run(
        [sys.executable, "-m", "finetune", *tiny_overrides(tiny_model, one, *common, "batch.size=4")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = _adapter(runs[0]), _adapter(next(p for p in one.iterdir() if p.is_dir()))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-4 + 1e-3 * b[key].abs().max(), key
