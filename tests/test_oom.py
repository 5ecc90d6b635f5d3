"""The OOM step-down ladder (finetune/oom.py), on CPU: out-of-memory errors are injected by a hook.

Each run trains the tiny model for a few steps on 4 x 2 = 8 sequences per optimizer step, and is
compared with a plain SFTTrainer run of the same seed: no step and no sample may be lost. (The
demo answers all have the same token count, so only a micro-batch split unevenly tells a
token-weighted split from an unweighted one: the last micro-batch holds 3 rows.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose, tiny_overrides

from finetune import UserError, data, hardware, models, pipeline
from finetune.oom import StepDownTrainer, paged_adamw_8bit

BATCH, ACCUM = 4, 2
pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")


def _trainer(tiny_model: Path, tmp_path: Path, *extra: str, cls=StepDownTrainer, mean_loss: bool = False):
    """The trainer pipeline._train builds, deterministic: no dropout, no warmup, checkpointing off."""
    from transformers import set_seed

    # Every group pinned, so nothing is left for the auto-fit resolver to decide.
    pinned = [
        "hw=cpu",
        "quant=none",
        "lora=r16",
        "optim=adamw",
        "model.attn_implementation=sdpa",
        f"batch.size={BATCH}",
        f"batch.grad_accum={ACCUM}",
    ]
    deterministic = ["lora.dropout=0", "optim.warmup_ratio=0", "train.gradient_checkpointing=false"]
    # 15 examples: the last micro-batch of each epoch holds 3 rows, which split unevenly (2 + 1).
    deterministic.append("data.num_train=15")
    overrides = {
        o.split("=")[0]: o
        for o in tiny_overrides(tiny_model, tmp_path)
        + pinned
        + deterministic
        + ["train.logging_steps=1", *extra]
    }
    cfg = compose(list(overrides.values()))
    set_seed(cfg.seed)
    prec = hardware.precision(cfg)
    processor = models.load_processor(str(tiny_model), cfg.model)
    train_set, _ = data.load(cfg.data, 0, cfg.seed)
    model = models.load_model(str(tiny_model), cfg, getattr(torch, prec.weights))
    trainer = cls(
        model=model,
        args=pipeline._sft_config(cfg, tmp_path, prec),
        train_dataset=train_set,
        processing_class=processor,
        peft_config=models.peft_config(cfg),
    )
    if mean_loss:  # models without loss kwargs: no num_items_in_batch, the loss is a per-micro-batch mean
        trainer.model_accepts_loss_kwargs = False
    return trainer


class InjectOOM:
    """Raises torch.OutOfMemoryError when `when(trainer, rows, call)` says so: at the start of a forward
    pass, or half-way through backward (the last layer's adapters already hold this pass's gradients)."""

    def __init__(self, trainer, when, backward: bool = False):
        self.trainer, self.when, self.calls, self.rows = trainer, when, 0, []
        if backward:
            first_layer = trainer.model.get_base_model().model.layers[0]
            first_layer.register_full_backward_pre_hook(
                lambda module, grad_out: self.check(grad_out[0].shape[0])
            )
        else:
            trainer.model.get_input_embeddings().register_forward_pre_hook(
                lambda module, args: self.check(args[0].shape[0])
            )

    def check(self, rows: int) -> None:
        self.calls += 1
        if self.when(self.trainer, rows, self.calls):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        self.rows.append(rows)


def _adapters(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


def _logged(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """Plain SFTTrainer runs, by (max_steps, mean_loss): what every rescued run must reproduce."""
    from trl import SFTTrainer

    runs = {}

    def run(max_steps: int = 2, mean_loss: bool = False):
        if (max_steps, mean_loss) not in runs:
            trainer = _trainer(
                tiny_model,
                tmp_path_factory.mktemp("ref"),
                f"train.max_steps={max_steps}",
                cls=SFTTrainer,
                mean_loss=mean_loss,
            )
            trainer.train()
            runs[max_steps, mean_loss] = trainer
        return runs[max_steps, mean_loss]

    return run


def _assert_same_training(trainer, ref, rtol=1e-4, atol=1e-6):
    assert trainer.state.global_step == ref.state.global_step
    for name, value in _adapters(ref).items():
        torch.testing.assert_close(_adapters(trainer)[name], value, rtol=rtol, atol=atol, msg=name)
    assert _logged(trainer, "loss") == pytest.approx(_logged(ref, "loss"), rel=1e-5)
    # A rebuilt micro-batch is not counted twice.
    assert _logged(trainer, "num_tokens") == _logged(ref, "num_tokens")


@pytest.mark.parametrize(
    "mean_loss,backward",
    [(False, False), (True, True)],
    ids=["num_items_in_batch-forward", "per-batch-mean-backward"],
)
def test_split_halves_micro_batch_and_matches_unsplit_run(
    tiny_model, tmp_path, reference, capsys, mean_loss, backward
):
    trainer = _trainer(tiny_model, tmp_path, mean_loss=mean_loss)
    # The first micro-batch of step 1 fits; the second does not at 4 rows: step 1 is rebuilt at 2 x 2.
    oom = InjectOOM(trainer, lambda t, rows, call: rows > 2 and call >= 2, backward=backward)
    trainer.train()

    assert trainer.state.global_step == 2
    assert [(e["step"], e["rung"], e["micro_batch"], e["grad_accum"]) for e in trainer.oom_events] == [
        (1, "split", 2, 4)
    ]
    event = trainer.oom_events[0]
    assert event["micro_batch"] * event["grad_accum"] == BATCH * ACCUM  # effective batch unchanged
    assert trainer.oom_split == 2 and trainer.oom_overrides() == ["batch.size=2", "batch.grad_accum=4"]
    assert oom.rows[0] == 4 and set(oom.rows[1:]) == {2, 1}  # then chunks of 2 (2 + 1 for the last 3 rows)
    assert "out of memory at step 1" in capsys.readouterr().out
    _assert_same_training(trainer, reference(mean_loss=mean_loss))


def test_checkpointing_when_one_sequence_still_does_not_fit(tiny_model, tmp_path, reference):
    trainer = _trainer(tiny_model, tmp_path)
    InjectOOM(trainer, lambda t, rows, call: not t.model.is_activation_checkpointing)
    trainer.train()

    assert [(e["rung"], e["micro_batch"]) for e in trainer.oom_events] == [
        ("split", 2),
        ("split", 1),
        ("gradient_checkpointing", 1),
    ]
    assert trainer.model.is_activation_checkpointing
    assert trainer.oom_overrides() == [
        "batch.size=1",
        "batch.grad_accum=8",
        "train.gradient_checkpointing=true",
    ]
    _assert_same_training(trainer, reference())


def test_a_resumed_run_starts_with_the_ladder_in_force(tiny_model, tmp_path):
    from finetune import checkpoints

    trainer = _trainer(tiny_model, tmp_path)
    InjectOOM(trainer, lambda t, rows, call: not t.model.is_activation_checkpointing)
    trainer.train()
    checkpoint = tmp_path / "checkpoints" / "checkpoint-2"  # the final checkpoint, with the ladder's state
    assert checkpoints.problem(checkpoint) is None
    # No OOM is injected now: only a restored ladder splits micro-batches and checkpoints activations.
    resumed = _trainer(tiny_model, tmp_path, "train.max_steps=3")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 3
    assert resumed.oom_split == trainer.oom_split == 4 and resumed.oom_events == trainer.oom_events
    assert resumed.model.is_activation_checkpointing


def test_paged_8bit_optimizer_takes_over_with_moments_and_schedule(tiny_model, tmp_path, reference):
    import bitsandbytes as bnb

    trainer = _trainer(tiny_model, tmp_path, "train.max_steps=3")
    # Step 1 trains with AdamW; from step 2 only the paged optimizer fits.
    paged = lambda t: isinstance(t.optimizer.optimizer, bnb.optim.PagedAdamW8bit)  # noqa: E731
    InjectOOM(trainer, lambda t, rows, call: t.state.global_step >= 1 and not paged(t))
    trainer.train()

    assert [(e["step"], e["rung"]) for e in trainer.oom_events] == [
        (2, "split"),
        (2, "split"),
        (2, "gradient_checkpointing"),
        (2, "paged_adamw_8bit"),
    ]
    assert trainer.state.global_step == 3 and paged(trainer)
    optimizer = trainer.optimizer.optimizer
    assert trainer.lr_scheduler.optimizer is optimizer
    assert trainer.accelerator._optimizers == [trainer.optimizer]
    assert {s["step"] for s in optimizer.state.values()} == {3}  # AdamW's step 1 carried over, then 2 more
    ref = reference(max_steps=3)
    assert _logged(trainer, "learning_rate") == pytest.approx(_logged(ref, "learning_rate"))
    assert _logged(trainer, "loss") == pytest.approx(_logged(ref, "loss"), rel=1e-2)
    # 8-bit moments: close to, not equal to, the AdamW run.
    for name, value in _adapters(ref).items():
        torch.testing.assert_close(_adapters(trainer)[name], value, rtol=0.05, atol=2e-3, msg=name)


@pytest.mark.parametrize("source", ["adamw_torch", "adamw_bnb_8bit"])
def test_paged_adamw_8bit_carries_moments_so_the_next_update_matches(source):
    import bitsandbytes as bnb

    kind = torch.optim.AdamW if source == "adamw_torch" else bnb.optim.AdamW8bit
    torch.manual_seed(0)
    grads = [[torch.randn(64, 128), torch.randn(10)] for _ in range(4)]  # 8-bit and 32-bit (small) states

    def trained(steps: int):
        torch.manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(10))]
        optimizer = kind(
            [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}],
            lr=1e-2,
        )
        for step in grads[:steps]:
            for p, g in zip(params, step):
                p.grad = g.clone()
            optimizer.step()
        return params, optimizer

    params, old = trained(3)
    paged = paged_adamw_8bit(old)
    assert (
        isinstance(paged, bnb.optim.PagedAdamW8bit) and not old.state
    )  # each old state dropped once carried
    assert [(g["lr"], g["weight_decay"]) for g in paged.param_groups] == [(1e-2, 0.1), (1e-2, 0.0)]
    assert [paged.state[p]["step"] for p in params] == [3, 3]
    assert [paged.state[p]["state1"].dtype for p in params] == [torch.uint8, torch.float32]
    for p, g in zip(params, grads[3]):
        p.grad = g.clone()
    paged.step()
    # Fresh moments would make this 4th update lr * sign(grad); carried ones reproduce the old optimizer's.
    for p, q in zip(params, trained(4)[0]):
        torch.testing.assert_close(
            p.detach(), q.detach(), rtol=0, atol=1e-3 if source == "adamw_torch" else 1e-6
        )
    assert paged_adamw_8bit(paged) is None  # already paged: the rung does not apply


def test_exhausted_ladder_says_how_to_replan(tiny_model, tmp_path):
    trainer = _trainer(tiny_model, tmp_path)
    InjectOOM(trainer, lambda t, rows, call: True)
    with pytest.raises(UserError) as err:
        trainer.train()
    message = str(err.value)
    assert [e["rung"] for e in trainer.oom_events] == [
        "split",
        "split",
        "gradient_checkpointing",
        "paged_adamw_8bit",
    ]
    assert (
        "out of memory at optimizer step 1" in message
        and "micro-batch 1 sequence(s) x grad accumulation 8" in message
    )
    for fix in ("quant=4bit", "data.max_length", "dry_run=true", "injected"):
        assert fix in message, fix
    assert trainer.state.global_step == 0
