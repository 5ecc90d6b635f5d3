"""scripts/gpu_truth.py, the prepared GPU check: its --smoke run on CPU, its time budget, and the
GPU-only reporting fed with synthetic driver readings (no GPU here to give real ones)."""

from __future__ import annotations

import csv
import importlib.util
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_truth.py"
# The cases --smoke runs: QLoRA, a full fine-tune with 8-bit AdamW, and auto-fit (LoRA on a CPU).
SMOKE_CASES = {"8b-qlora-nf4-ckpt-s2048-b2", "1.5b-full-adamw8bit-ckpt-s1024-b4", "autofit-8b-rtx4090"}


def _script():
    """The script as a module (scripts/ is not a package), for its reporting functions."""
    spec = importlib.util.spec_from_file_location("gpu_truth", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_truth"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_smoke_writes_the_tables(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--work", str(work)],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # the script must not depend on being started from the repository
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    with (out / "results.csv").open() as f:
        reader = csv.DictReader(f)
        rows = {r["case"]: r for r in reader}
        columns = reader.fieldnames
    for column in ("case", "est_total_gib", "driver_gib", "total_err_pct", "measured_allocated_gib",
                   "allocated_err_pct", "est_tokens_per_s", "measured_tokens_per_s", "budget_gib", "status"):  # fmt: skip
        assert column in columns
    assert set(rows) == SMOKE_CASES
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row["note"])
        assert float(row["est_total_gib"]) > 0  # the plan's estimate came through
        assert float(row["measured_tokens_per_s"]) > 0  # the run's summary.json came through
        assert row["steps"] == "2"
    assert rows["8b-qlora-nf4-ckpt-s2048-b2"]["quant"] == "4bit"
    assert rows["1.5b-full-adamw8bit-ckpt-s1024-b4"]["method"] == "full"
    autofit = rows["autofit-8b-rtx4090"]
    assert autofit["kind"] == "autofit" and autofit["plan_fits"] == "True"
    assert autofit["grad_ckpt"] == "False"  # the smoke relies on it to run the path without checkpointing

    md = (out / "results.md").read_text()
    assert "| case | method | optim | ckpt | batch x len | est GiB | driver GiB | err % |" in md
    assert "Auto-fit under emulated cards" in md
    for name in SMOKE_CASES:
        assert f"| {name} |" in md
    assert (out / "results.json").is_file() and (out / "log.txt").is_file()
    # Only reports land in --out: a GPU machine sends back a few small files, not checkpoints.
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.csv", "results.json", "results.md"]


def test_the_full_matrix_fits_the_time_budget():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--list"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    total = int(proc.stdout.strip().splitlines()[-1].split("s", 1)[0])
    assert total <= 480, proc.stdout  # 8 minutes on one H100/H200, checkpoints included
    listed = proc.stdout
    for kind in ("qlora-nf4", "lora-bf16", "lora-int8", "full-adamw8bit", "galore8bit-layerwise",
                 "autofit-8b-t4", "autofit-8b-rtx4090", "autofit-8b-a100-40gb", "nockpt", "-ckpt"):  # fmt: skip
        assert kind in listed


def test_gpu_rows_report_errors_and_the_autofit_verdict(tmp_path):
    gt = _script()
    plan = {
        "settings": {
            "quant": {"load_in": "4bit", "bnb_4bit_quant_type": "nf4"},
            "lora": {"enabled": True, "r": 16},
            "optim": {"name": "adamw"},
            "train": {"gradient_checkpointing": True},
            "batch": {"size": 2, "grad_accum": 8},
            "model": {"attn_implementation": "sdpa"},
            "hw": {"gpu_memory_gb": 23.5},
            "precision": "bfloat16",
        },
        "estimate": {"total_gib": 11.0, "overhead_gib": 1.0},
        "tokens_per_second": 2000.0,
        "budget_gib": 21.15,
        "fits": True,
    }
    row = {
        "case": "autofit-8b-rtx4090",
        "kind": "autofit",
        "model": "llama-3-8b",
        "seq_len": 1024,
        "status": "ok",
    }
    row.update(gt._plan_columns(plan), emulated_gib=23.5)
    assert row["method"] == "QLoRA r16 nf4" and row["batch"] == "2x8" and row["est_allocated_gib"] == 10.0
    summary = {"peak_gpu_allocated_gib": 8.0, "peak_gpu_reserved_gib": 9.0, "tokens_per_second": 1500.0,
               "oom_events": [], "steps": 3}  # fmt: skip
    row.update(gt._measured_columns(summary, 10.0, "process", row))
    assert row["allocated_err_pct"] == 25.0 and row["total_err_pct"] == 10.0
    assert row["speed_ratio"] is None  # an auto-fit case's speed estimate is for the emulated card
    row.update(gt._autofit_verdict(row, smoke=False))
    assert row["within_budget"] is True and row["status"] == "ok"

    over = dict(row, driver_gib=22.0)
    assert gt._autofit_verdict(over, smoke=False) == {"within_budget": False, "status": "over budget"}
    stepped = dict(row, oom_events=1)
    assert gt._autofit_verdict(stepped, smoke=False)["status"] == "stepped down"

    measured = dict(row, case="8b-qlora", kind="measure")
    measured.update(gt._measured_columns(summary, 10.0, "process", measured))
    assert measured["speed_ratio"] == 0.75
    assert gt._measured_columns(summary, None, "", measured)["total_err_pct"] is None  # no driver reading

    out = tmp_path / "out"
    out.mkdir()
    meta = {"argv": "", "device": "NVIDIA H200 (140 GiB)", "date": "today", "versions": "torch x", "steps": 10,
            "total_s": 1.0, "hw": "h200"}  # fmt: skip
    gt.write_reports(out, [measured, row], [], meta)
    md = (out / "results.md").read_text()
    assert (
        "| 8b-qlora | QLoRA r16 nf4 | adamw | True | 2x8 x 1024 | 11 | 10 | +10.0% | 10 | 8 | +25.0% |" in md
    )
    assert "| autofit-8b-rtx4090 | 23.5 |" in md


def test_driver_polling_through_nvidia_smi(tmp_path, monkeypatch):
    """The nvidia-smi path of the poller, against a stand-in that reports rising device memory and
    no per-process rows (as in containers that hide other PID namespaces)."""
    counter = tmp_path / "count"
    counter.write_text("0")
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        f'  *memory.used*) n=$(cat {counter}); echo $((n + 1)) > {counter}; echo $((1000 + n * 512));;\n'
        '  *memory.total*) echo 143771;;\n'
        '  *name*) echo "NVIDIA H200";;\n'
        '  *compute-apps*) ;;\n'
        "esac\n"
    )  # fmt: skip
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    gt = _script()
    mem = gt.DriverMemory(enabled=True)
    if mem.nvml is not None:
        pytest.skip("NVML is installed: the nvidia-smi fallback is not used here")
    assert mem.available and mem.device_name() == "NVIDIA H200" and round(mem.total_gib()) == 140
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.6)"])
    watch = mem.watch(child.pid)
    child.wait()
    time.sleep(0.2)
    peak, source = watch.stop()
    assert source == "device" and peak > 0.4  # at least two polls of +0.5 GiB over the baseline
