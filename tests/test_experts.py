"""Fused MoE experts quantized by finetune.experts and trained with per-expert LoRA (QLoRA on CPU)."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_DIMS, build_tiny_model, compose, tiny_overrides

from finetune import experts, memory, models, source
from finetune.memory.tensors import ROUTERS

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# DeepSeek-V2/V3 at tiny widths: multi-head latent attention (q/kv LoRA ranks), one dense layer before
# the MoE layer, one shared expert (an ordinary MLP of nn.Linear, quantized by bitsandbytes itself)
_DEEPSEEK = {
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
}
SHARED_EXPERTS = {"qwen2_moe", "deepseek_v2", "deepseek_v3"}
_SHARED = re.compile(r".*\.shared_experts?\.(gate|up|down)_proj")
FAMILIES = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64,
    },
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16},
    "deepseek_v2": _DEEPSEEK,
    "deepseek_v3": {**_DEEPSEEK, "n_group": 1, "topk_group": 1},  # one group: every expert reachable
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def moe(request, tmp_path_factory):
    arch = request.param
    folder = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch, **FAMILIES[arch])
    if arch.startswith("deepseek"):
        # MLA expands keys and values to every head; its config takes num_key_value_heads == heads (the
        # real checkpoints' 128 == 128), which the shared tiny widths (2 of 4) would break in attention
        _set_config(folder, num_key_value_heads=TINY_DIMS["num_attention_heads"])
    return arch, folder


def _set_config(folder, **values) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | values, indent=2))


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
    # shared experts (Qwen-MoE, DeepSeek) are ordinary MLPs: bitsandbytes' own Linear4bit/Linear8bitLt
    import bitsandbytes as bnb

    shared = [m for n, m in model.named_modules() if _SHARED.fullmatch(n)]
    linear = bnb.nn.Linear4bit if quant == "4bit" else bnb.nn.Linear8bitLt
    want = 3 * len(experts.twins(model)) if arch in SHARED_EXPERTS else 0  # gate, up, down per MoE layer
    assert len(shared) == want and all(isinstance(m, linear) for m in shared), (arch, shared)
    stored, dense = _stored_bytes(model), _dense_expert_bytes(folder)
    assert stored < ceiling * dense, (stored, dense)  # 4-bit: ~0.27 of bf16 at these tiny widths
    # the estimator's expert storage matches the real bytes (constants included)
    a = memory.describe(source.read_config(folder / "config.json"))
    s = memory.Settings(quant=quant, double_quant=cfg.quant.double_quant, lora_r=8)
    assert memory.tensors.expert_storage_bytes(a, s) == pytest.approx(stored, rel=0.01)


@pytest.mark.parametrize("moe", ["mixtral", "gpt_oss"], indirect=True)
def test_expert_activations_are_what_the_estimator_counts(moe, tmp_path):
    """What one quantized, adapted experts module keeps for backward, against the estimator's
    (token, expert) pair accounting: gate_up output only (the gate is recomputed), both LoRA inputs,
    both A outputs and the routed output."""
    from finetune.memory import activations
    from finetune.memory.tensors import adapted

    arch, folder = moe
    cfg = _cfg(folder, tmp_path, "quant=4bit")
    model = models.load_model(str(folder), cfg, torch.float32)
    twin = experts.twins(model)[0][1]
    E, t = twin.num_experts, 64
    top_k = FAMILIES[arch]["num_experts_per_tok"]
    hidden = torch.randn(t, twin.shapes["down_proj"][0], requires_grad=True)
    index = torch.stack([torch.randperm(E)[:top_k] for _ in range(t)])  # k distinct experts a token
    weights = torch.rand(t, top_k, requires_grad=True)
    weights_kept = {x.untyped_storage().data_ptr() for x in [*twin.buffers(), *twin.parameters()]}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        out = twin(hidden, index, weights)
    # activations only (adapter slices and quantized storage are weights), each tensor once
    kept = {
        x.data_ptr(): x.numel() * x.element_size()
        for x in saved
        if x.untyped_storage().data_ptr() not in weights_kept and x.is_floating_point()
    }
    out.sum().backward()
    assert hidden.grad.abs().sum() > 0 and weights.grad.abs().sum() > 0
    a = memory.describe(source.read_config(folder / "config.json"))
    s = memory.Settings(quant="4bit", lora_r=8, dtype="float32")
    layer = next(x for x in a.layers if x.experts)
    names = {x[0] for x in adapted(a, s)}
    assert names  # all-linear reaches the experts
    want = activations._experts_saved(a, layer, s, 4, 4, full=False) * t
    assert 0.8 * want <= sum(kept.values()) <= 1.05 * want, (sum(kept.values()), want)


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


@pytest.mark.parametrize(
    "moe",
    # DeepSeek-V2 trains like V3 (same experts, same MLA); its storage and LoRA placement stay fast
    [pytest.param(f, marks=pytest.mark.slow) if f == "deepseek_v2" else f for f in FAMILIES],
    indirect=True,
)
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
    named = dict(trainer.model.named_parameters())
    routers = {n: p.detach().clone() for n, p in named.items() if re.match(ROUTERS + r"\.", n)}
    assert routers and not set(routers) & trainable, sorted(routers)  # routers frozen (and not adapted)
    before = {n: p.detach().clone() for n, p in expert_adapters.items()}
    trainer.train()
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    assert losses[-1] < losses[0], losses
    for n, p in expert_adapters.items():  # every expert's A and B moved: each had a non-zero gradient
        assert all(not torch.equal(p[e].detach(), before[n][e]) for e in range(p.shape[0])), n
    assert all(torch.equal(named[n], p) for n, p in routers.items())

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
        scales = [(m, m.scale) for _, m in experts.twins(trainer.model)]
        for m, _ in scales:
            m.scale = 0.0  # expert adapters off: what is left to compare is PEFT's own merge
        want_without = trainer.model(**batch).logits
        for m, scale in scales:
            m.scale = scale
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
        plain = merged(**batch).logits
        floor = (plain - want_without).abs().mean()  # PEFT's bf16 adapters against their fp32 merge
        unmerged_experts = (plain - want).abs().mean()
        assert experts.merge_expert_adapters(merged, adapter_dir) == 2 * len(experts.twins(trainer.model))
        err = (merged(**batch).logits - want).abs()
    # merging the experts removes what their adapters add, down to PEFT's floor (DeepSeek's one MoE layer
    # adds little); a near-tie in a tiny router may flip one token's expert
    excess = (err.mean() - floor, unmerged_experts - floor)
    assert err.mean() < 5e-3 and excess[0] < excess[1] / 3, (err.mean(), err.max(), floor, unmerged_experts)


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


@pytest.mark.parametrize("moe", ["mixtral"], indirect=True)
def test_only_expert_targets_is_refused(moe, tmp_path):
    from finetune import UserError

    _, folder = moe
    for names in ("[gate_up_proj]", "[down_proj]"):  # Mixtral's MLPs are all experts: no Linear so named
        cfg = compose(tiny_overrides(folder, tmp_path, "quant=4bit", f"lora.target_modules={names}"))
        with pytest.raises(UserError, match="names only expert stacks"):
            models.peft_config(cfg)


# the Linears of an MoE model's MLPs beside its routed experts: shared experts, dense (first_k_dense_replace)
# layers; PEFT 0.21 moves their names to the fused stacks' parameters on DeepSeek and Qwen3-MoE
# (huggingface/peft#3711) unless memory.reading's LoraConfig keeps them
_MLP_LINEARS = re.compile(r".*\.mlp\.(shared_experts?\.)?(gate|up|down)_proj")


def _mlp_linears_train(folder, cfg, want: int) -> None:
    """PEFT puts LoRA on every dense/shared MLP Linear, each adapter gets a gradient, and the estimator
    plans exactly the modules PEFT adapted (finetune.experts' own expert adapters aside)."""
    from peft import get_peft_model

    model = get_peft_model(models.load_model(str(folder), cfg, torch.float32), models.peft_config(cfg))
    mlp = {n: m for n, m in model.named_modules() if _MLP_LINEARS.fullmatch(n)}
    assert len(mlp) == want and all(hasattr(m, "lora_A") for m in mlp.values()), sorted(mlp)
    for m in mlp.values():
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.02)  # B starts at 0: A's gradient with it
    batch = models.load_processor(str(folder), cfg.model)(["the cat sat on the mat"], return_tensors="pt")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for n, m in mlp.items():
        for part in (m.lora_A["default"], m.lora_B["default"]):
            assert part.weight.grad is not None and part.weight.grad.abs().sum() > 0, n

    from finetune.schema import targets

    got: dict[str, int] = {}  # module pattern -> adapters (PEFT nests one ParamWrapper per expert stack)
    for n, m in model.named_modules():
        if hasattr(m, "lora_A"):
            k = re.sub(r"\.\d+\.", ".*.", n.removeprefix("base_model.model.").replace(".base_layer", ""))
            got[k] = got.get(k, 0) + 1
    a = memory.describe(source.read_config(folder / "config.json"))
    s = memory.Settings(quant=cfg.quant.load_in, lora_r=8, lora_targets=tuple(targets(cfg.lora)))
    planned: dict[str, int] = {}
    for name, _i, _o, _mult, count in memory.tensors.adapted(a, s):
        if not name.startswith("experts."):  # finetune.experts' own, not PEFT's
            planned[name] = planned.get(name, 0) + count
    assert got == planned


