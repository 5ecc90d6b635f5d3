"""Score the memory estimator against published peak-memory measurements.

    python scripts/calibrate.py                 # summary (recorded in BENCHMARKS.md)
    python scripts/calibrate.py --rows          # plus one line per scored row
    python scripts/calibrate.py --dir PATH      # calibration folder (default: shared/calibration)

Reads ``points.csv`` and ``archs/<slug>/config.json`` of the calibration folder, maps each row's
recorded settings onto :class:`finetune.memory.Settings`, and compares the estimate with the
published peak. The headline set is the measured, exact, single-GPU Hugging Face / PEFT / TRL
points (``framework == hf``) minus two groups that do not run our stack (see ``EXCLUDED`` below);
every other exact point is scored too and reported per framework, and bound rows are checked.

How an estimate is compared depends on what the source measured (``mem_metric``):
``allocated``/``active`` -> torch's allocated peak (no CUDA context, no allocator slack, no paged
optimizer state, which lives outside torch's allocator); ``reserved`` -> allocated plus slack;
``nvml`` and ``unknown`` -> the whole estimate (unstated numbers are mostly nvidia-smi readings).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune.memory import ALLOCATOR_SLACK, CUDA_CONTEXT_GIB, Settings, estimate  # noqa: E402
from finetune.source import read_config  # noqa: E402

THRESHOLDS = {"median": 10.0, "p90": 25.0}  # % absolute error on the headline set

EXCLUDED = {
    # DeepSpeed ZeRO on one GPU adds fp32 master partitions and communication buckets sized by
    # each ds_config; our pipeline never runs DeepSpeed, so these rows do not measure our stack.
    "deepspeed": lambda r: "deepspeed" in r["other_opts"],
    # calibration README: Unsloth's A100 table probably used settings other than those stated.
    "unreliable (README)": lambda r: 237 <= int(r["point_id"][1:]) <= 248,
}


def calibration_dir(explicit: str | None = None) -> Path | None:
    """The calibration folder: --dir, $FINETUNE_CALIBRATION_DIR, <repo>/shared or <repo>/../shared."""
    repo = Path(__file__).resolve().parents[1]
    for cand in (
        explicit,
        os.environ.get("FINETUNE_CALIBRATION_DIR"),
        repo / "shared" / "calibration",
        repo.parent / "shared" / "calibration",
    ):
        if cand and (Path(cand) / "points.csv").is_file():
            return Path(cand)
    return None


def settings_for(row: dict, unknown_attn: str = "sdpa") -> Settings:
    """The row's recorded configuration as estimator settings (``unknown_attn``: see run())."""
    opts = set(filter(None, row["other_opts"].split(",")))
    method = row["method"]
    quant = row["quant"] if row["quant"] in ("4bit", "8bit") else "none"
    qm = row["quant_method"]
    # GPTQ int4 with group size 128 stores ~0.52 byte/weight, as NF4 with double quantization does;
    # torchao's NF4 also quantizes its block scales.
    double_quant = qm in ("nf4_dq", "gptq", "nf4_torchao")
    optim = row["optim"]
    if optim == "adamw" and "paged_optimizer" in opts:
        optim = "paged_adamw"
    # the model's own module names (query_key_value, dense, fc1, ...): LoRA targets are PEFT's matching
    targets = tuple(filter(None, (row["lora_targets_native"] or row["lora_targets"]).split(",")))
    extra = tuple(filter(None, row["lora_extra_trainable"].split(",")))
    attn = {"flash": "flash_attention_2", "eager": "eager", "sdpa": "sdpa"}.get(row["attn"], unknown_attn)
    precision = row["precision"]
    loss_impl = "full"
    if "cut_cross_entropy" in opts:
        loss_impl = "fused"
    elif "chunked_ce" in opts:
        loss_impl = "chunked"
    return Settings(
        quant=quant,
        double_quant=double_quant,
        lora_r=None if method in ("full", "galore") else int(float(row["lora_r"] or 8)),
        lora_targets=targets or ("q_proj", "v_proj"),
        modules_to_save=extra,
        # every stack measured here predates TRL's bf16 cast of QLoRA adapters: PEFT keeps them fp32
        adapter_dtype="float32",
        optim=optim,
        # HF Trainer's default was foreach AdamW until transformers switched to fused (torch >= 2.8)
        fused_optimizer=row["framework"] != "hf",
        galore_rank=int(float(row["galore_rank"] or 128)),
        galore_retain_grad="opt_in_bwd" not in opts,
        batch_size=int(float(row["batch"] or 1)),
        seq_len=int(float(row["seq_len"] or 512)),
        grad_accum=int(float(row["grad_accum"] or 1)),
        grad_ckpt=row["grad_ckpt"] != "false",
        attn=attn,
        dtype={"fp16": "float16", "fp32": "float32"}.get(precision, "bfloat16"),
        master_weights_fp32=precision == "amp-fp32-master",
        packed="packed" in opts,
        # 2023-24 QLoRA recipes ran peft.prepare_model_for_kbit_training (fp32 non-quantized weights)
        kbit_fp32_upcast=quant != "none" and row["framework"] == "hf",
        loss_impl=loss_impl,
        opt_in_backward="opt_in_bwd" in opts and not method == "galore",
        offload_activations=bool({"act_offload", "unsloth_offloaded_gc"} & opts),
    )


