"""Wall time of `python -m finetune --cfg job` and `python -m finetune.plan` against bare interpreter
start-up, same run, medians.

python scripts/bench_startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time


def wall(cmd: list[str], runs: int, cwd: str) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=cwd)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    runs = parser.parse_args().runs
    py = sys.executable
    with tempfile.TemporaryDirectory() as cwd:
        cases = {
            "python -c pass (baseline)": [py, "-c", "pass"],
            "python -c 'import torch' (for scale)": [py, "-c", "import torch"],
            "python -m finetune --cfg job": [py, "-m", "finetune", "--cfg", "job"],
            "python -m finetune model=llama-3-70b --cfg job": [
                py,
                "-m",
                "finetune",
                "model=llama-3-70b",
                "--cfg",
                "job",
            ],
            "python -m finetune.plan model=llama-3-70b": [py, "-m", "finetune.plan", "model=llama-3-70b"],
        }
        wall(cases["python -m finetune --cfg job"], 2, cwd)  # warm the file cache
        results = {name: statistics.median(wall(cmd, runs, cwd)) for name, cmd in cases.items()}
    base = results["python -c pass (baseline)"]
    print(f"| command | median wall (s), {runs} runs | x baseline |")
    print("| --- | --- | --- |")
    for name, seconds in results.items():
        print(f"| `{name}` | {seconds:.3f} | {seconds / base:.1f} |")


if __name__ == "__main__":
    main()
