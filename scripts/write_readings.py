"""Write finetune/memory/readings.json: the architecture readings of the catalog models.

    python scripts/write_readings.py            # rewrite the file (after a transformers upgrade, or a new model YAML)
    python scripts/write_readings.py --check    # exit 1 if the shipped file differs from fresh readings

Each configs/model/*.yaml holds an ``arch:`` block (config.json numbers); its reading (the model built
on the meta device by transformers, its modules, PEFT's all-linear choice) is stored under the hash of
that block, so ``finetune.plan model=<catalog model>`` never imports torch. tests/test_architectures.py
checks the shipped file equals fresh readings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from finetune.memory.reading import SHIPPED, key, read  # noqa: E402


def catalog_archs() -> dict[str, dict]:
    """Model name -> arch block of every catalog model YAML."""
    out = {}
    for path in sorted((ROOT / "configs" / "model").glob("*.yaml")):
        arch = (yaml.safe_load(path.read_text()) or {}).get("arch")
        if arch:
            out[path.stem] = arch
    return out


def fresh() -> dict[str, dict]:
    readings = {}
    for name, arch in catalog_archs().items():
        r = read(arch)
        readings[key(arch)] = {**r, "catalog": name}
    return readings


def without_versions(readings: dict) -> dict:
    """Readings compare equal across transformers patch releases that build the same model."""
    return {k: {f: v for f, v in r.items() if f != "transformers"} for k, r in readings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    new = fresh()
    if args.check:
        old = json.loads(SHIPPED.read_text()) if SHIPPED.is_file() else {}
        same = without_versions(old) == without_versions(new)
        print(
            "readings.json is up to date" if same else "readings.json differs: run scripts/write_readings.py"
        )
        sys.exit(0 if same else 1)
    # one reading per line: diffs stay readable
    lines = [f"  {json.dumps(k)}: {json.dumps(r, separators=(',', ':'))}" for k, r in sorted(new.items())]
    SHIPPED.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(
        f"wrote {len(new)} readings to {SHIPPED.relative_to(ROOT)} ({SHIPPED.stat().st_size / 1024:.0f} KiB)"
    )


if __name__ == "__main__":
    main()
