"""Start-up stays light (no torch for `import finetune` or `--cfg job`), and a wheel install finds configs/."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

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


# Imported only where installed by choice, each behind an ImportError with a fallback.
OPTIONAL_IMPORTS = {"pynvml"}  # scripts/gpu_truth.py: NVML where the GPU image has it, else nvidia-smi


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level third-party module -> the files importing it, for finetune/, scripts/ and tests/."""
    import ast

    local = {"finetune", "conftest"} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    found: dict[str, set[str]] = {}
    for folder in ("finetune", "scripts", "tests"):
        for file in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in local:
                        found.setdefault(top, set()).add(str(file.relative_to(ROOT)))
    return found


def _declared() -> set[str]:
    import re

    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [
        d for extra in project["optional-dependencies"].values() for d in extra
    ]
    return {re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower().replace("_", "-") for spec in specs}


def test_every_import_is_a_declared_dependency():
    import importlib.metadata

    owners = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = {}
    for module, files in _third_party_imports().items():
        if module in OPTIONAL_IMPORTS:
            continue
        dists = {d.lower().replace("_", "-") for d in owners.get(module, [])}
        if not dists & declared:
            missing[module] = (sorted(dists) or ["not installed"], sorted(files)[:3])
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_wheel_ships_every_config():
    """Every YAML under configs/ is listed in pyproject's packages (setuptools ships listed folders only)."""
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    groups = {p.removeprefix("finetune.configs.") for p in packages if p.startswith("finetune.configs.")}
    on_disk = {d.name for d in (ROOT / "configs").iterdir() if d.is_dir() and any(d.glob("*.yaml"))}
    assert groups == on_disk
    code = {".".join(f.parent.relative_to(ROOT).parts) for f in (ROOT / "finetune").rglob("__init__.py")}
    assert code == {p for p in packages if not p.startswith("finetune.configs")}
