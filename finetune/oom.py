"""Keep training through an out-of-memory error by stepping down a ladder of memory savers.

When a forward/backward pass runs out of device memory, `StepDownTrainer` frees what it can and
retries the same optimizer step with the next rung of this ladder:

  1. split   - run each micro-batch as 2 (then 4, 8 ...) chunks down to 1 sequence, accumulating
               their gradients: the micro-batch halves, the accumulation doubles, the effective
               batch and the loss stay the same.
  2. gradient_checkpointing - recompute activations in backward (if it is off).
  3. paged_adamw_8bit - swap the optimizer for bitsandbytes' paged 8-bit AdamW, carrying over its
               moments, learning rates and the scheduler; its states can be evicted to CPU RAM.
  4. re-plan - stop with a `UserError` that says what was tried and what to change.

A rung that does not apply (checkpointing already on, optimizer already paged) is skipped. The
rungs stay in force for the rest of the run. No optimizer step and no sample is lost: the step
that hit the error is rebuilt from its first micro-batch. Steps without an error run the plain
`SFTTrainer.training_step`.

Every rung taken is printed and recorded in `trainer.oom_events` (for summary.json), and saved in
each checkpoint: a resumed run starts with the rungs already in force, so it does not run out of
memory again to find them. Checkpoints are written aside and renamed (finetune/checkpoints.py).
Single-process training only: under torch.distributed every rank would have to step down together.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from accelerate.utils.memory import clear_device_cache
from trl import SFTTrainer

from finetune import UserError, checkpoints, experts, launch

LADDER = ("split", "gradient_checkpointing", "paged_adamw_8bit")  # then re-plan (UserError)


class StepDownTrainer(SFTTrainer):
    """`trl.SFTTrainer` that survives `torch.OutOfMemoryError` in training (see the module docstring).

    Attributes:
        oom_split: chunks each micro-batch is split into (1: not split).
        oom_events: one dict per rung taken: step (1-based optimizer step that ran out of memory),
            rung (one of LADDER), micro_batch and grad_accum in force afterwards, error (its first line).
    `oom_overrides()` gives the command-line overrides that start a next run where this one ended.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.oom_split = 1
        self.oom_events: list[dict] = []
        self._loss_weight = 1.0
        # The micro-batches of the optimizer step in progress (references the training loop already
        # holds) and TRL's token/metric counters as they were when the step began: an error rebuilds
        # the step from there.
        self._step_inputs: list[tuple[dict, torch.Tensor | int | None]] = []
        self._step_metrics: tuple | None = None
        # Facts the caller wants carried across a resume (e.g. the score before training); saved
        # in every checkpoint and read back by train(resume_from_checkpoint=...).
        self.run_facts: dict = {}
        self.wall_before = 0.0  # training seconds spent before this process resumed the run
        self._wall_start = time.perf_counter()
        self._staging: Path | None = None
        self._resume_paged = False
        self.checkpoint_seconds = 0.0  # spent writing checkpoints in this process (summary.json)

    # ---- checkpoints and resume ----

    def train(self, resume_from_checkpoint=None, **kwargs):
        # Several processes (#13): all resume from the checkpoint rank 0 chose, each loading its own
        # rng_state_<rank>.pth from it (the Trainer does that by process index).
        resume_from_checkpoint = launch.from_main(resume_from_checkpoint)
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if plugin is not None:  # dist=fsdp: reduce gradients in fp32 (launch.fsdp_mixed_precision)
            launch.use_fsdp_mixed_precision(plugin, self.accelerator.mixed_precision)
        if resume_from_checkpoint is not None:
            if (Path(resume_from_checkpoint) / experts.ADAPTER_FILE).is_file():  # quantized MoE (ours)
                experts.load_adapters(self.model, resume_from_checkpoint)
            saved = checkpoints.read_state(Path(resume_from_checkpoint))
            self._restore_ladder(saved["ladder"])
            self.run_facts = saved.get("run", {})
            self.wall_before = saved.get("wall_seconds", 0.0)
            self._total_train_tokens = saved.get("train_tokens", 0)  # TRL's count restarts at 0 otherwise
            if saved["step"] >= self._total_steps():
                # Trained to the end but not finished (stopped while scoring or saving). The Trainer
                # would run one step past the end: load the weights and the state instead.
                from transformers import TrainerState

                self._load_from_checkpoint(resume_from_checkpoint)
                self.state = TrainerState.load_from_json(
                    str(Path(resume_from_checkpoint) / "trainer_state.json")
                )
                return None
        self._wall_start = time.perf_counter()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _total_steps(self) -> int:
        """The optimizer steps this run trains for, computed the way the Trainer does."""
        if self.args.max_steps > 0:
            return self.args.max_steps
        per_epoch = max(
            math.ceil(len(self.get_train_dataloader()) / self.args.gradient_accumulation_steps), 1
        )
        return math.ceil(self.args.num_train_epochs * per_epoch)

    def evaluate(self, *args, **kwargs):
        # Creating the eval dataloader draws from torch's RNG: left alone, a run evaluated at other
        # steps (a Ctrl-C checkpoint evaluates too) would get other dropout masks from then on, and a
        # resumed run would not train like an uninterrupted one.
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return super().evaluate(*args, **kwargs)

    def wall_seconds(self) -> float:
        """Training time of the whole run so far, over every resume."""
        return self.wall_before + time.perf_counter() - self._wall_start

    def _init_training_state(self, max_steps, *args, **kwargs):
        out = super()._init_training_state(max_steps, *args, **kwargs)
        # A resumed state carries the old run's logging/eval/save intervals; the ones given now win.
        self.state.compute_steps(self.args, max_steps)
        return out

    def _save_checkpoint(self, model, trial):
        start = time.perf_counter()
        folder = Path(self.args.output_dir)
        many = self.args.world_size > 1
        # Several processes (#13) write one checkpoint, each its own files in it (rng_state_<rank>.pth,
        # FSDP / DeepSpeed shards): rank 0 empties the staging folder before anyone writes, and seals
        # and renames it once everyone has written; nobody goes on before it is in place.
        if many:
            if self.args.should_save:
                checkpoints.staging(folder)
            self.accelerator.wait_for_everyone()
            self._staging = folder / checkpoints.STAGING
        else:
            self._staging = checkpoints.staging(folder)
        try:
            super()._save_checkpoint(model, trial)  # writes into the staging folder (_get_output_dir)
        finally:
            written, self._staging = self._staging / f"checkpoint-{self.state.global_step}", None
        if many:
            self.accelerator.wait_for_everyone()
        if self.args.should_save:
            experts.save_adapters(self.model, written)  # quantized MoE: sealed in the manifest too
            state = {
                "step": self.state.global_step,
                "ladder": self._ladder_state(),
                "train_tokens": int(getattr(self, "_total_train_tokens", 0)),
                "wall_seconds": round(self.wall_seconds(), 2),
                "run": self.run_facts,
            }
            checkpoints.publish(written, folder, state, self.args.save_total_limit)
        if many:
            self.accelerator.wait_for_everyone()
        self.checkpoint_seconds += time.perf_counter() - start

    def _get_output_dir(self, trial) -> str:
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _ladder_state(self) -> dict:
        return {"oom_split": self.oom_split, "oom_events": self.oom_events}

    def _restore_ladder(self, ladder: dict) -> None:
        """Put the rungs of the checkpoint's run back in force before the first step."""
        self.oom_split = ladder["oom_split"]
        self.oom_events = ladder["oom_events"]
        rungs = {e["rung"] for e in self.oom_events}
        if "gradient_checkpointing" in rungs:
            self.args.activation_checkpointing = True  # the Trainer turns it on as training starts
        # The optimizer state in the checkpoint is the paged optimizer's: create that one to load it.
        self._resume_paged = "paged_adamw_8bit" in rungs

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self._resume_paged:
            paged = paged_adamw_8bit(_inner(optimizer))
            if paged is not None:
                self.optimizer = optimizer = paged
        return optimizer

    # ---- the training step ----

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._step_inputs:
            self._step_metrics = self._metrics_mark()
        self._step_inputs.append((inputs, num_items_in_batch))
        try:
            if self.oom_split == 1:
                loss = super().training_step(model, inputs, num_items_in_batch)  # the untouched fast path
            else:
                loss = self._split_step(model, inputs, num_items_in_batch)
            error = None
        except torch.OutOfMemoryError as err:
            if self.args.world_size > 1:
                raise
            error = _first_line(err)
        except BaseException:
            self._step_inputs = []
            raise
        # Outside the `except`: the traceback's frames hold the failed pass's activations until then.
        if error is not None:
            loss = self._recover(model, error)
        if self.accelerator.sync_gradients:  # the last micro-batch of this optimizer step
            self._step_inputs = []
        return loss

    def _recover(self, model, error: str):
        """Step down until the current optimizer step fits; returns the current micro-batch's loss."""
        while True:
            # A backward that died half-way has added to some gradients and not to others, so the
            # step's gradients are dropped and rebuilt from its first micro-batch. The earlier
            # micro-batches' losses are already counted: only the current one's is returned.
            model.zero_grad(set_to_none=True)
            self._metrics_restore(self._step_metrics)
            clear_device_cache(garbage_collection=True)
            self._step_down(error, _rows(self._step_inputs[-1][0]))
            try:
                for inputs, num_items_in_batch in self._step_inputs:
                    loss = self._split_step(model, inputs, num_items_in_batch)
                return loss
            except torch.OutOfMemoryError as err:
                error = _first_line(err)
            except BaseException:
                self._step_inputs = []
                raise

    def _split_step(self, model, inputs, num_items_in_batch):
        """One micro-batch as `oom_split` chunks whose gradients and losses add up to the whole's.

        With `num_items_in_batch` (the token count of the whole optimizer step) each chunk's loss is
        already its token sum over that count, so the chunks add up exactly. Without it the loss is a
        per-micro-batch token mean, so each chunk's mean is weighted by its share of the tokens.
        """
        pieces = _split_rows(inputs, self.oom_split)
        if num_items_in_batch is None:
            counts = [self._label_count(p) for p in pieces]
            total = sum(counts)
            weights = [c / total if total else 1 / len(pieces) for c in counts]
        else:
            weights = [1.0] * len(pieces)
        loss = None
        try:
            for piece, weight in zip(pieces, weights):
                self._loss_weight = weight
                piece_loss = super().training_step(model, piece, num_items_in_batch)
                loss = piece_loss if loss is None else loss + piece_loss
        finally:
            self._loss_weight = 1.0
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if self._loss_weight == 1.0:
            return out
        if return_outputs:
            return out[0] * self._loss_weight, out[1]
        return out * self._loss_weight

    def _label_count(self, inputs) -> int:
        """Tokens that carry a loss, counted the way the Trainer counts `num_items_in_batch`."""
        if "shift_labels" in inputs:
            labels = inputs["shift_labels"]
        elif "labels" in inputs:
            labels = inputs["labels"][..., 1:] if self._loss_shifts_labels else inputs["labels"]
        else:  # no labels to count: weigh by rows
            return _rows(inputs)
        return int(labels.ne(-100).sum())

    # ---- TRL's running token count and metrics must not count a rebuilt micro-batch twice ----

    def _metrics_mark(self):
        if not hasattr(self, "_metrics"):
            return None
        return self._total_train_tokens, {k: len(v) for k, v in self._metrics["train"].items()}

    def _metrics_restore(self, mark) -> None:
        if mark is None:
            return
        self._total_train_tokens, lengths = mark
        train = self._metrics["train"]
        for key in list(train):
            if key in lengths:
                del train[key][lengths[key] :]
            else:
                del train[key]

    # ---- the ladder ----

    def _step_down(self, error: str, rows: int) -> None:
        """Apply the next rung that applies, or raise the re-plan UserError."""
        if math.ceil(rows / self.oom_split) > 1:
            self.oom_split *= 2
            self._record(
                "split",
                error,
                f"splitting each micro-batch in {self.oom_split}: micro-batch {self._micro_batch()} x "
                f"grad accumulation {self._grad_accum()}, same effective batch",
            )
            return
        model = self.model
        if getattr(model, "supports_gradient_checkpointing", False) and not model.is_activation_checkpointing:
            # transformers also hooks the input embeddings to require grad, which a frozen base under
            # LoRA needs for gradients to reach the adapters through checkpointed layers.
            model.activation_checkpointing_enable()
            self._record(
                "gradient_checkpointing", error, "turning on gradient checkpointing (~30% slower steps)"
            )
            return
        if self._swap_to_paged_optimizer():
            self._record(
                "paged_adamw_8bit",
                error,
                "switching the optimizer to paged 8-bit AdamW (bitsandbytes), moments carried over",
            )
            return
        tried = ", ".join(e["rung"] for e in self.oom_events) or "nothing applied"
        step = self.state.global_step + 1
        self._step_inputs = []
        raise UserError(
            f"out of memory at optimizer step {step} with every rung of the step-down ladder in force "
            f"({tried}): micro-batch {self._micro_batch()} sequence(s) x grad accumulation {self._grad_accum()}, "
            f"gradient checkpointing {'on' if getattr(model, 'is_activation_checkpointing', False) else 'unavailable'}, "
            f"optimizer {type(_inner(self.optimizer)).__name__}. This model does not fit this device as configured.\n"
            "  Re-plan: quant=4bit (QLoRA) to shrink the base weights, a smaller data.max_length, "
            "a smaller model or a bigger GPU; add dry_run=true to see the memory plan.\n"
            f"  Last error: {error}"
        )

    def _record(self, rung: str, error: str, action: str) -> None:
        step = self.state.global_step + 1
        self.oom_events.append(
            {
                "step": step,
                "rung": rung,
                "micro_batch": self._micro_batch(),
                "grad_accum": self._grad_accum(),
                "error": error,
            }
        )
        print(
            f"out of memory at step {step} ({error}); {action}. Rebuilding the step: no sample lost.",
            flush=True,
        )

    def oom_overrides(self) -> list[str]:
        """Overrides that start the next run where this one ended up (empty when nothing ran out)."""
        rungs = {e["rung"] for e in self.oom_events}
        overrides = [f"batch.size={self._micro_batch()}", f"batch.grad_accum={self._grad_accum()}"]
        overrides = overrides if "split" in rungs else []
        if "gradient_checkpointing" in rungs:
            overrides.append("train.gradient_checkpointing=true")
        if "paged_adamw_8bit" in rungs:
            overrides.append("optim=paged_adamw_8bit")
        return overrides

    def _micro_batch(self) -> int:
        return math.ceil(self.args.per_device_train_batch_size / self.oom_split)

    def _grad_accum(self) -> int:
        return self.args.gradient_accumulation_steps * self.oom_split

    def _swap_to_paged_optimizer(self) -> bool:
        """Replace the optimizer in place everywhere the training loop looks for it; False if not applicable."""
        old = _inner(self.optimizer)
        new = paged_adamw_8bit(old)
        if new is None:
            return False
        # torch schedulers check on their first step that they wrapped optimizer.step (to catch a
        # scheduler stepped before its optimizer); give the new optimizer the same marker.
        new_step = new.step

        def step(*args, **kwargs):
            new._opt_called = True
            return new_step(*args, **kwargs)

        step._wrapped_by_lr_sched = True
        new.step = step
        # The states already live next to the parameters: no device round trip through a state dict.
        wrapped = self.accelerator.prepare_optimizer(new, device_placement=False)
        self.accelerator._optimizers = [o for o in self.accelerator._optimizers if o is not self.optimizer]
        self.optimizer = self.callback_handler.optimizer = wrapped
        # The scheduler keeps its position and base learning rates; it only writes the lr elsewhere now.
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)
        if scheduler is not None:
            scheduler.optimizer = new
            if hasattr(self.lr_scheduler, "optimizers"):  # accelerate's AcceleratedScheduler
                self.lr_scheduler.optimizers = [wrapped]
        clear_device_cache(garbage_collection=True)
        return True