@pytest.mark.parametrize(
    "quant, target",
    [("4bit", "all-linear"), ("none", "all-linear"), ("4bit", "[gate_proj,up_proj,down_proj,o_proj]")],
)
@pytest.mark.parametrize("moe", sorted(SHARED_EXPERTS), indirect=True)
def test_shared_experts_and_dense_mlps_get_peft_lora(moe, tmp_path, quant, target):
    arch, folder = moe
    cfg = _cfg(folder, tmp_path, f"quant={quant}", f"lora.target_modules={target}")
    # gate, up, down of the shared expert of each MoE layer (Qwen2-MoE: both layers) and of the dense layer
    _mlp_linears_train(folder, cfg, want=6)


def test_qwen3_moe_dense_layers_get_peft_lora(tmp_path):
    folder = build_tiny_model(
        tmp_path / "tiny",
        arch="qwen3_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        mlp_only_layers=[0],  # layer 0 a dense MLP of Linears, layer 1 the experts
    )
    for quant in ("4bit", "none"):
        _mlp_linears_train(folder, _cfg(folder, tmp_path, f"quant={quant}"), want=3)


# ---- gpt-oss as shipped: experts in MXFP4 (two e2m1 values a byte, one e8m0 exponent per 32 values)

_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
FP4_E2M1 = torch.tensor(_E2M1 + [-x for x in _E2M1])  # code 8..15: the sign bit


