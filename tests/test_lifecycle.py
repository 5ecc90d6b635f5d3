"""A run's life: checkpoints, kill -9, Ctrl-C / SIGTERM, resume, eval loss and the loss plot.

Every run trains the tiny local model for STEPS steps with a checkpoint every 2. The interrupted runs
are real `python -m finetune` processes; a launcher slows each optimizer step down (a sleep in the
Trainer's step-end callback, which changes no number) so that a signal reliably lands mid-training.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import compose, run_cli, tiny_overrides
from safetensors.torch import load_file

from finetune import UserError, checkpoints, pipeline, schema

STEPS = 6

# `python -m finetune` with a sleep after every optimizer step (SLOW_STEP seconds) and before the
# held-out scoring that precedes training (SLOW_SCORE seconds).
LAUNCHER = """
import os, sys, time
from transformers import trainer_callback
step, score = float(os.environ.get("SLOW_STEP", "0")), float(os.environ.get("SLOW_SCORE", "0"))
flow = trainer_callback.DefaultFlowCallback.on_step_end
def slow_step(self, *args, **kwargs):
    time.sleep(step)
    return flow(self, *args, **kwargs)
trainer_callback.DefaultFlowCallback.on_step_end = slow_step
from finetune import evaluate
exact = evaluate.exact_match
def slow_score(*args, **kwargs):
    time.sleep(score)
    return exact(*args, **kwargs)
