"""The memory estimator: exact parameter counts, mechanisms, fake-tensor accounting, calibration.

Fake-tensor checks build models at real widths under FakeTensorMode (no memory allocated); the
full-size ones are marked slow. Architectures live in tests/archs/ (public config.json values).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from finetune import UserError
from finetune.memory import (
    GIB,
    Estimate,
    Settings,
    count_params,
    estimate,
    reference_param_count,
)
from finetune.source import read_config

ROOT = Path(__file__).resolve().parents[1]
ARCHS = Path(__file__).parent / "archs"
ALL_ARCHS = [
    "llama-3-8b",
    "phi-3-mini",
    "qwen2.5-7b",
    "gemma-2-2b",
    "mixtral-8x7b",
    "gpt-oss-20b",
    "qwen2-vl-7b",
]


def arch(name: str) -> dict:
    return read_config(ARCHS / f"{name}.json")


def script(name: str):
    """Load a module from scripts/ (tools, not part of the package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ---- contract -------------------------------------------------------------------------------


def test_import_stays_light():
    code = "import sys, finetune.memory; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_estimate_keys_are_the_public_contract():
    est = estimate(arch("llama-3-8b"), Settings())
    assert isinstance(est, Estimate)
    assert list(est.as_dict()) == [
        "weights_gib",
        "adapter_gib",
        "gradients_gib",
        "optimizer_gib",
        "activations_gib",
        "overhead_gib",
        "total_gib",
    ]
    assert all(v >= 0 for v in est.as_dict().values())


def test_read_config_drops_provenance_notes(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "_note": "x", "hidden_size": 8}))
    assert read_config(tmp_path / "config.json") == {"model_type": "llama", "hidden_size": 8}
    with pytest.raises(UserError, match="cannot read it"):
        read_config(tmp_path / "missing" / "config.json")


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(quant="3bit"), "quant"),
        (dict(optim="lion"), "optim"),
        (dict(attn="flex"), "attn"),
        (dict(seq_len=0), "seq_len"),
        (dict(quant="4bit", lora_r=None), "quant"),
        (dict(optim="galore"), "lora_r"),
        (dict(modules_to_save=("norm",)), "modules_to_save"),
    ],
)
def test_bad_settings_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        estimate(arch("llama-3-8b"), replace(Settings(), **change))


def test_unknown_lora_target_lists_the_real_names():
    with pytest.raises(UserError, match=r"qproj names no module.*Did you mean 'q_proj'"):
        estimate(arch("llama-3-8b"), replace(Settings(), lora_targets=("qproj",)))


def test_unsupported_architecture_is_a_clear_error():
    with pytest.raises(UserError, match="model_type 'mambo'.*did you mean mamba"):
        count_params(
            {
                "model_type": "mambo",
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 1,
                "vocab_size": 8,
            }
        )


# ---- parameter counts -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_ARCHS)
def test_count_params_is_exact(name):
    """Equal to sum(p.numel()) of the transformers model built on the meta device."""
    a = arch(name)
    assert count_params(a)["total"] == reference_param_count(a)