def predicted(row: dict, s: Settings, archs: Path) -> float:
    """Estimate in the unit the source measured."""
    arch = read_config(archs / row["arch"] / "config.json")
    # the BERT rows fine-tune a sequence classifier (an encoder): the estimator models that head too
    task = "sequence-classification" if arch["model_type"] == "bert" else "causal-lm"
    est = estimate(arch, s, task=task)
    metric = row["mem_metric"]
    if metric in ("nvml", "unknown", "estimate"):
        return est.total_gib
    allocated = (est.total_gib - CUDA_CONTEXT_GIB) / (1 + ALLOCATOR_SLACK)
    if s.optim.startswith("paged"):
        allocated -= est.optimizer_gib  # unified memory: invisible to torch's allocator statistics
    return allocated * (1 + ALLOCATOR_SLACK) if metric == "reserved" else allocated


@dataclass
class Scored:
    row: dict
    pred: float
    err: float  # signed %, (pred - measured) / measured


def stats(errs: list[float]) -> dict:
    a = sorted(abs(e) for e in errs)
    if not a:
        return {"n": 0}
    p90 = statistics.quantiles(a, n=10, method="inclusive")[-1] if len(a) > 1 else a[0]
    return {
        "n": len(a),
        "median": statistics.median(a),
        "p90": p90,
        "within20": sum(e <= 20 for e in a) / len(a) * 100,
        "bias": statistics.median(errs),
    }


def run(folder: Path) -> dict:
    """Score every usable row; returns the groups of scored rows and the bound checks."""
    archs = folder / "archs"
    rows = list(csv.DictReader((folder / "points.csv").open()))
    groups: dict[str, list[Scored]] = {}
    bounds: list[tuple[dict, float, bool]] = []
    # A source that reports the same run with and without an attention kernel leaves the attention
    # "unknown" on its baseline column: that column is the framework default of its day, eager.
    # Elsewhere "unknown" is taken as today's default, SDPA.
    with_kernel = {_config_key(r) for r in rows if r["attn"] in ("flash", "sdpa")}
    for row in rows:
        if row["measured"] != "true" or not row["arch"] or not (archs / row["arch"]).is_dir():
            continue
        s = settings_for(row, "eager" if _config_key(row) in with_kernel else "sdpa")
        pred = predicted(row, s, archs)
        if row["kind"] == "exact":
            meas = float(row["peak_gib"])
            reason = next((name for name, test in EXCLUDED.items() if test(row)), None)
            group = reason or row["framework"]
            groups.setdefault(group, []).append(Scored(row, pred, (pred - meas) / meas * 100))
        else:
            bound = float(row["bound_gib"])
            ok = pred >= bound if row["kind"] == "lower_bound" else pred <= bound
            bounds.append((row, pred, ok))
    return {"groups": groups, "bounds": bounds}


def _config_key(r: dict) -> tuple:
    keys = ("source_id", "framework", "arch", "method", "quant", "lora_r", "optim", "batch", "seq_len", "gpu")
    return tuple(r[k] for k in keys)


def headline(result: dict) -> dict:
    """Stats of the HF-stack set, overall and by method."""
    hf = result["groups"].get("hf", [])
    out = {"all": stats([x.err for x in hf])}
    for method in ("full", "lora", "qlora", "galore"):
        out[method] = stats([x.err for x in hf if x.row["method"] == method])
    return out


def _fmt(st: dict) -> str:
    if not st["n"]:
        return "n=0"
    return (
        f"n={st['n']:3d}  median {st['median']:5.1f}%  p90 {st['p90']:5.1f}%  "
        f"within 20%: {st['within20']:5.1f}%  median signed {st['bias']:+5.1f}%"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="calibration folder holding points.csv and archs/")
    parser.add_argument("--rows", action="store_true", help="print every scored row")
    args = parser.parse_args()
    folder = calibration_dir(args.dir)
    if folder is None:
        sys.exit("calibration folder not found: pass --dir or set FINETUNE_CALIBRATION_DIR")
    result = run(folder)
    if args.rows:
        for group, scored in sorted(result["groups"].items()):
            for x in scored:
                r = x.row
                print(
                    f"{group:22} {r['point_id']} {r['arch']:22} {r['method']:6} {r['optim']:16} "
                    f"b{r['batch']:>2} s{r['seq_len']:>6} {r['mem_metric']:9} measured {float(r['peak_gib']):6.2f} "
                    f"est {x.pred:6.2f} {x.err:+6.1f}%"
                )
    print("Headline: measured exact single-GPU HF/PEFT/TRL points")
    for name, st in headline(result).items():
        print(f"  {name:7} {_fmt(st)}")
    print("Other exact points (not in the headline set)")
    for group, scored in sorted(result["groups"].items()):
        if group != "hf":
            print(f"  {group:22} {_fmt(stats([x.err for x in scored]))}")
    bounds = result["bounds"]
    print("Bound rows (lower: estimate >= bound, upper: estimate <= bound)")
    for kind in ("lower_bound", "upper_bound"):
        for fw in sorted({r["framework"] for r, _, _ in bounds if r["kind"] == kind}):
            sel = [ok for r, _, ok in bounds if r["kind"] == kind and r["framework"] == fw]
            print(f"  {kind:12} {fw:10} {sum(sel)}/{len(sel)} satisfied")
    if args.rows:
        for r, pred, ok in bounds:
            print(
                f"  {r['point_id']} {r['kind']:12} {r['framework']:9} bound {float(r['bound_gib']):6.2f} "
                f"est {pred:6.2f} {'ok' if ok else 'VIOLATED'}"
            )


if __name__ == "__main__":
    main()