def _to_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., n] -> blocks [..., n/32, 16] uint8 (low nibble first) and scales [..., n/32] uint8, the
    layout of gpt-oss's checkpoints: each group of 32 scaled by 2^(e-127) so its largest value fits 6."""
    groups = w.float().reshape(*w.shape[:-1], -1, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6)), torch.zeros_like(amax)).clamp(-127, 127)
    codes = (groups / torch.exp2(exp)).unsqueeze(-1).sub(FP4_E2M1).abs().argmin(-1)  # round to nearest
    blocks = (codes[..., 0::2] | codes[..., 1::2] << 4).to(torch.uint8)
    return blocks, (exp.squeeze(-1) + 127).to(torch.uint8)


def _from_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    values = torch.stack([FP4_E2M1[(blocks & 15).long()], FP4_E2M1[(blocks >> 4).long()]], -1)
    values = values.reshape(*blocks.shape[:-1], 32) * torch.exp2(scales.float() - 127).unsqueeze(-1)
    return values.reshape(*blocks.shape[:-2], -1)


def _save_mxfp4(bf16_folder, folder) -> dict[str, torch.Tensor]:
    """A copy of a tiny gpt-oss with its experts in MXFP4 as the hub ships them; returns each stack as the
    MXFP4 values ([experts, in, out], what transformers should dequantize to)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(bf16_folder, folder)
    state = {k: v.to(torch.bfloat16) for k, v in load_file(str(folder / "model.safetensors")).items()}
    values = {}
    for key in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = _to_mxfp4(state.pop(key).transpose(1, 2))  # groups run along the input: [E, out, in]
        state[f"{key}_blocks"], state[f"{key}_scales"] = blocks, scales
        values[key] = _from_mxfp4(blocks, scales).transpose(1, 2)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    skip = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
    mxfp4 = {"quant_method": "mxfp4", "modules_to_not_convert": skip}  # as in openai/gpt-oss-20b
    _set_config(folder, dtype="bfloat16", quantization_config=mxfp4)
    return values


def _groups(stack: torch.Tensor) -> torch.Tensor:
    """[E, in, out] -> [E, out, in/32, 32]: the MXFP4 blocks of a gpt-oss stack."""
    return stack.transpose(1, 2).reshape(stack.shape[0], stack.shape[2], -1, 32)


@pytest.mark.parametrize("moe", ["gpt_oss"], indirect=True)
def test_mxfp4_checkpoint_is_dequantized_once_then_nf4(moe, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    bf16, folder = moe[1], tmp_path / "mxfp4"
    values = _save_mxfp4(bf16, folder)
    original = load_file(str(bf16 / "model.safetensors"))
    for key, v in values.items():  # the format's own rounding: half of 4..6, one block scale < amax/3
        w = original[key].to(torch.bfloat16).float()
        step = _groups(w).abs().amax(-1, keepdim=True) / 3
        assert (_groups(v - w).abs() <= step).all() and 0 < (v - w).norm() / w.norm() < 0.2, key

    cfg = _cfg(folder, tmp_path, "quant=4bit")
    model = models.load_model(str(folder), cfg, torch.float32)
    copy = models._dequantized_copy(str(folder), cfg)  # the bf16 copy load_model wrote, found again
    monkeypatch.chdir(tmp_path)
    assert models._dequantized_copy("mxfp4", cfg) == copy  # a local folder is cached by where it is
    assert capsys.readouterr().out.count("Dequantizing the MXFP4 experts") == 1
    dequantized = {
        k: v for f in sorted(Path(copy).glob("*.safetensors")) for k, v in load_file(str(f)).items()
    }
    assert not any(k.endswith(("_blocks", "_scales")) for k in dequantized)  # one file per decoded stack
    assert "quantization_config" not in json.loads((Path(copy) / "config.json").read_text())
    for key, v in values.items():  # transformers' CPU dequantization reads the bytes as we wrote them
        assert dequantized[key].dtype == torch.bfloat16 and torch.equal(dequantized[key].float(), v), key

    twins = experts.twins(model)
    assert len(twins) == 2 and all(m.bits == "4bit" and m.quant_type == "nf4" for _, m in twins)
    for name, twin in twins:  # NF4 of the MXFP4 values: [out, in] per expert, NF4's rounding away
        for kind in ("gate_up_proj", "down_proj"):
            v = values[f"{name}.{kind}"].transpose(1, 2)
            w = torch.stack([twin.weight(kind, e, torch.float32) for e in range(twin.num_experts)])
            assert (w - v).norm() / v.norm() < 0.15, (name, kind, (w - v).norm() / v.norm())

    trainer = _sft(model, cfg, models.load_processor(str(folder), cfg.model), tmp_path / "run", steps=2)
    before = {n: p.detach().clone() for n, p in experts.adapter_parameters(trainer.model).items()}
    trainer.train()
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
    assert all(not torch.equal(p, before[n]) for n, p in experts.adapter_parameters(trainer.model).items())
