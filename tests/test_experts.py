"""Fused MoE experts quantized by finetune.experts and trained with per-expert LoRA (QLoRA on CPU)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import build_tiny_model, compose, tiny_overrides

from finetune import experts, memory, models

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

FAMILIES = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64,
    },
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16},
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def moe(request, tmp_path_factory):
    arch = request.param
    return arch, build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch, **FAMILIES[arch])


def _cfg(folder, tmp_path, *extra):
    return compose(
        tiny_overrides(
            folder, tmp_path, "model.attn_implementation=eager", "lora=r8", "lora.alpha=16", *extra
        )
    )


def _dense_expert_bytes(folder) -> int:
    """The fused stacks in bf16 (checkpoints keep the pre-v5 per-expert keys: count the loaded model)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    return sum(
        2 * getattr(m, k).numel()
        for _, m in experts.fused_experts(model)
        for k in ("gate_up_proj", "down_proj")
    )


def _stored_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for _, m in experts.twins(model) for _, b in m.named_buffers())


@pytest.mark.parametrize("quant,ceiling", [("4bit", 0.30), ("8bit", 0.55)])
def test_expert_storage_is_quantized_and_estimated(moe, tmp_path, quant, ceiling):
    arch, folder = moe
    cfg = _cfg(folder, tmp_path, f"quant={quant}")
    model = models.load_model(str(folder), cfg, torch.float32)
    assert experts.twins(model) and not experts.fused_experts(model)
    stored, dense = _stored_bytes(model), _dense_expert_bytes(folder)
    assert stored < ceiling * dense, (stored, dense)  # 4-bit: ~0.27 of bf16 at these tiny widths
    # the estimator's expert storage matches the real bytes (constants included)
    a = memory.describe(memory.load_arch(str(folder)))
    s = memory.Settings(quant=quant, double_quant=cfg.quant.double_quant, lora_r=8)
    assert memory.tensors.expert_storage_bytes(a, s) == pytest.approx(stored, rel=0.01)


def _sft(model, cfg, tokenizer, out, steps=4):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    text = ["the cat sat on the mat and the dog sat on the log"] * 16
    args = SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        learning_rate=5e-3,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        activation_checkpointing=True,
        max_length=32,
        save_strategy="no",
        router_aux_loss_coef=0.0,
        seed=0,
        lr_scheduler_type="constant",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": text}),
        processing_class=tokenizer,
        peft_config=models.peft_config(cfg),
    )
    experts.attach(trainer)  # what the pipeline does after building its trainer
    return trainer


def test_qlora_trains_every_expert_adapter_and_merges(moe, tmp_path):
    arch, folder = moe
    cfg = _cfg(folder, tmp_path, "quant=4bit")
    tokenizer = models.load_processor(str(folder), cfg.model)
    model = models.load_model(str(folder), cfg, torch.float32)
    trainer = _sft(model, cfg, tokenizer, tmp_path / "run")
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    expert_adapters = experts.adapter_parameters(trainer.model)
    assert {n.rpartition(".")[2] for n in expert_adapters} == {
        "gate_up_proj_lora_A",
        "gate_up_proj_lora_B",
        "down_proj_lora_A",
        "down_proj_lora_B",
    }
    assert not any("router" in n or ".gate." in n or n.endswith(".gate") for n in trainable)  # routers frozen
    before = {n: p.detach().clone() for n, p in expert_adapters.items()}
    trainer.train()
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    assert losses[-1] < losses[0], losses
    assert all(not torch.equal(p.detach(), before[n]) for n, p in expert_adapters.items())  # all moved

    # one more backward: every expert adapter (gate_up and down, A and B) gets a non-zero gradient
    trainer.model.zero_grad()
    batch = tokenizer(["the cat sat on the mat"], return_tensors="pt")
    trainer.model(**batch, labels=batch["input_ids"]).loss.backward()
    for n, p in expert_adapters.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert all(
        m.weight("down_proj", 0, torch.float32).grad_fn is None for _, m in experts.twins(trainer.model)
    )

    # saved next to PEFT's adapter, folded into the 16-bit experts: merged logits match the adapter model
    adapter_dir = tmp_path / "adapter"
    trainer.save_model(str(adapter_dir))
    assert experts.save_adapters(trainer.model, adapter_dir).is_file()
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(**batch).logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # reference: the same 4-bit-rounded experts in 16-bit storage, so only the merge is compared
    dequantized = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    for name, twin in experts.twins(trainer.model):
        original = dequantized.get_submodule(name.removeprefix("base_model.model."))
        for kind in ("gate_up_proj", "down_proj"):
            w = torch.stack([twin.weight(kind, e, torch.float32) for e in range(twin.num_experts)])
            transposed = getattr(original, "is_transposed", "gate_up_proj_bias" in original._parameters)
            getattr(original, kind).data.copy_(w.transpose(1, 2) if transposed else w)
    import bitsandbytes as bnb

    for name, m in trainer.model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            target = dequantized.get_submodule(
                name.removeprefix("base_model.model.").replace(".base_layer", "")
            )
            target.weight.data.copy_(bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state))
    merged = PeftModel.from_pretrained(dequantized, str(adapter_dir)).merge_and_unload()
    with torch.no_grad():
        unmerged_experts = (merged(**batch).logits - want).abs().mean()
        assert experts.merge_expert_adapters(merged, adapter_dir) == 4
        err = (merged(**batch).logits - want).abs()
    # bf16 adapters against fp32 merged weights; a near-tie in a tiny router may flip one token's expert
    assert err.mean() < 5e-3 and err.mean() < unmerged_experts / 3, (err.mean(), err.max(), unmerged_experts)


def test_adapters_round_trip_for_resume(moe, tmp_path):
    arch, folder = moe
    cfg = _cfg(folder, tmp_path, "quant=8bit", "lora.target_modules=[q_proj,down_proj]")
    model = models.load_model(str(folder), cfg, torch.float32)
    params = experts.adapter_parameters(model)
    assert {n.rpartition(".")[2] for n in params} == {"down_proj_lora_A", "down_proj_lora_B"}
    for p in params.values():
        torch.nn.init.normal_(p)
    experts.save_adapters(model, tmp_path)
    fresh = models.load_model(str(folder), cfg, torch.float32)
    experts.load_adapters(fresh, tmp_path)
    assert all(torch.equal(p, experts.adapter_parameters(fresh)[n]) for n, p in params.items())


def test_only_expert_targets_is_refused(tmp_path):
    from finetune import UserError

    cfg = compose(tiny_overrides(tmp_path, tmp_path, "quant=4bit", "lora.target_modules=[gate_up_proj]"))
    with pytest.raises(UserError, match="names only expert stacks"):
        models.peft_config(cfg)
