"""Checkpoints on disk: `<run>/checkpoints/checkpoint-<step>/`, written aside and renamed into place.

The Trainer writes a checkpoint into `checkpoints/.staging/`; `publish` adds `finetune_state.json`
(finetune's own state and the size of every file), flushes it all to disk and renames the folder to
`checkpoint-<step>`. A checkpoint counts as complete only when that file is there and every file it
lists has its recorded size, so a folder cut short (a kill mid-save, a full disk, a partial copy)
is skipped on resume instead of loaded: transformers' `get_last_checkpoint` would take it.
Several processes share one staging folder: rank 0 empties it and publishes, every rank writes its
own files in between (StepDownTrainer._save_checkpoint), so the manifest lists every rank's files.
No torch here: resuming looks for checkpoints before anything heavy loads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

STATE = "finetune_state.json"
STAGING = ".staging"
_NAME = re.compile(r"checkpoint-(\d+)$")


def staging(folder: Path) -> Path:
    """An empty staging folder under `folder` (what a killed save left there is dropped)."""
    stage = folder / STAGING
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    return stage


def publish(written: Path, folder: Path, state: dict, keep: int | None) -> Path:
    """Seal the checkpoint `written` (inside the staging folder), rename it into `folder`, and keep
    the newest `keep` complete checkpoints. Returns its final path."""
    files = {str(p.relative_to(written)): p.stat().st_size for p in sorted(written.rglob("*")) if p.is_file()}
    (written / STATE).write_text(json.dumps({**state, "files": files}, indent=2))
    _sync(written)
    final = folder / written.name
    if final.exists():  # the same step saved again (a resumed run stopped where it started)
        _remove(final)
    written.rename(final)
    _sync_dir(folder)
    shutil.rmtree(written.parent, ignore_errors=True)
    if keep:
        for old in complete_checkpoints(folder)[:-keep]:
            _remove(old)
    return final


def step_of(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when it is complete."""
    state_file = checkpoint / STATE
    if not state_file.is_file():
        return f"no {STATE} (it was not finished)"
    try:
        files = json.loads(state_file.read_text())["files"]
    except (ValueError, KeyError):
        return f"{STATE} is unreadable"
    for name, size in files.items():
        file = checkpoint / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is cut short ({file.stat().st_size} of {size} bytes)"
    return None


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest step first."""
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and step_of(p) is not None]
    return sorted((p for p in found if problem(p) is None), key=step_of)


def latest(folder: Path) -> tuple[Path | None, list[str]]:
    """(newest complete checkpoint or None, one note per incomplete one skipped on the way)."""
    notes = []
    if (folder / STAGING).is_dir() and any((folder / STAGING).iterdir()):
        notes.append(f"skipping {folder / STAGING}: a checkpoint that was being written when the run stopped")
    found = (
        [p for p in folder.glob("checkpoint-*") if p.is_dir() and step_of(p) is not None]
        if folder.is_dir()
        else []
    )
    for candidate in sorted(found, key=step_of, reverse=True):
        why = problem(candidate)
        if why is None:
            return candidate, notes
        notes.append(f"skipping {candidate}: incomplete checkpoint, {why}")
    return None, notes


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE).read_text())


def _remove(path: Path) -> None:
    """Rename first, then delete: a kill half-way through never leaves a damaged checkpoint-N."""
    doomed = path.with_name(f".deleting-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _sync(folder: Path) -> None:
    """Flush every file to disk before the rename publishes it (a power cut must not publish zeros)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _sync_dir(folder)


def _sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms: nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
