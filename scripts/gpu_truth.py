"""The truth on a real GPU: our own pipeline's peak memory and speed, measured next to the plan's.

    python scripts/gpu_truth.py --out gpu-truth            # the full matrix, <= 8 min on an H100/H200
    python scripts/gpu_truth.py --quick --out gpu-truth    # the most valuable cases only (~4 min)
    python scripts/gpu_truth.py --cases 8b-qlora,autofit   # cases whose names contain a pattern
    python scripts/gpu_truth.py --list                     # the matrix and its time budget, runs nothing
    python scripts/gpu_truth.py --smoke --out /tmp/gt      # same code path on CPU at tiny sizes (~1 min)

On a CUDA machine, with nothing downloaded:

1. writes randomly initialised checkpoints at real width (Qwen2.5-1.5B and Llama-3-8B shapes, bf16
   safetensors, weights drawn on the GPU) with a byte-level BPE tokenizer trained locally, into
   --work (once: later runs reuse them), and a JSONL of chats long enough to fill every length;
2. for each case runs `python -m finetune.plan <overrides> format=json` (the estimate and the speed
   estimate) and then `python -m finetune <the same overrides>` in its own process, while polling the
   driver (NVML, else nvidia-smi) for the process's GPU memory; the run's summary.json gives the
   peak memory torch allocated and reserved and the tokens per second;
3. auto-fit cases name a smaller card (hw=t4, hw=rtx4090, hw=a100-40gb), leave every knob on auto,
   and cap torch's allocator inside the training process at that card's memory (less the CUDA
   context, which lives outside the allocator); they pass when the run needed no out-of-memory
   step-down and its measured peak stays under the plan's budget;
4. writes results.csv, results.md (tables to paste into BENCHMARKS.md), results.json (plans and
   summaries) and log.txt into --out.

Cases run in order of value under a time budget (--time-budget, default 480 s, checkpoints
included): a case whose own budget no longer fits is recorded as skipped, and each case is killed
after --case-timeout-factor times its budget. The product is driven only through its command line.

--smoke runs every stage on the CPU (tiny widths, 2 steps, hw=cpu, the cases CPUs can run: no
GaLore 8-bit, no LLM.int8); only the CUDA measurements are left out. tests/test_gpu_truth.py runs it.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Published config.json values of the two shapes (Qwen/Qwen2.5-1.5B-Instruct, meta-llama/Meta-Llama-3-8B):
# embedded so the check needs no file outside the repository on the GPU machine.
SHAPES = {
    "1.5b": {
        "group": "qwen2.5-1.5b",
        "config": {
            "model_type": "qwen2",
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "use_sliding_window": False,
        },
    },
    "8b": {
        "group": "llama-3-8b",
        "config": {
            "model_type": "llama",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
            "tie_word_embeddings": False,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
        },
    },
    # gpt-oss-20b (openai/gpt-oss-20b's config.json) cut to its first two layers, one sliding-window and one
    # full: every width real (32 experts, 64 heads, sinks, 201k vocabulary), 2.5B parameters
    "gpt-oss-2l": {
        "group": "gpt-oss-20b",
        "config": {
            "model_type": "gpt_oss",
            "hidden_size": 2880,
            "intermediate_size": 2880,
            "num_hidden_layers": 2,
            "layer_types": ["sliding_attention", "full_attention"],
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "num_local_experts": 32,
            "num_experts_per_tok": 4,
            "vocab_size": 201088,
            "sliding_window": 128,
            "tie_word_embeddings": False,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
            "rope_theta": 150000.0,
            "attention_bias": True,
        },
    },
}
# --smoke: the same architectures at widths that train in seconds on two CPU cores. The vocabulary
# stays larger than the tokenizer's, as at real width, so token ids never reach the table's end.
SMOKE_DIMS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "max_position_embeddings": 512,
}

SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SYLLABLES = "ka lo mi ne su ta ri po ve du zi ha".split()
# Two- and three-syllable words: the tokenizer learns each as one token, so a reply of n words is
# about n tokens and the data can be sized to fill a sequence length without tokenizing first.
WORDS = [a + b for a in SYLLABLES for b in SYLLABLES] + [
    a + b + c for a in SYLLABLES[:6] for b in SYLLABLES[6:] for c in SYLLABLES[:4]
]

# Outside torch's allocator a training process holds the CUDA context and kernel images (the
# estimator's CUDA_CONTEXT_GIB). An emulated card caps the allocator at the card's memory less this.
CONTEXT_GIB = 1.0


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    shape: str  # a key of SHAPES
    overrides: tuple[str, ...]  # the knobs this case pins (an auto-fit case pins none of them)
    seq_len: int
    budget_s: int  # expected wall time on an H100/H200, start-up and weight loading included
    emulate: str | None = None  # auto-fit: the hw preset whose memory the allocator is capped to
    cpu: bool = True  # runs on CPU (in --smoke)
    quick: bool = False  # in --quick
    steps: int = 10

    @property
    def kind(self) -> str:
        return "autofit" if self.emulate else "measure"


def _pinned(quant: str, lora: str, optim: str, ckpt: bool, batch: int, accum: int = 1, *extra: str):
    return (
        f"quant={quant}",
        f"lora={lora}",
        f"optim={optim}",
        f"train.gradient_checkpointing={str(ckpt).lower()}",
        f"batch.size={batch}",
        f"batch.grad_accum={accum}",
        f"batch.effective={batch * accum}",
        "model.attn_implementation=sdpa",  # the kernel every torch has: the matrix means the same everywhere
        *extra,
    )


# Most valuable first: the 8B QLoRA and bf16 LoRA runs people plan consumer cards with, the auto-fit
# promise on a 24 GB card, the full fine-tunes whose optimizer state dominates, then the rest.
CASES = [
    Case("8b-qlora-nf4-ckpt-s2048-b2", "8b", _pinned("4bit", "r16", "adamw", True, 2), 2048, 45, quick=True),
    Case("autofit-8b-rtx4090", "8b", (), 1024, 50, emulate="rtx4090", quick=True, steps=3),
    Case("8b-lora-bf16-ckpt-s2048-b2", "8b", _pinned("none", "r16", "adamw", True, 2), 2048, 35, quick=True),
    Case(
        "1.5b-full-adamw8bit-ckpt-s1024-b4",
        "1.5b",
        _pinned("none", "none", "adamw_8bit", True, 4),
        1024,
        30,
        quick=True,
    ),
    Case(
        "1.5b-galore8bit-layerwise-ckpt-s1024-b4",
        "1.5b",
        _pinned("none", "none", "galore_8bit", True, 4, 1, "optim.galore_layerwise=true"),
        1024,
        40,
        cpu=False,  # bitsandbytes' 8-bit GaLore has no CPU kernels
        quick=True,
    ),
    Case("autofit-8b-t4", "8b", (), 1024, 50, emulate="t4", steps=3),
    Case("8b-lora-int8-ckpt-s1024-b2", "8b", _pinned("8bit", "r16", "adamw", True, 2), 1024, 50, cpu=False),
    Case("1.5b-lora-bf16-nockpt-s1024-b4", "1.5b", _pinned("none", "r16", "adamw", False, 4), 1024, 20),
    Case("autofit-8b-a100-40gb", "8b", (), 1024, 40, emulate="a100-40gb", steps=3),
    # issue #12's T4 row on a real-width slice of gpt-oss-20b: NF4 experts quantized layer by layer on the
    # GPU, per-expert LoRA, SDPA with sinks and the two host offloads the T4 plan relies on
    Case(
        "gptoss2l-qlora-offload-s1024-b1",
        "gpt-oss-2l",
        _pinned(
            "4bit",
            "r16",
            "paged_adamw_8bit",
            True,
            1,
            4,
            "model.offload_embedding=true",
            "train.offload_activations=true",
        ),
        1024,
        40,
        cpu=False,  # the tiny MoE QLoRA runs are tests/test_experts.py's
        steps=3,
    ),
]
CHECKPOINT_BUDGET_S = {
    "1.5b": 15,
    "8b": 35,
    "gpt-oss-2l": 30,
}  # imports, GPU init, writing bf16 safetensors (3 GB, 16 GB)
# What the two-core CI machine can afford (each run costs ~10 s of imports): 4-bit LoRA with
# checkpointing, a full fine-tune with 8-bit AdamW, and auto-fit, which on a CPU picks plain LoRA
# without checkpointing, so every code path of the matrix but GaLore 8-bit and LLM.int8 runs.
SMOKE_CASES = {"8b-qlora-nf4-ckpt-s2048-b2", "1.5b-full-adamw8bit-ckpt-s1024-b4", "autofit-8b-rtx4090"}

CSV_COLUMNS = [
    "case",
    "kind",
    "model",
    "status",
    "method",
    "quant",
    "optim",
    "grad_ckpt",
    "batch",
    "seq_len",
    "attn",
    "precision",
    "est_total_gib",
    "est_allocated_gib",
    "measured_allocated_gib",
    "allocated_err_pct",
    "measured_reserved_gib",
    "driver_gib",
    "driver_source",
    "total_err_pct",
    "est_tokens_per_s",
    "measured_tokens_per_s",
    "speed_ratio",
    "emulated_gib",
    "budget_gib",
    "plan_fits",
    "within_budget",
    "oom_events",
    "steps",
    "wall_s",
    "note",
]


# ---------------------------------------------------------------------------------------------
# Stage 1: checkpoints and data (the checkpoint writer runs in its own process: see --write-checkpoints)


def _write_checkpoints(jobs: list[str], smoke: bool) -> None:
    """In a child process: build each `<shape>=<folder>` (tokenizer + random bf16 weights)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choices(WORDS, k=64)) for _ in range(300)] + ["user assistant system"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=800, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = CHATML
    cuda = torch.cuda.is_available() and not smoke
    for job in jobs:
        shape, _, folder = job.partition("=")
        target = Path(folder)
        spec = dict(SHAPES[shape]["config"], **(SMOKE_DIMS if smoke else {}))
        model_type = spec.pop("model_type")
        config = AutoConfig.for_model(
            model_type,
            **spec,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        start = time.perf_counter()
        torch.manual_seed(0)
        # Drawn on the GPU in bf16: an 8B model's init takes a second there and minutes on a CPU.
        with torch.device("cuda" if cuda else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        partial = target.with_name(f".{target.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial, max_shard_size="5GB")
        tokenizer.save_pretrained(partial)
        params = sum(p.numel() for p in model.parameters())
        (partial / "gpu_truth.json").write_text(
            json.dumps({"shape": shape, "smoke": smoke, "params": params})
        )
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        del model
        if cuda:
            torch.cuda.empty_cache()
        print(
            f"wrote {target} ({params / 1e9:.2f}B parameters) in {time.perf_counter() - start:.1f}s",
            flush=True,
        )


def _checkpoint_ready(folder: Path, shape: str, smoke: bool) -> bool:
    try:
        meta = json.loads((folder / "gpu_truth.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("shape") == shape and meta.get("smoke") == smoke


def ensure_checkpoints(work: Path, shapes: set[str], smoke: bool, log) -> dict[str, Path]:
    folders = {s: work / "models" / (f"{s}-smoke" if smoke else s) for s in sorted(shapes)}
    missing = [f"{s}={f}" for s, f in folders.items() if not _checkpoint_ready(f, s, smoke)]
    if missing:
        (work / "models").mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--write-checkpoints", *missing]
        if smoke:
            cmd.append("--smoke")
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=_child_env(work), capture_output=True, text=True)
        log(proc.stdout.strip())
        if proc.returncode != 0:
            raise SystemExit(f"writing the checkpoints failed:\n{proc.stderr[-4000:]}")
        log(f"checkpoints written in {time.perf_counter() - start:.0f}s")
    else:
        log(f"reusing the checkpoints in {work / 'models'}")
    return folders


def write_data(path: Path, examples: int, words: int) -> None:
    """Chats with a short question and a reply of `words` words: every example fills max_length
    (the run truncates it there), so every batch has the full shape the estimator plans for."""
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(examples):
            question = f"Repeat the list number {i}: " + " ".join(rng.choices(WORDS, k=8))
            reply = " ".join(rng.choices(WORDS, k=words))
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
            f.write(json.dumps({"messages": messages}) + "\n")


# ---------------------------------------------------------------------------------------------
# Stage 2: the driver's view of GPU memory, polled while a run is in flight


class DriverMemory:
    """GPU memory as the driver reports it: NVML (nvidia-ml-py) if importable, else nvidia-smi.

    The process's own figure where the driver lists it; in containers whose PID namespace hides it,
    the rise of the whole device's used memory over its level before the run ("device" source)."""

    def __init__(self, enabled: bool):
        self.nvml = None
        self.smi = enabled and shutil.which("nvidia-smi") is not None
        if not enabled:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no module or no driver: fall back to nvidia-smi
            self.nvml = None

    @property
    def available(self) -> bool:
        return self.nvml is not None or self.smi

    def sample(self) -> tuple[float, dict[int, float]]:
        """(device used GiB, {pid: GiB})."""
        if self.nvml is not None:
            used = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**30
        else:
            used = float(_smi("--query-gpu=memory.used", "--id=0")[0][0]) / 1024
        try:  # per-process figures are missing or unsupported under some container runtimes
            if self.nvml is not None:
                found = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
                procs = {p.pid: (p.usedGpuMemory or 0) / 2**30 for p in found}
            else:
                rows = _smi("--query-compute-apps=pid,used_memory")
                procs = {int(r[0]): float(r[1]) / 1024 for r in rows if len(r) == 2 and r[1].isdigit()}
        except Exception:
            procs = {}
        return used, procs

    def total_gib(self) -> float | None:
        if self.nvml is not None:
            return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).total / 2**30
        if self.smi:
            return float(_smi("--query-gpu=memory.total", "--id=0")[0][0]) / 1024
        return None

    def device_name(self) -> str | None:
        if self.nvml is not None:
            name = self.nvml.nvmlDeviceGetName(self.handle)
            return name.decode() if isinstance(name, bytes) else name
        if self.smi:
            return _smi("--query-gpu=name", "--id=0")[0][0]
        return None

    def watch(self, pid: int) -> _Watch:
        return _Watch(self, pid)


def _smi(*query: str) -> list[list[str]]:
    out = subprocess.run(
        ["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10
    ).stdout
    return [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]


class _Watch:
    """Polls in a thread until stop(), which returns (peak GiB, source), or (None, "") without a driver."""

    INTERVAL_S = 0.1  # torch's caching allocator keeps what it reserved, so the driver's view rises in steps

    def __init__(self, mem: DriverMemory, pid: int):
        self.mem, self.pid = mem, pid
        self.process_peak = 0.0
        self.device_peak = 0.0
        self.baseline = None
        self._stop = threading.Event()
        self._thread = None
        if mem.available:
            self.baseline = mem.sample()[0]
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                used, procs = self.mem.sample()
            except Exception:  # a failed poll is one missing sample, not a failed case
                used, procs = 0.0, {}
            self.device_peak = max(self.device_peak, used)
            self.process_peak = max(self.process_peak, procs.get(self.pid, 0.0))
            self._stop.wait(self.INTERVAL_S)

    def stop(self) -> tuple[float | None, str]:
        if self._thread is None:
            return None, ""
        self._stop.set()
        self._thread.join()
        if self.process_peak > 0:
            return self.process_peak, "process"
        return max(self.device_peak - self.baseline, 0.0), "device"


# ---------------------------------------------------------------------------------------------
# Stage 3: one case = one plan + one real run


# Runs finetune's own entry point after capping torch's allocator, so that the product itself needs
# no hook: argv[1] is the cap in GiB (0: no cap), the rest are finetune's overrides.
WRAPPER = """
import runpy, sys
cap = float(sys.argv[1])
if cap > 0:
    import torch
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(cap * 2**30 / total, 1.0))
    print(f"gpu_truth: torch's allocator capped at {cap:.2f} GiB of {total / 2**30:.1f} GiB", flush=True)
sys.argv = ["finetune", *sys.argv[2:]]
runpy.run_module("finetune", run_name="__main__", alter_sys=True)
"""


def _child_env(work: Path) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        FINETUNE_CACHE=str(work / "cache"),
        HF_HOME=str(work / "hf"),
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
    )
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def case_overrides(case: Case, folder: Path, data: dict, work: Path, hw: str, smoke: bool) -> list[str]:
    seq = _seq_len(case, smoke)
    steps = 2 if smoke else case.steps
    common = [
        f"model={SHAPES[case.shape]['group']}",
        f"model.name_or_path={folder}",
        "data=file",
        f"data.path={data[seq]}",
        f"data.max_length={seq}",
        "data.eval_fraction=0",  # no held-out scoring: generation would cost time and measure nothing here
        "data.packing=false",
        "data.padding_free=false",
        f"train.max_steps={steps}",
        "train.eval_samples=0",
        "train.logging_steps=1",
        f"output_dir={work / 'runs'}",
        f"run_name={case.name}-{dt.datetime.now():%H%M%S}",
        "seed=0",
    ]
    target = "cpu" if smoke else (case.emulate or hw)
    overrides = [*common, f"hw={target}", *case.overrides]
    if smoke and case.emulate:
        # On CPU every auto knob is resolved against the RAM budget; a micro-batch of 16 tiny rows
        # would cost the CI machine seconds it does not have.
        overrides.append("batch.effective=4")
    return overrides


def _seq_len(case: Case, smoke: bool) -> int:
    return min(case.seq_len // 16, 128) if smoke else case.seq_len


def _plan(overrides: list[str], work: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "finetune.plan", *overrides, "format=json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_child_env(work),
        timeout=120,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"finetune.plan failed: {(proc.stderr or proc.stdout).strip()[-1500:]}")
    return json.loads(proc.stdout)


def _train(
    overrides: list[str], cap_gib: float, work: Path, log_path: Path, timeout: float, mem: DriverMemory
):
    """Runs finetune in a child process (its own process group, so a timeout ends all of it)."""
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, f"{cap_gib}", *overrides],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=_child_env(work),
            start_new_session=True,
        )
        watch = mem.watch(proc.pid)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        driver, source = watch.stop()
    return rc, driver, source, time.perf_counter() - start


def _pct(estimate, measured) -> float | None:
    if estimate is None or not measured:
        return None
    return round(100 * (estimate - measured) / measured, 1)


def _round(x, n=2):
    return None if x is None else round(x, n)


def plan_all(cases: list[Case], ctx: dict) -> dict[str, dict | str]:
    """Every case's plan (or why it failed), computed before the first run, in parallel: a plan is
    CPU work, and the first one per model folder reads its architecture through transformers
    (~10 s on a slow CPU; later plans reuse the reading from the cache). One plan per folder goes
    first so that no two processes read the same folder at once."""
    from concurrent.futures import ThreadPoolExecutor

    def one(case: Case) -> dict | str:
        try:
            return _plan(ctx["overrides"][case.name], ctx["work"])
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as err:
            return str(err)

    first = list({c.shape: c for c in reversed(cases)}.values())
    rest = [c for c in cases if c not in first]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        plans = dict(zip([c.name for c in first], pool.map(one, first)))
        plans.update(zip([c.name for c in rest], pool.map(one, rest)))
    return plans


def run_case(case: Case, ctx: dict, timeout: float, plan: dict | str) -> tuple[dict, dict]:
    """(CSV row, raw record); `plan` is the case's plan, or why planning failed."""
    smoke, work = ctx["smoke"], ctx["work"]
    overrides = ctx["overrides"][case.name]
    row = {
        "case": case.name,
        "kind": case.kind,
        "model": SHAPES[case.shape]["group"],
        "seq_len": _seq_len(case, smoke),
    }
    raw = {"case": case.name, "overrides": overrides}
    if isinstance(plan, str):
        return {**row, "status": "plan failed", "note": plan[-300:]}, {**raw, "error": plan}
    raw["plan"] = plan
    row.update(_plan_columns(plan))
    cap = 0.0
    if case.emulate and not smoke:
        cap = plan["settings"]["hw"]["gpu_memory_gb"] - CONTEXT_GIB
        row["emulated_gib"] = _round(plan["settings"]["hw"]["gpu_memory_gb"])
    log_path = work / "logs" / f"{case.name}.log"
    rc, driver, source, wall = _train(overrides, cap, work, log_path, timeout, ctx["mem"])
    row["wall_s"] = round(wall, 1)
    tail = log_path.read_text(errors="replace").strip().splitlines()[-25:]
    summary = _summary(work / "runs", overrides)
    raw["summary"] = summary and {k: v for k, v in summary.items() if k not in ("samples",)}
    raw["log_tail"] = tail
    if rc is None:
        row.update(status="timeout", note=f"killed after {timeout:.0f}s")
    elif rc != 0 or summary is None:
        out_of_memory = any("OutOfMemory" in line or "out of memory" in line for line in tail)
        row.update(status="oom" if out_of_memory else "failed", note=(tail[-1] if tail else "")[:300])
    else:
        row["status"] = "ok"
    if summary:
        row.update(_measured_columns(summary, driver, source, row))
    if case.emulate and row["status"] == "ok":
        row.update(_autofit_verdict(row, smoke))
    return row, raw


def _plan_columns(plan: dict) -> dict:
    s, est = plan["settings"], plan["estimate"]
    lora = s["lora"]
    optim = s["optim"]["name"] + ("-layerwise" if s["optim"].get("galore_layerwise") else "")
    method = f"LoRA r{lora['r']}" if lora.get("enabled") else "full"
    if lora.get("enabled") and s["quant"]["load_in"] == "4bit":
        method = f"QLoRA r{lora['r']} {s['quant']['bnb_4bit_quant_type']}"
    elif lora.get("enabled") and s["quant"]["load_in"] == "8bit":
        method = f"LoRA r{lora['r']} int8"
    return {
        "method": method,
        "quant": s["quant"]["load_in"],
        "optim": optim,
        "grad_ckpt": s["train"]["gradient_checkpointing"],
        "batch": f"{s['batch']['size']}x{s['batch']['grad_accum']}",
        "attn": s["model"].get("attn_implementation"),
        "precision": s.get("precision"),
        "est_total_gib": _round(est["total_gib"]),
        "est_allocated_gib": _round(est["total_gib"] - est["overhead_gib"]),
        "est_tokens_per_s": _round(plan.get("tokens_per_second"), 0),
        "budget_gib": _round(plan.get("budget_gib")),
        "plan_fits": plan.get("fits"),
    }


def _summary(runs: Path, overrides: list[str]) -> dict | None:
    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("run_name="))
    try:
        return json.loads((runs / name / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def _measured_columns(summary: dict, driver: float | None, source: str, row: dict) -> dict:
    alloc, reserved = summary.get("peak_gpu_allocated_gib"), summary.get("peak_gpu_reserved_gib")
    tps = summary.get("tokens_per_second")
    est_tps = row.get("est_tokens_per_s")
    return {
        "measured_allocated_gib": _round(alloc),
        "allocated_err_pct": _pct(row.get("est_allocated_gib"), alloc),
        "measured_reserved_gib": _round(reserved),
        "driver_gib": _round(driver),
        "driver_source": source,
        "total_err_pct": _pct(row.get("est_total_gib"), driver),
        "measured_tokens_per_s": _round(tps, 0),
        # An auto-fit case's speed estimate is for the emulated card, not the one it runs on.
        "speed_ratio": _round(tps / est_tps) if tps and est_tps and row["kind"] == "measure" else None,
        "oom_events": len(summary.get("oom_events") or []),
        "steps": summary.get("steps"),
    }


def _autofit_verdict(row: dict, smoke: bool) -> dict:
    """Auto-fit keeps its promise when nothing stepped down and the whole process (the driver's
    figure; torch's reserved peak plus the context where the driver gave none) fit the budget."""
    if row.get("oom_events"):
        return {
            "status": "stepped down",
            "within_budget": False,
            "note": "ran out of memory: the OOM ladder stepped in",
        }
    peak = row.get("driver_gib")
    if peak is None and row.get("measured_reserved_gib") is not None:
        peak = row["measured_reserved_gib"] + CONTEXT_GIB
    if peak is None:
        return {
            "note": "ran with the plan's settings; no GPU to measure the peak"
            if smoke
            else "no memory reading"
        }
    within = peak <= row["budget_gib"]
    return {"within_budget": within, **({} if within else {"status": "over budget"})}


# ---------------------------------------------------------------------------------------------
# Stage 4: the tables


def _fmt(value, suffix="") -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:+.1f}{suffix}" if suffix == "%" else f"{value:,.2f}".rstrip("0").rstrip(".")
    return f"{value}{suffix}"


def markdown(rows: list[dict], header: str) -> str:
    measure = [r for r in rows if r["kind"] == "measure"]
    autofit = [r for r in rows if r["kind"] == "autofit"]
    lines = [header, ""]
    lines += [
        "| case | method | optim | ckpt | batch x len | est GiB | driver GiB | err % | est alloc | torch alloc | err % | torch reserved | tok/s measured | tok/s est | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in measure:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["case"],
                    _fmt(r.get("method")),
                    _fmt(r.get("optim")),
                    _fmt(r.get("grad_ckpt")),
                    f"{r.get('batch', '–')} x {r['seq_len']}",
                    _fmt(r.get("est_total_gib")),
                    _fmt(r.get("driver_gib")),
                    _fmt(r.get("total_err_pct"), "%"),
                    _fmt(r.get("est_allocated_gib")),
                    _fmt(r.get("measured_allocated_gib")),
                    _fmt(r.get("allocated_err_pct"), "%"),
                    _fmt(r.get("measured_reserved_gib")),
                    _fmt(r.get("measured_tokens_per_s")),
                    _fmt(r.get("est_tokens_per_s")),
                    r["status"],
                ]
            )
            + " |"
        )
    if autofit:
        lines += [
            "",
            "Auto-fit under emulated cards (every knob on auto; torch's allocator capped at the card's memory less "
            f"{CONTEXT_GIB:g} GiB of CUDA context):",
            "",
            "| case | card GiB | plan picked | est GiB | budget GiB | driver GiB | torch reserved | OOM step-downs | within budget | status |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in autofit:
            picked = f"{r.get('method', '–')}, {r.get('optim', '–')}, {r.get('batch', '–')}, ckpt {_fmt(r.get('grad_ckpt'))}, {r.get('precision', '–')}"
            lines.append(
                "| "
                + " | ".join(
                    [
                        r["case"],
                        _fmt(r.get("emulated_gib")),
                        picked,
                        _fmt(r.get("est_total_gib")),
                        _fmt(r.get("budget_gib")),
                        _fmt(r.get("driver_gib")),
                        _fmt(r.get("measured_reserved_gib")),
                        _fmt(r.get("oom_events")),
                        _fmt(r.get("within_budget")),
                        r["status"],
                    ]
                )
                + " |"
            )
    notes = [f"- {r['case']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        lines += ["", *notes]
    lines += [
        "",
        "est GiB: the plan's total (with CUDA context and allocator slack) against the driver's figure for the "
        "process; est alloc: the total less that overhead, against torch's peak allocated. err % = (estimate - "
        "measured) / measured: positive overestimates (the safe side). tok/s measured: summary.json "
        "(all steps, the first one's warm-up included).",
    ]
    return "\n".join(lines) + "\n"


def write_reports(out: Path, rows: list[dict], raws: list[dict], meta: dict) -> None:
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    header = (
        f"`python scripts/gpu_truth.py {meta['argv']}` on {meta['device']} ({meta['date']}; {meta['versions']}; "
        f"{meta['steps']} steps per case, total {meta['total_s']:.0f}s):"
    )
    (out / "results.md").write_text(markdown(rows, header))
    (out / "results.json").write_text(json.dumps({"meta": meta, "cases": raws}, indent=1, default=str))


# ---------------------------------------------------------------------------------------------


def select_cases(args) -> list[Case]:
    cases = [c for c in CASES if c.name in SMOKE_CASES] if args.smoke else list(CASES)
    if args.quick:
        cases = [c for c in cases if c.quick]
    if args.cases:
        patterns = [p.strip() for p in args.cases.split(",") if p.strip()]
        cases = [c for c in cases if any(p in c.name for p in patterns)]
    return cases


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(found)


def _preflight(smoke: bool) -> list[str]:
    """Missing modules named before minutes of checkpoint writing, not after."""
    import importlib.util

    needed = [
        "torch",
        "transformers",
        "peft",
        "trl",
        "accelerate",
        "datasets",
        "hydra",
        "omegaconf",
        "bitsandbytes",
    ]
    needed += ["tokenizers", "safetensors", "rich", "psutil"]
    return [m for m in needed if importlib.util.find_spec(m) is None]


def _has_galore() -> bool:
    import importlib.util

    return importlib.util.find_spec("galore_torch") is not None


def _hw_preset(work: Path, log) -> str:
    """The preset the detected card matches (finetune's own detection, through its CLI): training
    and planning then use the same fixed numbers, whatever memory happens to be free."""
    try:
        plan = _plan(["model=qwen2.5-1.5b", "hw=auto"], work)  # any catalog model: only hw matters
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as err:
        log(f"hw=auto could not be planned ({err}); cases use hw=auto")
        return "auto"
    name = plan["settings"]["hw"]["name"]
    known = {p.stem for p in (REPO / "configs" / "hw").glob("*.yaml")}
    log(f"detected card: {name}" + ("" if name in known else " (no preset matches: cases use hw=auto)"))
    return name if name in known else "auto"


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="gpu_truth.py",
        description=__doc__.split("\n\n")[0],
        epilog="Details: the module docstring (head -40 scripts/gpu_truth.py) and BENCHMARKS.md, 'GPU truth check'.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for results.csv/.md/.json and log.txt (default: gpu-truth-<date>-<time>)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="checkpoints, data, runs and logs (default: $TMPDIR/gpu_truth; checkpoints are reused)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CPU, tiny widths, 2 steps, hw=cpu: the code path without CUDA (CI)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="only the most valuable cases (about half the time)"
    )
    parser.add_argument("--cases", help="comma-separated patterns: run the cases whose names contain one")
    parser.add_argument(
        "--list", action="store_true", help="print the cases and their time budget, run nothing"
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=480,
        help="seconds for everything, checkpoints included (default 480); later cases that no longer fit are skipped",
    )
    parser.add_argument(
        "--case-timeout-factor",
        type=float,
        default=2.5,
        help="kill a case after this many times its budget (default 2.5)",
    )
    parser.add_argument(
        "--keep-runs",
        action="store_true",
        help="keep each run's adapter/model folder (default: only summary.json and config.yaml)",
    )
    parser.add_argument("--write-checkpoints", nargs="+", metavar="SHAPE=FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.write_checkpoints:
        _write_checkpoints(args.write_checkpoints, args.smoke)
        return

    cases = select_cases(args)
    if args.list:
        shapes = {c.shape for c in cases}
        total = sum(c.budget_s for c in cases) + sum(CHECKPOINT_BUDGET_S[s] for s in shapes)
        for c in cases:
            print(
                f"{c.budget_s:4d}s  {c.name:42s} {' '.join(c.overrides) or '(auto-fit, hw=' + str(c.emulate) + ')'}"
            )
        print(f"{sum(CHECKPOINT_BUDGET_S[s] for s in shapes):4d}s  checkpoints ({', '.join(sorted(shapes))})")
        print(f"{total:4d}s  total on an H100/H200 (budget {args.time_budget:.0f}s)")
        return
    if not cases:
        raise SystemExit("no case matches --cases.")

    started = time.perf_counter()
    deadline = started + args.time_budget
    out = args.out or Path(f"gpu-truth-{dt.datetime.now():%Y%m%d-%H%M%S}")
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_truth"
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("logs", "runs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    log_file = (out / "log.txt").open("w")

    def log(msg: str) -> None:
        if not msg:
            return
        line = f"[{time.perf_counter() - started:6.1f}s] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    missing = _preflight(args.smoke)
    if missing:
        raise SystemExit(
            f"missing Python modules: {', '.join(missing)}. Install the project first (make install)."
        )
    mem = DriverMemory(enabled=not args.smoke)
    if not args.smoke and not mem.available:
        raise SystemExit(
            "no NVIDIA driver (neither NVML nor nvidia-smi): run with --smoke on a machine without a GPU."
        )
    if args.smoke:
        cases = [c for c in cases if c.cpu]
    if not _has_galore() and any("optim=galore_8bit" in c.overrides for c in cases):
        # One optional package should not cost the whole GPU window: run the other cases.
        log("galore-torch is not installed: the GaLore case is left out (pip install galore-torch)")
        cases = [c for c in cases if "optim=galore_8bit" not in c.overrides]
    device = "CPU (smoke)" if args.smoke else f"{mem.device_name()} ({mem.total_gib():.0f} GiB)"
    log(f"{len(cases)} cases on {device}")

    folders = ensure_checkpoints(work, {c.shape for c in cases}, args.smoke, log)
    # One file per length, so a short case does not tokenize replies made for the longest one; 64
    # rows: no case repeats an example within its steps (auto-fit: 16 sequences x 3 steps).
    data = {}
    for seq in sorted({_seq_len(c, args.smoke) for c in cases}):
        data[seq] = work / f"chats-{'smoke-' if args.smoke else ''}{seq}.jsonl"
        write_data(data[seq], examples=32 if args.smoke else 64, words=seq + 64)
    hw = _hw_preset(work, log)  # the smoke pins hw=cpu in every case, but runs the detection too
    ctx = {"smoke": args.smoke, "work": work, "folders": folders, "data": data, "hw": hw, "mem": mem}

    ctx["overrides"] = {
        c.name: case_overrides(c, folders[c.shape], data, work, hw, args.smoke) for c in cases
    }
    plans = plan_all(cases, ctx)
    log(f"planned {len(cases)} cases")

    rows, raws = [], []
    for case in cases:
        left = deadline - time.perf_counter()
        if not args.smoke and left < case.budget_s:
            rows.append(
                {
                    "case": case.name,
                    "kind": case.kind,
                    "model": SHAPES[case.shape]["group"],
                    "seq_len": case.seq_len,
                    "status": "skipped",
                    "note": f"{left:.0f}s left of the time budget, the case needs ~{case.budget_s}s",
                }
            )
            log(f"{case.name}: skipped ({left:.0f}s left)")
            continue
        timeout = case.budget_s * args.case_timeout_factor if not args.smoke else 300
        if not args.smoke:
            timeout = min(timeout, max(left, case.budget_s))
        row, raw = run_case(case, ctx, timeout, plans[case.name])
        rows.append(row)
        raws.append(raw)
        log(
            f"{case.name}: {row['status']} in {row.get('wall_s', 0):.0f}s; est {_fmt(row.get('est_total_gib'))} GiB, "
            f"driver {_fmt(row.get('driver_gib'))}, torch alloc {_fmt(row.get('measured_allocated_gib'))} "
            f"(est {_fmt(row.get('est_allocated_gib'))}), {_fmt(row.get('measured_tokens_per_s'))} tok/s "
            f"(est {_fmt(row.get('est_tokens_per_s'))})"
        )
        if row["status"] not in ("ok",):
            for line in raw.get("log_tail", [])[-8:]:
                log(f"    {line}")
        if not args.keep_runs:
            run_dir = (
                work
                / "runs"
                / next(o.split("=", 1)[1] for o in raw["overrides"] if o.startswith("run_name="))
            )
            for sub in ("adapter", "model", "checkpoints"):
                shutil.rmtree(run_dir / sub, ignore_errors=True)

    total = time.perf_counter() - started
    meta = {
        "argv": " ".join(sys.argv[1:]),
        "device": device,
        "date": f"{dt.date.today()}",
        "versions": _versions(),
        "steps": 2 if args.smoke else "10 (auto-fit: 3)",
        "total_s": round(total, 1),
        "hw": hw,
    }
    write_reports(out, rows, raws, meta)
    log(f"done in {total:.0f}s: {out / 'results.md'}")
    log_file.close()
    print((out / "results.md").read_text())
    bad = [r["case"] for r in rows if r["status"] not in ("ok", "skipped")]
    if bad:
        raise SystemExit(f"{len(bad)} case(s) did not pass: {', '.join(bad)}")


if __name__ == "__main__":
    main()