def test_count_breakdown():
    for name in ALL_ARCHS:
        pc = count_params(arch(name))
        parts = pc.as_dict()
        total = parts.pop("total")
        assert sum(parts.values()) == total, name
    assert count_params(arch("gemma-2-2b"))["lm_head"] == 0  # tied to the embeddings
    assert count_params(arch("llama-3-8b"))["lm_head"] == 128256 * 4096
    vl = count_params(arch("qwen2-vl-7b"))
    # Qwen2-VL-7B's vision tower (32 blocks + merger), as counted by its model card: 0.68B
    assert vl["vision"] == 675_759_104
    oss = count_params(arch("gpt-oss-20b"))
    assert oss["experts"] > 0.9 * (oss["total"] - oss["embeddings"] - oss["lm_head"])
    assert count_params(arch("mixtral-8x7b"))["router"] == 32 * 8 * 4096


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # PEFT's MoE conversion notes unused rank patterns
@pytest.mark.parametrize(
    "name, targets, dora",
    [
        ("llama-3-8b", ("all-linear",), False),
        ("llama-3-8b", ("q_proj", "v_proj"), False),
        ("phi-3-mini", ("qkv_proj",), False),
        ("phi-3-mini", ("all-linear",), True),
        ("gemma-2-2b", ("all-linear",), False),
        ("qwen2.5-7b", ("q_proj", "v_proj", "lm_head"), False),
        ("mixtral-8x7b", ("all-linear",), False),  # PEFT adapts the fused expert stacks and router
        ("gpt-oss-20b", ("all-linear",), False),  # experts are not nn.Linear: attention only
    ],
)
def test_adapter_params_match_peft(name, targets, dora):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    a = arch(name)
    config = AutoConfig.for_model(**{k: v for k, v in a.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    target = "all-linear" if targets == ("all-linear",) else list(targets)
    model = get_peft_model(model, LoraConfig(r=16, target_modules=target, use_dora=dora))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    est = estimate(a, Settings(lora_targets=targets, use_dora=dora))
    adapter_bytes = 4  # fp32 adapters on an unquantized base; DoRA magnitudes are fp32 too
    assert est.adapter_gib * GIB == pytest.approx(trainable * adapter_bytes, rel=1e-9)


# ---- mechanisms -----------------------------------------------------------------------------


def test_weight_bytes_by_precision():
    a = arch("llama-3-8b")
    n = count_params(a)["total"]
    w = {q: estimate(a, Settings(quant=q)).weights_gib * GIB for q in ("none", "8bit", "4bit")}
    assert w["none"] == 2 * n
    assert estimate(a, Settings(lora_r=None, dtype="float32")).weights_gib * GIB == 4 * n
    # embeddings + LM head stay bf16; the rest ~1 byte (int8) or ~0.5 byte (NF4) per weight
    rest = n - 2 * 128256 * 4096 - count_params(a)["norms"]
    assert w["8bit"] == pytest.approx(2 * (n - rest) + rest, rel=0.01)
    assert w["4bit"] == pytest.approx(2 * (n - rest) + 0.5 * rest, rel=0.03)
    dq = estimate(a, Settings(quant="4bit", double_quant=False)).weights_gib * GIB
    assert w["4bit"] < dq  # double quantization shrinks the absmax from 4 bytes to ~1 per block


def test_nf4_storage_matches_bitsandbytes():
    """bitsandbytes 4-bit cannot run under fake tensors: quantize a real Linear4bit on CPU instead."""
    from finetune.memory.tensors import quant_bytes

    check = script("fake_tensor_check")
    for dq in (False, True):
        for shape in ((4096, 1024), (1000, 300)):
            real = check.nf4_storage_bytes(*shape, double_quant=dq)
            est = quant_bytes(Settings(quant="4bit", double_quant=dq), shape[0] * shape[1], shape[1])
            assert est == pytest.approx(real, rel=1e-4)


def test_optimizer_state_bytes():
    a = arch("qwen2.5-7b")
    n = count_params(a)["total"]
    full = Settings(lora_r=None)
    assert estimate(a, full).optimizer_gib * GIB == 4 * n  # torch AdamW: two bf16 moments
    assert estimate(a, replace(full, master_weights_fp32=True)).optimizer_gib * GIB == 8 * n
    eight = estimate(a, replace(full, optim="adamw_8bit")).optimizer_gib * GIB
    assert 2 * n < eight < 2.04 * n  # uint8 moments + one fp32 absmax per 256 values
    paged = estimate(a, replace(full, optim="paged_adamw_8bit")).optimizer_gib * GIB
    assert paged < 2.04 * 152064 * 3584 + 1  # only the largest tensor's state must stay resident
    # factored second moments (rows + cols per matrix) are tiny; one step's fp32 temporaries of the
    # largest tensor (the 152k x 3584 embedding: grad, param, update, scaled update) dominate
    ada = estimate(a, replace(full, optim="adafactor")).optimizer_gib * GIB
    assert 16 * 152064 * 3584 < ada < 16 * 152064 * 3584 + 0.01 * n
    assert estimate(a, replace(full, optim="sgd")).optimizer_gib == 0
    galore = estimate(a, replace(full, optim="galore")).optimizer_gib
    assert galore < 0.35 * estimate(a, full).optimizer_gib  # rank-128 projected states for the matrices
    assert estimate(a, replace(full, optim="galore_8bit")).optimizer_gib < galore


def test_gradients_and_accumulation():
    a = arch("llama-3-8b")
    full = Settings(lora_r=None)
    assert estimate(a, full).gradients_gib == estimate(a, full).weights_gib
    layerwise = estimate(a, replace(full, optim="galore", galore_retain_grad=False))
    assert layerwise.gradients_gib * GIB == 2 * 128256 * 4096  # one tensor's gradient at a time
    one, four = estimate(a, full), estimate(a, replace(full, grad_accum=4))
    assert four.total_gib - one.total_gib == pytest.approx(
        min(one.activations_gib, one.gradients_gib), rel=0.1
    )


def test_activation_mechanisms():
    a = arch("llama-3-8b")
    base = Settings(seq_len=4096)
    act = {
        k: estimate(a, replace(base, **v)).activations_gib
        for k, v in {
            "base": {},
            "no_ckpt": {"grad_ckpt": False},
            "eager": {"attn": "eager", "grad_ckpt": False},
            "fused": {"loss_impl": "fused"},
            "b2": {"batch_size": 2},
        }.items()
    }
    assert act["no_ckpt"] > 3 * act["base"]
    # eager keeps, per layer and head, the S x S fp32 softmax and its bf16 copy
    assert act["eager"] > act["no_ckpt"] + 32 * 32 * 4096**2 * 6 / GIB
    # 128k vocabulary: the loss backward holds three fp32 t x V tensors, ~6 GiB at 4096 tokens
    assert act["base"] > 12 * 4096 * 128256 / GIB
    assert act["fused"] < act["base"] / 3
    assert act["b2"] == pytest.approx(2 * act["base"], rel=0.05)


def test_moe_and_vision():
    oss = arch("gpt-oss-20b")
    q = estimate(oss, Settings(quant="4bit"))
    # bitsandbytes quantizes nn.Linear only; finetune.experts stores the 3-D expert stacks in NF4 too
    assert q.weights_gib < estimate(oss, Settings()).weights_gib / 3
    mixtral = arch("mixtral-8x7b")
    attn_only = estimate(mixtral, Settings(lora_targets=("q_proj", "k_proj", "v_proj", "o_proj")))
    all_linear = estimate(mixtral, Settings())
    assert all_linear.adapter_gib > 20 * attn_only.adapter_gib  # expert stacks are adapted too
    vl = arch("qwen2-vl-7b")
    assert (
        estimate(vl, Settings(image_patches=4096)).activations_gib > estimate(vl, Settings()).activations_gib
    )
    assert (
        estimate(vl, Settings(quant="4bit", quantize_vision=False)).weights_gib
        > estimate(vl, Settings(quant="4bit")).weights_gib
    )


# ---- fake tensors: the estimator's accounting against PyTorch's MemTracker -------------------

FAST_CASES = [
    ("llama-3-8b", 2, Settings(seq_len=1024)),
    ("mixtral-8x7b", 2, Settings(seq_len=512)),
    ("phi-3-mini", 2, Settings(lora_r=None, grad_ckpt=False, seq_len=512)),
]


def _check_fake(name, layers, s):
    check = script("fake_tensor_check")
    rows = check.compare(check.load(name, layers), s)
    for cat, (got, est) in rows.items():
        tol = 0.15 if cat == "acts" else 0.02
        assert est == pytest.approx(got, rel=tol, abs=1e-3), (cat, got, est)


@pytest.mark.parametrize("name, layers, s", FAST_CASES, ids=[c[0] for c in FAST_CASES])
def test_fake_tensor_accounting(name, layers, s):
    """Two layers at real widths: weights/grads/optimizer within 2%, activations within 15%."""
    _check_fake(name, layers, s)


@pytest.mark.slow
@pytest.mark.parametrize("case", range(8))
def test_fake_tensor_table(case):
    """The full table of scripts/fake_tensor_check.py (real sizes), as recorded in BENCHMARKS.md."""
    check = script("fake_tensor_check")
    _label, name, layers, s = check.CASES[case]
    _check_fake(name, layers, s)


# ---- calibration against published measurements ---------------------------------------------


def test_calibration_thresholds():
    cal = script("calibrate")
    folder = cal.calibration_dir()
    if folder is None:
        pytest.skip("calibration folder (shared/calibration) not available")
    stats = cal.headline(cal.run(folder))["all"]
    assert stats["n"] >= 40
    assert stats["median"] <= cal.THRESHOLDS["median"]
    assert stats["p90"] <= cal.THRESHOLDS["p90"]
