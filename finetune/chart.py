"""The GaLore memory chart (seed document 000) from our estimator: full-parameter training of the
LLaMA 350M/1B/3B/7B configs under five optimizers, with a dashed line at the chosen GPU's memory.

Settings follow the GaLore paper's figure: one 256-token sequence per step, bf16 weights, no
activation checkpointing, no offloading.
"""

from __future__ import annotations

from typing import Any

import yaml

from finetune import config_dir, memory

SIZES = ("llama-350m", "llama-1b", "llama-3b", "llama-7b")
METHODS = {  # label -> (optimizer, keeps the full gradient)
    "BF16": ("adamw", True),
    "Adafactor": ("adafactor", True),
    "8-bit Adam": ("adamw_8bit", True),
    "8-bit GaLore (retaining grad)": ("galore_8bit", True),
    "8-bit GaLore": ("galore_8bit", False),
}


def galore_table(galore_rank: int = 128) -> dict[str, dict[str, float]]:
    """{model: {method: GiB}} for the chart and the docs."""
    table = {}
    for name in SIZES:
        arch = yaml.safe_load((config_dir() / "model" / f"{name}.yaml").read_text())["arch"]
        table[name] = {
            label: memory.estimate(
                arch,
                memory.Settings(
                    lora_r=None,
                    optim=optim,
                    galore_rank=galore_rank,
                    galore_retain_grad=keeps_grad,
                    batch_size=1,
                    seq_len=256,
                    grad_ckpt=False,
                    dtype="bfloat16",
                ),
            ).total_gib
            for label, (optim, keeps_grad) in METHODS.items()
        }
    return table


def galore_chart(path: str, hw: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    table = galore_table()
    colours = ["#efe3c8", "#b9d9a8", "#6aa84f", "#8b5a2b", "#8b5a2b"]
    hatches = ["", "", "//", "\\\\", "--"]
    width = 0.16
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, label in enumerate(METHODS):
        xs = [x + (i - 2) * width for x in range(len(SIZES))]
        ax.bar(
            xs,
            [table[s][label] for s in SIZES],
            width,
            label=label,
            color=colours[i],
            hatch=hatches[i],
            edgecolor="black",
            linewidth=0.5,
        )
    if hw.num_gpus > 0:
        ax.axhline(hw.gpu_memory_gb, color="red", linestyle="--", linewidth=1.5)
        ax.text(
            -0.45,
            hw.gpu_memory_gb,
            f"{hw.name} ({hw.gpu_memory_gb:g} GiB)",
            color="red",
            va="bottom",
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
        )
    ax.set_xticks(range(len(SIZES)), [s.removeprefix("llama-").upper() for s in SIZES])
    ax.set_xlabel("Model size (LLaMA, GaLore configs)")
    ax.set_ylabel("Memory (GiB), estimated by finetune")
    ax.set_title("Memory comparison: full-parameter training, 256-token batch, no checkpointing")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
