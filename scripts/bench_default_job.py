"""The embedded default job as a user runs it: wall time (cold cache, with the one-time GGUF conversion,
and warm), held-out accuracy before/after. Medians over runs.

    python scripts/bench_default_job.py [--warm 3] [--cold 1]
    python scripts/bench_default_job.py --checkpoints 3   # checkpoint overhead: with vs without

`--checkpoints N` runs the warm default job N times each way, interleaved so that load on a shared
machine hits both alike: with a checkpoint every 10 steps (train.save_steps=10) and with none
(train.save_steps=0). Both evaluate every 10 steps (train.eval_steps=10, what eval_steps=auto does
with save_steps=10), so the difference is the checkpoints alone.

`--save-cost N` is the quick check for a machine too loaded for whole runs: it trains the default job
for one step in-process, then times N full checkpoint saves (StepDownTrainer._save_checkpoint: adapter,
optimizer, scheduler, RNG, staging, fsync, rename, rotation).
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


def one_run(out: Path, name: str, cache: Path | None, seed: int, *extra: str) -> dict:
    env = dict(os.environ)
    if cache is not None:
        env["FINETUNE_CACHE"] = str(cache)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "finetune", f"output_dir={out}", f"run_name={name}", f"seed={seed}", *extra],
        check=True,
        capture_output=True,
        env=env,
    )
    wall = time.perf_counter() - start
    summary = json.loads((out / name / "summary.json").read_text())
    return {
        "wall": wall,
        "train": summary["wall_seconds"],
        "saving": summary.get("checkpoint_seconds", 0.0),
        "before": summary["accuracy_before"],
        "after": summary["accuracy_after"],
    }


CHECKPOINTS = {"with": ["train.save_steps=10"], "without": ["train.save_steps=0"]}


def checkpoint_overhead(runs: int) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runs"
        for i in range(runs):
            for kind, extra in CHECKPOINTS.items():
                r = one_run(out, f"{kind}{i}", None, 42, "train.eval_steps=10", *extra)
                saved = sorted(p.name for p in (out / f"{kind}{i}" / "checkpoints").glob("checkpoint-*"))
                rows.append((kind, r, saved))
                print(
                    f"{kind} #{i}: {r['wall']:.1f} s wall, {r['train']:.1f} s training, "
                    f"{r['saving']:.2f} s writing checkpoints ({r['saving'] / r['wall']:.1%} of wall), kept {saved}",
                    flush=True,
                )
    print("| checkpoints | runs | median wall (s) | median training (s) | accuracy after |")
    print("| --- | --- | --- | --- | --- |")
    med = {}
    for kind in CHECKPOINTS:
        sel = [r for k, r, _ in rows if k == kind]
        med[kind] = {key: statistics.median(r[key] for r in sel) for key in ("wall", "train", "after")}
        print(
            f"| {kind} ({' '.join(CHECKPOINTS[kind])}) | {len(sel)} | {med[kind]['wall']:.1f} "
            f"| {med[kind]['train']:.1f} | {med[kind]['after']:.0%} |"
        )
    for key in ("wall", "train"):
        print(f"{key}: with / without = {med['with'][key] / med['without'][key]:.3f}")


def save_cost(saves: int) -> None:
    import tempfile

    from hydra import compose, initialize_config_dir

    import finetune.schema  # noqa: F401 - registers the schema with Hydra
    from finetune import config_dir, pipeline

    with tempfile.TemporaryDirectory() as tmp:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(
                "finetune", [f"output_dir={tmp}", "run_name=cost", "train.max_steps=1", "train.save_steps=0"]
            )
        from finetune.oom import StepDownTrainer

        seen, train = [], StepDownTrainer.train

        def keep(self, *args, **kwargs):  # the run's trainer, to save it again afterwards
            seen.append(self)
            return train(self, *args, **kwargs)

        StepDownTrainer.train = keep
        pipeline.run(cfg)
        trainer, times = seen[0], []
        for i in range(saves):
            trainer.state.global_step = 100 + i
            start = time.perf_counter()
            trainer._save_checkpoint(trainer.model, None)
            times.append(time.perf_counter() - start)
        folder = Path(tmp) / "cost" / "checkpoints"
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / max(
            1, len(list(folder.glob("checkpoint-*")))
        )
        print(
            f"checkpoint: {size / 2**20:.0f} MiB; save times {[round(t, 2) for t in times]} s, median {statistics.median(times):.2f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--cold", type=int, default=1)
    parser.add_argument(
        "--checkpoints", type=int, default=0, help="runs each way for the checkpoint overhead"
    )
    parser.add_argument("--save-cost", type=int, default=0, help="time N checkpoint saves of the default job")
    args = parser.parse_args()
    if args.save_cost:
        save_cost(args.save_cost)
        return
    if args.checkpoints:
        checkpoint_overhead(args.checkpoints)
        return
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
