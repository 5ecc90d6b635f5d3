"""The embedded default job, exactly as a new user runs it (slow: about two minutes on CPU)."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


@pytest.mark.slow
def test_default_job_teaches_the_model_the_task(tmp_path):
    result = run_cli(f"output_dir={tmp_path}", "run_name=default", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())
    assert summary["accuracy_before"] <= 0.10
    assert summary["accuracy_after"] >= 0.90
