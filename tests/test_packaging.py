"""Start-up stays light (no torch for `import finetune` or `--cfg job`), and a wheel install finds configs/."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _torch_loaded_after(code: str, cwd: Path) -> str:
    probe = f"import sys\ntry:\n    {code}\nfinally:\n    print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=cwd).stdout


def test_import_and_cfg_job_never_import_torch(tmp_path):
    assert (
        _torch_loaded_after("import finetune, finetune.schema, finetune.errors", tmp_path).strip()
        == "NO-TORCH"
    )
    cli = "sys.argv = ['finetune', '--cfg', 'job']\n    import runpy\n    runpy.run_module('finetune', run_name='__main__')"
    out = _torch_loaded_after(cli, tmp_path)
    assert "model:" in out and out.strip().endswith("NO-TORCH")


def test_help_lists_groups(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for group in ("model:", "quant:", "lora:", "batch:", "optim:", "hw:", "data:"):
        assert group in result.stdout


def test_wheel_install_finds_configs(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(wheels.glob("finetune-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "finetune/configs/finetune.yaml" in names and "finetune/configs/model/llama-3-8b.yaml" in names
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    # The wheel's copy must win over any editable install: put it first and run far from the checkout.
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import finetune, sys; print(finetune.__file__); print(finetune.config_dir());"
        "sys.argv=['finetune','model=llama-3-70b','--cfg','job']; from finetune.__main__ import main; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(str(target)) and lines[1] == str(target / "finetune" / "configs")
    assert "name: llama-3-70b" in result.stdout