evaluate.exact_match = slow_score
from finetune.__main__ import main
main()
"""


def _overrides(tiny_model: Path, out: Path, *extra: str) -> list[str]:
    """The shared run: STEPS steps, a checkpoint every 2, every step logged; later keys win."""
    merged = {
        o.split("=")[0]: o
        for o in [
            *tiny_overrides(tiny_model, out),
            f"train.max_steps={STEPS}",
            "train.save_steps=2",
            "train.logging_steps=1",
            "data.max_length=64",
            *extra,
        ]
    }
    return list(merged.values())


class Run:
    """A `python -m finetune` process started through LAUNCHER, its output in files."""

    def __init__(self, args: list[str], folder: Path, slow_step: float = 0.5, slow_score: float = 0.0):
        folder.mkdir(parents=True, exist_ok=True)
        self.out, self.err = folder / "stdout.txt", folder / "stderr.txt"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env.update(SLOW_STEP=str(slow_step), SLOW_SCORE=str(slow_score))
        env.pop("HYDRA_FULL_ERROR", None)
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", LAUNCHER, *args], stdout=out, stderr=err, env=env
            )

    def wait_for(self, path: Path, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the run ended (rc {self.proc.returncode}) first:\n{self.stderr[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{path} never appeared")
            time.sleep(0.02)

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:  # never leave a training process behind
                self.proc.kill()
                self.proc.wait()

    @property
    def stderr(self) -> str:
        return self.err.read_text()


def _checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"checkpoint-{step}" / checkpoints.STATE  # written last


def _losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    history = json.loads((run_dir / "summary.json").read_text())["log_history"]
    return {h["step"]: h[key] for h in history if key in h}


def _assert_same_adapter(a: Path, b: Path) -> None:
    left, right = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (a, b))
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Path:
    """An uninterrupted run with the shared settings (the only run in its output_dir)."""
    out = tmp_path_factory.mktemp("reference")
    result = pipeline.run(compose(_overrides(tiny_model, out, "run_name=ref")))
    return result.run_dir


def test_checkpoints_are_complete_rotated_and_the_run_records_eval_loss_and_a_plot(reference):
    kept = sorted(p.name for p in (reference / "checkpoints").glob("checkpoint-*"))
    assert kept == [f"checkpoint-{STEPS - 2}", f"checkpoint-{STEPS}"]  # train.save_total_limit=2
    for name in kept:
        folder = reference / "checkpoints" / name
        assert checkpoints.problem(folder) is None
        assert {
            "adapter_model.safetensors",
            "optimizer.pt",
            "scheduler.pt",
            "rng_state.pth",
            "trainer_state.json",
        } <= {p.name for p in folder.iterdir()}
        assert checkpoints.read_state(folder)["ladder"] == {"oom_split": 1, "oom_events": []}
    assert not (reference / "checkpoints" / checkpoints.STAGING).exists()
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert isinstance(summary["eval_loss"], float) and summary["eval_loss"] > 0
    # eval_steps=auto: an evaluation at every checkpoint (and so at the end)
    assert sorted(_losses(reference, "eval_loss")) == list(range(2, STEPS + 1, 2))
    assert (
        summary["accuracy_before"] is not None and summary["accuracy_after"] is not None
    )  # exact match stays
    png = (reference / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_kill_9_after_a_checkpoint_resumes_to_the_same_adapter(tiny_model, tmp_path, reference):
    run_dir = tmp_path / "killed"
    run = Run(_overrides(tiny_model, tmp_path, "run_name=killed"), tmp_path / "logs")
    try:
        run.wait_for(_checkpoint(run_dir, 2))
        run.proc.kill()  # SIGKILL: no handler runs
    finally:
        run.finish()
    assert not (run_dir / "summary.json").exists(), "the run finished before it was killed"
    done = checkpoints.latest(run_dir / "checkpoints")[0]
    assert done is not None and checkpoints.step_of(done) < STEPS

    resumed = run_cli(f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run_dir} from {done.name}" in resumed.stdout
    _assert_same_adapter(run_dir, reference)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS
    # The whole run's loss curve, before and after the kill, is the uninterrupted run's.
    got, want = _losses(run_dir), _losses(reference)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    assert got == pytest.approx(want, rel=1e-5)
    assert _losses(run_dir, "eval_loss") == pytest.approx(_losses(reference, "eval_loss"), rel=1e-5)
    assert _losses(run_dir, "learning_rate") == pytest.approx(_losses(reference, "learning_rate"), rel=1e-6)


def test_ctrl_c_saves_says_how_to_resume_and_the_run_completes(tiny_model, tmp_path, reference):
    run_dir = tmp_path / "stopped"
    run = Run(_overrides(tiny_model, tmp_path, "run_name=stopped"), tmp_path / "logs")
    try:
        run.wait_for(_checkpoint(run_dir, 2))
        run.proc.send_signal(signal.SIGINT)
    finally:
        rc = run.finish()
    err = run.stderr
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.startswith("finetune: stopped at step")]
    assert len(last) == 1, err[-3000:]
    step = int(last[0].split()[4])
    assert 2 <= step < STEPS
    assert last[0].endswith(f"checkpoint saved. Resume with: python -m finetune resume={run_dir}")
    assert checkpoints.problem(run_dir / "checkpoints" / f"checkpoint-{step}") is None

    # A half-written newer checkpoint (and a staging folder) must be skipped, and say so.
    shutil.copytree(run_dir / "checkpoints" / f"checkpoint-{step}", run_dir / "checkpoints" / "checkpoint-99")
    (run_dir / "checkpoints" / "checkpoint-99" / checkpoints.STATE).unlink()
    (run_dir / "checkpoints" / checkpoints.STAGING / f"checkpoint-{step + 1}").mkdir(parents=True)
    resumed = run_cli(f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping" in resumed.stdout and "checkpoint-99: incomplete checkpoint" in resumed.stdout
    assert f"resuming {run_dir} from checkpoint-{step}" in resumed.stdout
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    _assert_same_adapter(run_dir, reference)

    again = run_cli(f"resume={run_dir}")  # finished, and nothing asks for more
    assert again.returncode == 0 and "is finished" in again.stdout, again.stderr[-2000:]
    longer = run_cli(f"resume={run_dir}", f"train.max_steps={STEPS + 2}")  # a finished run trains on
    assert longer.returncode == 0, longer.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS + 2 and max(_losses(run_dir)) == STEPS + 2


def test_a_run_stopped_after_its_last_step_only_finishes_on_resume(tmp_path, reference):
    """Stopped while scoring or saving: the last checkpoint is the last step, nothing is left to train."""
    run_dir = tmp_path / "unsaved"
    shutil.copytree(reference, run_dir)
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "adapter")
    result = run_cli(f"resume={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    assert sorted(_losses(run_dir)) == list(range(1, STEPS + 1))  # not one step past the end
    _assert_same_adapter(run_dir, reference)


def test_sigterm_saves_and_exits_143(tiny_model, tmp_path):
    run_dir = tmp_path / "term"
    run = Run(_overrides(tiny_model, tmp_path, "run_name=term"), tmp_path / "logs")
    try:
        run.wait_for(_checkpoint(run_dir, 2))
        run.proc.send_signal(signal.SIGTERM)
    finally:
        rc = run.finish()
    assert rc == 143, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert "checkpoint saved. Resume with: python -m finetune resume=" in run.stderr


def test_second_ctrl_c_stops_at_once(tiny_model, tmp_path):
    run_dir = tmp_path / "twice"
    run = Run(_overrides(tiny_model, tmp_path, "run_name=twice"), tmp_path / "logs", slow_step=3.0)
    try:
        run.wait_for(_checkpoint(run_dir, 2))
        run.proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        run.proc.send_signal(signal.SIGINT)
    finally:
        rc = run.finish()
    assert rc == 130 and "Traceback" not in run.stderr, run.stderr[-3000:]
    # Mid-step (each step sleeps 3 s): the step in progress is dropped, not finished and saved.
    assert "stopped at once; the last checkpoint is step 2" in run.stderr
    assert [p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]


def test_ctrl_c_while_loading_leaves_no_run_folder(tiny_model, tmp_path):
    run_dir = tmp_path / "early"
    run = Run(_overrides(tiny_model, tmp_path, "run_name=early"), tmp_path / "logs", slow_score=5.0)
    try:
        run.wait_for(run_dir / "config.yaml")  # the folder exists; scoring before training is under way
        run.proc.send_signal(signal.SIGINT)
    finally:
        rc = run.finish()
    assert rc == 130 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert not run_dir.exists(), "a folder without a checkpoint would block the run name"


def test_resume_refuses_keys_that_would_change_the_run(reference):
    for override, key in (("lora.r=8", "lora.r"), ("optim=adafactor", "optim"), ("seed=1", "seed")):
        result = run_cli(f"resume={reference}", override)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"finetune: error: resume: {key} cannot change"), lines
        assert "train.max_steps" in lines[0]


def test_resume_latest_finds_the_newest_run_and_a_finished_run_says_so(reference):
    result = run_cli("resume=latest", f"output_dir={reference.parent}")
    assert result.returncode == 0, result.stderr
    assert f"{reference} is finished ({STEPS} steps" in result.stdout
    missing = run_cli("resume=latest", f"output_dir={reference.parent / 'none'}")
    assert missing.returncode == 2 and "resume=latest: no run folders" in missing.stderr


def test_incomplete_checkpoints_are_never_picked(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        written = checkpoints.staging(folder) / f"checkpoint-{step}"
        written.mkdir()
        (written / "optimizer.pt").write_bytes(b"x" * 100)
        checkpoints.publish(written, folder, {"step": step}, keep=3)
    assert [p.name for p in checkpoints.complete_checkpoints(folder)] == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    (folder / "checkpoint-6" / "optimizer.pt").write_bytes(b"x" * 10)  # cut short
    (folder / "checkpoint-4" / checkpoints.STATE).unlink()  # never finished
    found, notes = checkpoints.latest(folder)
    assert found == folder / "checkpoint-2"
    assert "cut short" in notes[0] and "not finished" in notes[1]
    written = checkpoints.staging(folder) / "checkpoint-8"
    written.mkdir()
    checkpoints.publish(written, folder, {"step": 8}, keep=1)
    # Rotation deletes only complete checkpoints beyond the limit; broken ones stay for a person to look at.
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]


def test_save_eval_and_tracker_settings_are_validated(tmp_path):
    with pytest.raises(UserError) as err:
        compose(["train.report_to=tensorbaord", "train.save_steps=-1", "train.eval_steps=0"])
    text = str(err.value)
    assert "train.report_to='tensorbaord'" in text and "Did you mean 'tensorboard'" in text
    assert "train.save_steps=-1" in text and "train.eval_steps=0" in text
    schema.validate(compose(["train.report_to=[tensorboard,wandb]", "train.save_steps=0"]))
    import importlib.util

    if not any(importlib.util.find_spec(m) for m in schema.TRACKERS["tensorboard"]):
        with pytest.raises(UserError, match="needs the tensorboard package: pip install tensorboard"):
            pipeline._check_runtime(compose(["train.report_to=tensorboard", "hw=cpu"]))
