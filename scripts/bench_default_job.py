"""The embedded default job as a user runs it: wall time (cold cache, with the one-time GGUF conversion,
and warm), held-out accuracy before/after. Medians over runs.

    python scripts/bench_default_job.py [--warm 3] [--cold 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_run(out: Path, name: str, cache: Path | None, seed: int) -> dict:
    env = dict(os.environ)
    if cache is not None:
        env["FINETUNE_CACHE"] = str(cache)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "finetune", f"output_dir={out}", f"run_name={name}", f"seed={seed}"],
        check=True,
        capture_output=True,
        env=env,
    )
    wall = time.perf_counter() - start
    summary = json.loads((out / name / "summary.json").read_text())
    return {
        "wall": wall,
        "train": summary["wall_seconds"],
        "before": summary["accuracy_before"],
        "after": summary["accuracy_after"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--cold", type=int, default=1)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runs"
        for i in range(args.cold):  # an empty cache: includes the one-time GGUF -> safetensors conversion
            rows.append(("cold", 42, one_run(out, f"cold{i}", Path(tmp) / f"cache{i}", 42)))
        for i, seed in enumerate([42, 1, 2, 3, 4][: args.warm]):
            rows.append(("warm", seed, one_run(out, f"warm{i}", None, seed)))
    print("| cache | seed | wall (s) | training (s) | accuracy before | accuracy after |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, seed, r in rows:
        print(
            f"| {kind} | {seed} | {r['wall']:.0f} | {r['train']:.0f} | {r['before']:.0%} | {r['after']:.0%} |"
        )
    for kind in ("cold", "warm"):
        sel = [r for k, _, r in rows if k == kind]
        if sel:
            med = {
                key: statistics.median(r[key] for r in sel) for key in ("wall", "train", "before", "after")
            }
            print(
                f"| **{kind} median** ({len(sel)} runs) | | {med['wall']:.0f} | {med['train']:.0f} "
                f"| {med['before']:.0%} | {med['after']:.0%} |"
            )


if __name__ == "__main__":
    main()
