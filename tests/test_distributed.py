"""Beyond one GPU (#13): the plan per device for each strategy, auto-fit across GPUs, the generated
accelerate config read back by accelerate, FSDP2 wrapping with torch's fully_shard on 2 CPU
processes, a real 2-process data-parallel run through `torchrun -m finetune` (gloo), and one that
is stopped with Ctrl-C mid-run and resumed: checkpoints, signals and `resume=` across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import compose, tiny_overrides

from finetune import UserError, autofit, checkpoints, launch, lifecycle, memory
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


def test_quantized_experts_are_replicated_not_sharded():
    # finetune.experts keeps the quantized experts in buffers: FSDP and ZeRO-3 shard parameters only
    from finetune.source import read_config

    arch = read_config(Path(__file__).parent / "archs" / "mixtral-8x7b.json")
    s = memory.Settings(quant="4bit", lora_r=16, seq_len=512, loss_impl="fused")
    experts = memory.tensors.expert_storage_bytes(memory.describe(arch), s) / 2**30
    one = memory.estimate(arch, s)
    for strategy in ("fsdp", "zero3"):
        for layout in (Layout(strategy, 8), Layout(strategy, 8, offload_params=True)):
            est = per_device(arch, s, layout)
            assert (
                experts
                <= est.weights_gib - est.gathered_gib
                < experts + (one.weights_gib - experts) / 8 + 0.01
            )
    # the dense rest is divided as before
    dense = per_device(_arch("llama-3-70b"), s, Layout("fsdp", 8))
    assert dense.weights_gib - dense.gathered_gib < memory.estimate(_arch("llama-3-70b"), s).weights_gib / 7


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


def test_fsdp2_reduces_gradients_in_fp32(tmp_path, monkeypatch):
    """Neither the accelerate config nor TrainingArguments can name a mixed precision policy: the
    plugin the Trainer builds from its fsdp arguments gets ours, and accelerate keeps it."""
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "")  # the plugin sets it: undone after the test
    p = autofit.resolve(
        compose(["dist=fsdp", "model=llama-3-8b", "hw=a100-80gb", "hw.num_gpus=8", *REAL_DATA])
    )
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **launch.trainer_kwargs(p.cfg))
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)  # as Trainer builds it
    plugin.set_mixed_precision("bf16")  # accelerate's own, when the Accelerator starts
    assert plugin.mixed_precision_policy.reduce_dtype == torch.bfloat16
    launch.use_fsdp_mixed_precision(plugin, launch.mixed_precision(p.cfg))  # StepDownTrainer.train
    plugin.set_mixed_precision("bf16")  # set again: an existing policy stays
    policy = plugin.mixed_precision_policy
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    plugin.validate_mixed_precision_policy()


def test_qlora_under_fsdp_stores_the_4bit_weights_in_the_compute_dtype(tiny_model, tmp_path):
    import torch

    from finetune import models

    for dist, storage in (("fsdp", torch.bfloat16), ("ddp", torch.uint8)):
        cfg = compose(
            tiny_overrides(
                tiny_model, tmp_path, "hw=cpu", "quant=4bit", f"dist={dist}", "model.attn_implementation=sdpa"
            )
        )
        model = models.load_model(str(tiny_model), cfg, torch.bfloat16)
        assert model.config.quantization_config.bnb_4bit_quant_storage == storage
        weight = model.model.layers[0].mlp.down_proj.weight
        assert type(weight).__name__ == "Params4bit" and weight.dtype == storage  # FSDP2 shards it


def test_the_resume_line_names_the_launcher(monkeypatch, tmp_path):
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", launch.SPAWNED):
        monkeypatch.delenv(key, raising=False)
    assert lifecycle.resume_command(tmp_path) == f"python -m finetune resume={tmp_path}"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert lifecycle.resume_command(tmp_path) == f"torchrun --nproc_per_node 2 -m finetune resume={tmp_path}"
    monkeypatch.setenv(launch.SPAWNED, "1")  # `python -m finetune hw.num_gpus=2` starts them again
    assert lifecycle.resume_command(tmp_path) == f"python -m finetune resume={tmp_path}"


def test_spawn_waits_for_the_workers_on_ctrl_c_and_passes_sigterm_on(monkeypatch, tmp_path):
    """`python -m finetune hw.num_gpus=N` waits for accelerate's launcher (here a stand-in that exits
    1 on a signal, as torchrun's agent does): Ctrl-C reaches the launcher from the terminal, not
    from us; a SIGTERM to us alone is passed on. Either way we exit 128 + the signal."""
    import signal
    import tempfile
    import threading
    import time
    import types

    stand_in = (
        "import signal, sys, time\n"
        "for s in (signal.SIGINT, signal.SIGTERM): signal.signal(s, lambda *a: sys.exit(1))\n"
        "print('ready', flush=True)\ntime.sleep(60)"
    )
    real, started = subprocess.Popen, []

    def popen(command, **kwargs):
        started.append(real([sys.executable, "-c", stand_in], stdout=subprocess.PIPE, text=True, **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix: str(tmp_path))
    monkeypatch.setattr(launch, "write_accelerate_config", lambda cfg, folder: folder / "accelerate.yaml")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = types.SimpleNamespace(
        dist=types.SimpleNamespace(strategy="ddp"), hw=types.SimpleNamespace(num_gpus=2)
    )
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        before, started[:] = signal.getsignal(sig), []

        def send(sig=sig, before=before):
            while not started or signal.getsignal(sig) is before:  # spawn's handler is in place
                time.sleep(0.01)
            started[0].stdout.readline()
            os.kill(os.getpid(), sig)
            if sig == signal.SIGINT:  # the terminal's Ctrl-C reaches the launcher too
                time.sleep(0.2)
                started[0].send_signal(sig)

        sender = threading.Thread(target=send)
        sender.start()
        assert launch.spawn(cfg, []) == code
        sender.join()
        assert signal.getsignal(sig) is before


def test_a_signal_the_agent_passes_on_is_not_a_second_ctrl_c(monkeypatch):
    import signal

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    signals = lifecycle.Signals()
    signals.graceful = True
    signals._handle(signal.SIGINT, None)  # from the terminal
    signals._handle(signal.SIGINT, None)  # torchrun passing it on, milliseconds later
    assert signals.received == signal.SIGINT and signals.agree() == signal.SIGINT
    signals._first -= lifecycle.AGENT_ECHO_SECONDS  # a real second Ctrl-C
    with pytest.raises(lifecycle.Interrupted):
        signals._handle(signal.SIGINT, None)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    alone = lifecycle.Signals()  # one process without an agent: the second one stops at once
    alone.graceful = True
    alone._handle(signal.SIGTERM, None)
    with pytest.raises(lifecycle.Interrupted):
        alone._handle(signal.SIGINT, None)


def _torchrun_command(*args: str, env: dict | None = None) -> tuple[list[str], dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    full = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    return command, full


def _torchrun(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """torchrun in its own process group, so a timeout ends its workers too."""
    import signal

    command, full = _torchrun_command(*args, env=env)
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


def test_a_signal_to_one_rank_stops_both_at_the_same_step(tmp_path):
    out = tmp_path / "agreed.json"
    result = _torchrun(str(HELPERS / "signal_agreement.py"), str(out), str(tmp_path / "run"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads(out.read_text())
    for r in ranks:
        assert r["steps"] == [[False, False], [True, True]]  # both save and stop after step 2
        assert r["signum"] == 15 and r["exit"] == 143
        assert r["late"] == 2  # a signal after the last step's end: both stop at once
        assert r["timed_save"] is True  # save_steps=auto: when one rank's clock says so
    said = ranks[0]["stderr"]
    assert "SIGTERM in another process: stopping after this optimizer step" in said
    assert said.count("Resume with:") == 1
    assert f"Resume with: torchrun --nproc_per_node 2 -m finetune resume={tmp_path / 'run'}" in said
    assert ranks[1]["stderr"] == ""  # rank 0 alone speaks


def test_torchrun_ctrl_c_saves_both_ranks_and_resume_finishes_the_run(tiny_model, tmp_path):
    """Ctrl-C as a terminal sends it (SIGINT to torchrun and both workers, which torchrun then passes
    on once more) after the first checkpoint; then `torchrun ... -m finetune resume=<run>`."""
    import signal
    import time

    out, trace, exits = tmp_path / "runs", tmp_path / "trace", tmp_path / "exits"
    trace.mkdir()
    exits.mkdir()
    overrides = {
        o.split("=")[0]: o
        for o in tiny_overrides(
            tiny_model,
            out,
            "hw=cpu",
            "train.eval_samples=0",
            "train.max_steps=4",
            "train.save_steps=1",
            "train.logging_steps=1",
            "data.max_length=64",
        )
    }
    env = {
        "PYTHONPATH": f"{HELPERS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "FINETUNE_TEST_TRACE": str(trace),
        "FINETUNE_TEST_EXITS": str(exits),
    }
    command, full = _torchrun_command("-m", "finetune", *overrides.values(), env=env)
    full["FINETUNE_TEST_SLOW_STEP"] = "1"  # a second after each step: the signal lands mid-run
    with (tmp_path / "stdout.txt").open("w") as o, (tmp_path / "stderr.txt").open("w") as e:
        proc = subprocess.Popen(command, stdout=o, stderr=e, env=full, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob(f"*/checkpoints/checkpoint-1/{checkpoints.STATE}")):
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "no first checkpoint"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = (tmp_path / "stderr.txt").read_text()
    assert [(exits / f"exit{r}").read_text() for r in (0, 1)] == ["130", "130"], err[-3000:]
    frames = [line for line in err.splitlines() if line.strip().startswith("File ")]
    assert not [f for f in frames if "finetune" + os.sep in f], err[-3000:]  # torchrun's own traceback only
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    run = runs[0]
    lines = [line for line in err.splitlines() if "Resume with:" in line]
    assert len(lines) == 1 and lines[0].startswith("finetune: stopped at step"), err[-3000:]
    assert lines[0].endswith(f"Resume with: torchrun --nproc_per_node 2 -m finetune resume={run}")
    step = int(lines[0].split()[4])
    assert 2 <= step < 4
    saved = run / "checkpoints" / f"checkpoint-{step}"
    assert checkpoints.problem(saved) is None
    listed = checkpoints.read_state(saved)["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors", "optimizer.pt"} <= set(listed)
    assert not (run / "checkpoints" / checkpoints.STAGING).exists()

    resumed = _torchrun("-m", "finetune", f"resume={run}", env=env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming {run} from checkpoint-{step}" in resumed.stdout
    assert [(exits / f"exit{r}").read_text() for r in (0, 1)] == ["0", "0"]
    for r in (0, 1):  # the same checkpoint on both ranks, each its own RNG state
        rng = json.loads((trace / f"rng{r}.json").read_text())
        assert rng == {"checkpoint": str(saved), "loaded": [str(saved / f"rng_state_{r}.pth")]}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert sorted(h["step"] for h in summary["log_history"] if "loss" in h) == [1, 2, 3, 4]
    # Before and after the stop, each rank trained on 4 micro-batches: none again, none shared.
    seen = {r: [json.loads(x) for x in (trace / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    rows = {r: [tuple(x) for step in seen[r] for x in step] for r in (0, 1)}
    assert len(seen[0]) == len(seen[1]) == 4
    assert len(set(rows[0])) == len(rows[0]) and not set(rows[0]) & set(rows[1])