def _first_line(err: BaseException) -> str:
    """'CUDA out of memory. Tried to allocate 2.00 GiB' without the allocator statistics that follow."""
    text = str(err).strip()
    return ". ".join(text.splitlines()[0].split(". ")[:2]) if text else "out of memory"


def _inner(optimizer):
    """The torch optimizer under accelerate's AcceleratedOptimizer wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def paged_adamw_8bit(old: torch.optim.Optimizer):
    """A bitsandbytes PagedAdamW8bit over `old`'s param groups, with its moments; None if not applicable.

    Applies to torch AdamW and to bitsandbytes' non-paged Adam family (both decay weights the
    decoupled way, like PagedAdamW8bit; torch's Adam would not). Not to an optimizer
    with its own memory scheme (Adafactor, GaLore, an already paged one), where it would not help.
    Each parameter's old state is dropped as soon as it is carried over, to keep the peak low.
    """
    import bitsandbytes as bnb
    from bitsandbytes.optim.optimizer import Optimizer2State

    is_bnb_adam = isinstance(old, Optimizer2State) and getattr(old, "optimizer_name", "") == "adam"
    if not (isinstance(old, torch.optim.AdamW) or is_bnb_adam) or getattr(old, "is_paged", False):
        return None
    groups = []
    for g in old.param_groups:
        # torch's and bitsandbytes' Adam groups always hold these (bitsandbytes rejects amsgrad: unused by Trainer)
        group = {k: g[k] for k in ("params", "lr", "betas", "eps", "weight_decay")}
        if "initial_lr" in g:  # the scheduler's base learning rate
            group["initial_lr"] = g["initial_lr"]
        groups.append(group)
    new = bnb.optim.PagedAdamW8bit(groups)
    for gindex, group in enumerate(new.param_groups):
        for pindex, p in enumerate(group["params"]):
            state = old.state.pop(p, None)
            if state:
                new.init_state(group, p, gindex, pindex)
                _carry_moments(state, new.state[p])
    return new


def _carry_moments(old: dict, new: dict) -> None:
    """Write one parameter's Adam moments (torch fp32, or bitsandbytes 32/8-bit) into fresh bitsandbytes state."""
    from bitsandbytes.functional import dequantize_blockwise, quantize_blockwise

    new["step"] = int(old["step"])
    if "exp_avg" in old:  # torch AdamW
        moments = [old["exp_avg"], old["exp_avg_sq"]]
    elif old["state1"].dtype == new["state1"].dtype:  # bitsandbytes in the same format: copy as is
        for key in ("state1", "state2", "absmax1", "absmax2"):
            if key in old:
                new[key].copy_(old[key])
        return
    elif old["state1"].dtype == torch.uint8:
        moments = [
            dequantize_blockwise(
                old[f"state{i}"], absmax=old[f"absmax{i}"], code=old[f"qmap{i}"], blocksize=256
            )
            for i in (1, 2)
        ]
    else:
        moments = [old["state1"], old["state2"]]
    for i, moment in enumerate(moments, start=1):
        if new[f"state{i}"].dtype == torch.uint8:  # blockwise, as bitsandbytes' own 8-bit update stores it
            quantize_blockwise(
                moment.float(),
                code=new[f"qmap{i}"],
                absmax=new[f"absmax{i}"],
                out=new[f"state{i}"],
                blocksize=256,
            )
        else:  # tensors under min_8bit_size elements keep 32-bit states
            new[f"state{i}"].copy_(moment)


def _rows(inputs) -> int:
    """Sequences in a batch (1 for a padding-free packed batch, which cannot be split)."""
    ids = inputs.get("input_ids")
    if torch.is_tensor(ids):
        return ids.shape[0]
    return next((v.shape[0] for v in inputs.values() if torch.is_tensor(v) and v.dim() > 0), 1)


def _split_rows(inputs, parts: int) -> list[dict]:
    """`inputs` cut along the batch dimension into min(parts, rows) chunks; other values are shared."""
    rows = _rows(inputs)
    parts = max(1, min(parts, rows))
    pieces = [{} for _ in range(parts)]
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == rows:
            for piece, part in zip(pieces, torch.tensor_split(value, parts)):
                piece[key] = part
        else:
            for piece in pieces:
                piece[key] = value
    return pieces
