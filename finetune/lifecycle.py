"""A run's life around the training loop: stopping on a signal, when to save and evaluate, the loss
plot, and picking a stopped run back up (`resume=<run folder>` or `resume=latest`).

Ctrl-C (SIGINT) or SIGTERM during training asks the loop to stop after the optimizer step in
progress; that step is saved as a checkpoint and the run exits with 128 + the signal number and one
line saying how to resume. A second signal, or one outside the training loop, stops at once.

Several processes (#13): a signal may reach the ranks in different steps, or one rank only (a
SIGTERM to one process), so the ranks agree at every step end whether any of them got one: all
save the same step and stop together, each exits with 128 + the signal, rank 0 alone says so.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import UserError, checkpoints, launch
from finetune.schema import Config

# Keys that change how long the run goes on or what it records, never what it computes: the data
# order, the model, the optimizer and the schedule's shape stay those of the checkpoint.
RESUMABLE = (
    "train.max_steps",
    "train.epochs",
    "train.save_steps",
    "train.save_total_limit",
    "train.logging_steps",
    "train.eval_steps",
    "train.report_to",
)
AGENT_ECHO_SECONDS = 2.0
"""Under torchrun's agent a Ctrl-C reaches each worker from the terminal and again from the agent,
milliseconds apart: a signal this soon after the first is that copy, not a second Ctrl-C."""
SAVE_EVERY_SECONDS = 600  # train.save_steps=auto: a checkpoint every 10 minutes of training
PLOT_EVERY_SECONDS = 30  # loss.png is redrawn at most this often, and at every checkpoint


class Interrupted(BaseException):
    """A signal that stops the run at once (BaseException: no `except Exception` may swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(signum: int) -> int:
    return 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def resume_command(run_dir: Path) -> str:
    return f"{launch.command()} resume={run_dir}"  # torchrun for a run torchrun started (#13)


class Signals:
    """SIGINT and SIGTERM handlers for the length of a run (`with Signals() as signals:`).

    While `graceful` (the training loop runs) the first signal only sets `received`, which
    StopOnSignal turns into `signum` (once every rank agreed) and save-and-stop after the current
    optimizer step; otherwise, and on a second signal, the handler raises Interrupted where the
    program is.
    """

    def __init__(self):
        self.signum: int | None = None  # the signal the training loop stops for, the same on every rank
        self.received: int | None = None  # the first signal this process got while training
        self.graceful = False
        self.run_dir: Path | None = None  # set once the run has a folder, for the way out
        self.fresh = True  # the folder was made by this run (not a resumed one)
        self._first: float | None = None  # when the first signal came
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self._first is not None and now - self._first < AGENT_ECHO_SECONDS and launch.under_agent():
            return  # the agent passing on the signal that reached this process already
        self._first = self._first if self._first is not None else now
        if self.graceful and self.received is None:
            self.received = signum
            if launch.is_main():
                self.say_stopping(signum)
            return
        raise Interrupted(signum)

    @staticmethod
    def say_stopping(signum: int, where: str = "") -> None:
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(
            f"\nfinetune: {name}{where}: stopping after this optimizer step and saving a checkpoint "
            "(Ctrl-C again to stop at once).",
            file=sys.stderr,
            flush=True,
        )

    def agree(self) -> int | None:
        """The signal the loop stops for: the one any rank got (all ranks call this at the same
        point: a step end, an evaluation). One process: the one it got."""
        if self.signum is None:
            agreed = launch.agree_max(self.received or 0)  # SIGTERM (15) wins over SIGINT (2)
            if agreed:
                if self.received is None and launch.is_main():
                    self.say_stopping(agreed, " in another process")
                self.signum = agreed
        return self.signum

    def stopped(self, state: Any) -> None:
        """After the loop stopped for a signal: the resume line (rank 0), then exit 128 + the signal."""
        if launch.is_main():
            print(
                f"finetune: stopped at step {state.global_step} of {state.max_steps}; checkpoint saved. "
                f"Resume with: {resume_command(self.run_dir)}",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(exit_code(self.signum))

    def interrupted(self, err: Interrupted) -> None:
        """Stopped at once: say what is kept. A new run's folder without a checkpoint is removed,
        so it neither blocks the run name nor looks like a run. Rank 0 alone speaks and removes."""
        import shutil

        if not launch.is_main():
            raise SystemExit(exit_code(err.signum)) from None
        where = self.run_dir
        last = checkpoints.latest(where / "checkpoints")[0] if where else None
        if where is None:
            message = "stopped while loading; nothing was written."
        elif last is not None:
            message = (
                f"stopped at once; the last checkpoint is step {checkpoints.step_of(last)}. "
                f"Resume with: {resume_command(where)}"
            )
        elif self.fresh:
            shutil.rmtree(where, ignore_errors=True)
            message = f"stopped before the first checkpoint; removed {where}."
        else:
            message = f"stopped before the first checkpoint. Resume with: {resume_command(where)}"
        print(f"\nfinetune: {message}", file=sys.stderr, flush=True)
        raise SystemExit(exit_code(err.signum)) from None


def callbacks(signals: Signals, cfg: Config, run_dir: Path, has_eval: bool) -> list:
    """The TrainerCallbacks of a run, in the order they must see each step."""
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        """First signal: save the step that just finished and leave the loop. Several processes:
        every rank asks the others at each step end, so all save the same step and stop together
        (ranks that disagree about saving or stopping would wait for each other for ever)."""

        def on_train_begin(self, args, state, control, **kwargs):
            signals.graceful = True

        def on_step_end(self, args, state, control, **kwargs):
            if signals.agree() is not None:
                control.should_save = control.should_training_stop = True

        def on_evaluate(self, args, state, control, **kwargs):  # a signal during an evaluation
            self.on_step_end(args, state, control)

        def on_train_end(self, args, state, control, **kwargs):
            signals.graceful = False
            if signals.signum is None:
                late = launch.agree_max(signals.received or 0)
                if late:  # came after the last step's end: no step is left to save, stop at once
                    raise Interrupted(late)

    class Schedule(TrainerCallback):
        """Saves by wall time (train.save_steps=auto); evaluates every train.eval_steps, or at each
        checkpoint (auto), and at the end."""

        def __init__(self):
            t = cfg.train
            self.save_every = SAVE_EVERY_SECONDS if t.save_steps == "auto" else None
            self.eval_every = None if t.eval_steps == "auto" else t.eval_steps
            self.last_save = time.monotonic()

        def on_train_begin(self, args, state, control, **kwargs):
            self.last_save = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if self.save_every:
                due = time.monotonic() - self.last_save >= self.save_every
                if launch.agree_max(int(due)):  # each rank has its own clock: all save when one is due
                    control.should_save = True
            if has_eval:
                due = (
                    control.should_save
                    if self.eval_every is None
                    else state.global_step % self.eval_every == 0
                )
                if due or state.global_step >= state.max_steps:
                    control.should_evaluate = True

        def on_save(self, args, state, control, **kwargs):
            self.last_save = time.monotonic()

    class LossPlot(TrainerCallback):
        """Redraws <run>/loss.png from the whole log history: at most every PLOT_EVERY_SECONDS,
        at each checkpoint and at the end."""

        def __init__(self):
            self.drawn = None

        def on_log(self, args, state, control, **kwargs):
            if self.drawn is None or time.monotonic() - self.drawn >= PLOT_EVERY_SECONDS:
                self.draw(state)

        def on_save(self, args, state, control, **kwargs):
            self.draw(state)

        def on_train_end(self, args, state, control, **kwargs):
            self.draw(state)

        def draw(self, state):
            if state.is_world_process_zero:
                plot_losses(state.log_history, run_dir / "loss.png")
            self.drawn = time.monotonic()

    return [StopOnSignal(), Schedule(), LossPlot()]


def plot_losses(history: list[dict], target: Path) -> None:
    """Train and eval loss, learning rate (and GPU memory when logged) against the step; written
    aside and renamed, so a viewer never reads half a file."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list, list]:
        points = [(h["step"], h[key]) for h in history if key in h and "step" in h]
        return [s for s, _ in points], [v for _, v in points]

    gpu = series("gpu_allocated_gib")
    panels = 3 if gpu[0] else 2
    fig, axes = plt.subplots(panels, 1, figsize=(7, 2.4 * panels), sharex=True)
    axes[0].plot(*series("loss"), label="train loss")
    eval_steps, eval_losses = series("eval_loss")
    if eval_steps:
        axes[0].plot(eval_steps, eval_losses, "o-", label="eval loss")
    axes[0].set_ylabel("loss")
    axes[0].legend(frameon=False)
    axes[1].plot(*series("learning_rate"), color="tab:green")
    axes[1].set_ylabel("learning rate")
    if gpu[0]:
        axes[2].plot(*gpu, label="allocated")
        axes[2].plot(*series("gpu_reserved_gib"), label="reserved")
        axes[2].set_ylabel("GPU memory (GiB)")
        axes[2].legend(frameon=False)
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    partial = target.with_name(f".{target.name}.partial.png")
    fig.savefig(partial, dpi=90)
    plt.close(fig)
    partial.replace(target)


# ---- resume ----


@dataclass
class Resume:
    run_dir: Path
    cfg: Config  # the run's saved config with the allowed overrides applied
    checkpoint: Path | None  # None: no complete checkpoint yet, the run starts again from step 0
    finished: str | None  # a line saying the run is done and nothing asks for more, else None


def find_run(spec: str, output_dir: str) -> Path:
    """The folder `resume=` names: a run folder, or `latest` (the most recently active under output_dir)."""
    if spec == "latest":
        base = Path(output_dir).expanduser()
        runs = [p.parent for p in base.glob("*/config.yaml")] if base.is_dir() else []
        if not runs:
            raise UserError(f"resume=latest: no run folders in {base}/. Name the run: resume=<run folder>.")
        return max(runs, key=_last_active)
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"resume={spec}: no such folder. Give a run folder, e.g. resume=runs/<run name> (or resume=latest)."
        )
    if not (folder / "config.yaml").is_file():
        raise UserError(f"resume={spec}: not a run folder (no config.yaml in it).")
    return folder


def _last_active(run_dir: Path) -> float:
    paths = [run_dir / "config.yaml", run_dir / "checkpoints", run_dir / "summary.json"]
    return max(p.stat().st_mtime for p in paths if p.exists())


def resume_point(cfg: Config, overrides: list[str]) -> Resume:
    """The run to continue, its saved config with the command line's allowed `overrides` applied
    (any other override is refused), and the checkpoint to start from."""
    import dataclasses
    import json

    from finetune import schema

    run_dir = find_run(cfg.resume, cfg.output_dir)
    saved = schema.load(run_dir / "config.yaml")
    changed = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in ("resume", "output_dir"):  # where to find the run, not how it trains
            continue
        if key not in RESUMABLE:
            try:
                was = schema.get(saved, key)
            except AttributeError:
                was = None
            shown = (
                f" (the run used {key}={was})"
                if was is not None and not dataclasses.is_dataclass(was)
                else ""
            )
            raise UserError(
                f"resume: {key} cannot change when resuming a run{shown}: only {', '.join(RESUMABLE)} can. "
                "Start a new run to change it."
            )
        value = schema.get(cfg, key)
        if value != schema.get(saved, key):
            changed.append(key)
        schema.put(saved, key, value)
    saved.resume = str(run_dir)
    checkpoint, notes = checkpoints.latest(run_dir / "checkpoints")
    for note in notes:
        print(f"finetune: {note}", flush=True)
    finished = None
    summary = run_dir / "summary.json"
    if summary.is_file():
        steps = json.loads(summary.read_text()).get("steps", 0)
        longer = "train.epochs" in changed or (
            "train.max_steps" in changed and (saved.train.max_steps == -1 or saved.train.max_steps > steps)
        )
        if not longer:
            finished = (
                f"{run_dir} is finished ({steps} steps; the weights are in it). To train on, resume with a "
                f"larger train.max_steps (e.g. train.max_steps={2 * steps})."
            )
    return Resume(run_dir, saved, checkpoint, finished)


def command_line() -> list[str]:
    """The overrides given on the command line (empty outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
