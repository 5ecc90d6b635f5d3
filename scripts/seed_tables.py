"""Regenerate the seed documents' tables and chart from finetune's estimator, next to the seed's numbers.

    python scripts/seed_tables.py            # writes docs/seed-tables.md and docs/galore-chart.png

Settings (the seed states none): one 512-token sequence per micro-batch, gradient checkpointing,
AdamW, bf16 on an A100-class GPU, LoRA r16 on all attention and MLP projections; inference holds the
weights, a 2048-token KV cache and the CUDA context. Cells where ours differs from the seed by more
than 25% are marked with *.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import compose  # noqa: E402 - the same Hydra composition as the command line

from finetune import chart, plan  # noqa: E402

# The memory guide's "Complete Memory Comparison Table" (GB as printed; the guide does not say GB or GiB).
SEED_TRAINING = {
    "phi-3-mini": (46, 8, 4, 6, "T4 (15GB)"),
    "llama-3-8b": (96, 16, 6, 12, "T4 (15GB)"),
    "qwen2.5-7b": (91, 15, 6, 11, "T4 (15GB)"),
    "qwen2-vl-7b": (84, 14, 8, 12, "T4 (15GB)"),
    "gpt-oss-20b": (240, 40, 14, 28, "V100 (32GB)"),
    "llama-3-70b": (840, 140, 42, 105, "A100 (80GB)"),
}
SEED_INFERENCE = {
    "phi-3-mini": (7.6, 3.8, 2.1),
    "llama-3-8b": (16, 8, 4.5),
    "qwen2.5-7b": (15, 7.5, 4.2),
    "qwen2-vl-7b": (14, 7, 4.8),
    "gpt-oss-20b": (40, 20, 11),
}
# The GaLore chart (seed 000), GB read off the figure.
SEED_GALORE = {
    "llama-350m": (4, 4, 3, 2.5, 2),
    "llama-1b": (14, 13, 9, 7, 5),
    "llama-3b": (28, 26, 18, 15, 10),
    "llama-7b": (60, 52, 46, 37, 22),
}


def cell(ours: float, seed: float) -> str:
    flag = " *" if abs(ours - seed) > 0.25 * seed else ""
    return f"{ours:.1f} ({seed:g}){flag}"


def main() -> None:
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    lines = [
        "# The seed documents' tables, regenerated",
        "",
        "Made by `python scripts/seed_tables.py` from finetune's memory estimator. Each cell: **ours (seed)**,",
        "GiB; `*` marks a difference over 25%. "
        + __doc__.split("Settings (the seed states none): ")[1].split(" Cells")[0],
        "",
        "## Training memory",
        "",
        "| Model | Parameters | Full FT | LoRA | LoRA + 4bit | LoRA + 8bit | Smallest GPU for LoRA + 4bit (seed) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    inference_rows = []
    for model, seed in SEED_TRAINING.items():
        cfg = compose(
            [
                f"model={model}",
                "hw=a100-80gb",
                "data=file",
                "data.path=x.jsonl",
                "data.max_length=512",
                "lora=r16",
            ]
        )
        table = plan.methods(cfg)
        t = table["training"]
        params = plan.memory.count_params(plan.source.architecture(cfg.model)).total / 1e9
        row = [cell(t[k]["gib"], s) for k, s in zip(("full", "lora", "lora_4bit", "lora_8bit"), seed[:4])]
        # no single GPU holds it (Llama-3-70B full and 16-bit LoRA): the fewest A100s, per-GPU GiB
        row = [
            text
            + (
                f" → {t[k]['smallest_gpu']}, {t[k]['gpus']['per_device_gib']:.1f}/GPU"
                if model == "llama-3-70b" and t[k].get("gpus")
                else ""
            )
            for text, k in zip(row, ("full", "lora", "lora_4bit", "lora_8bit"))
        ]
        lines.append(
            f"| {model} | {params:.1f}B | {' | '.join(row)} | {t['lora_4bit']['smallest_gpu']} ({seed[4]}) |"
        )
        if model in SEED_INFERENCE:
            i = table["inference"]
            inference_rows.append(
                f"| {model} | "
                + " | ".join(cell(i[k], s) for k, s in zip(("16bit", "8bit", "4bit"), SEED_INFERENCE[model]))
                + " |"
            )
    lines += [
        "",
        "## Inference memory",
        "",
        "| Model | 16-bit | 8-bit | 4-bit |",
        "| --- | --- | --- | --- |",
        *inference_rows,
    ]
    lines += [
        "",
        "## GaLore chart: full-parameter training (one 256-token sequence, no checkpointing)",
        "",
        "| Model | " + " | ".join(chart.METHODS) + " |",
        "| --- |" + " --- |" * len(chart.METHODS),
    ]
    for model, values in chart.galore_table().items():
        cells = [cell(values[m], s) for m, s in zip(chart.METHODS, SEED_GALORE[model])]
        lines.append(f"| {model} | {' | '.join(cells)} |")
    lines += ["", "![GaLore chart](galore-chart.png)", ""]
    notes = ROOT / "docs" / "seed-tables-notes.md"
    if notes.exists():
        lines += [notes.read_text()]
    (docs / "seed-tables.md").write_text("\n".join(lines))
    hw = OmegaConf.create({"name": "rtx4090", "num_gpus": 1, "gpu_memory_gb": 23.64})
    chart.galore_chart(str(docs / "galore-chart.png"), hw)
    print("wrote docs/seed-tables.md and docs/galore-chart.png")


if __name__ == "__main__":
    main()
