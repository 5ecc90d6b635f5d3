"""Real training of a tiny locally built model through the pipeline: LoRA, DoRA, 4-bit QLoRA, full fine-tune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose, run_cli, tiny_overrides
from safetensors.torch import load_file

from finetune import UserError, attention, pipeline


def _original_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _base_name(peft_name: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight' -> 'model.layers.0.self_attn.q_proj.weight'."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer", "")


def _train(tiny_model: Path, tmp_path: Path, *extra: str) -> pipeline.Result:
    cfg = compose(tiny_overrides(tiny_model, tmp_path, *extra))
    result = pipeline.run(cfg)
    assert result is not None
    return result


@pytest.mark.parametrize("extra", [[], ["lora.use_dora=true"]], ids=["lora", "dora"])
def test_adapters_learn_and_base_stays_frozen(tiny_model, tmp_path, extra):
    result = _train(tiny_model, tmp_path, *extra)
    original = _original_weights(tiny_model)
    trained = dict(result.model.named_parameters())
    adapters = {n: p for n, p in trained.items() if "lora_" in n}
    assert adapters and all(p.requires_grad for p in adapters.values())
    # LoRA starts with B = 0: a trained B is non-zero. DoRA also learns its magnitude vectors.
    assert any(p.abs().sum() > 0 for n, p in adapters.items() if "lora_B" in n)
    if extra:
        assert any("lora_magnitude_vector" in n for n in adapters)
    for name, param in trained.items():
        if "lora_" in name:
            continue
        assert not param.requires_grad, name
        torch.testing.assert_close(param.detach().cpu(), original[_base_name(name)], msg=name)
    saved = load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())


def test_full_fine_tune_changes_every_weight_matrix(tiny_model, tmp_path):
    result = _train(tiny_model, tmp_path, "lora=none", "optim.lr=1e-2")
    original = _original_weights(tiny_model)
    changed = [
        n
        for n, p in result.model.named_parameters()
        if p.dim() == 2 and not torch.equal(p.detach(), original[n])
    ]
    assert len(changed) == sum(1 for v in original.values() if v.dim() == 2)
    assert (result.run_dir / "model" / "model.safetensors").is_file()


def test_4bit_qlora_trains_adapters_over_frozen_quantized_base(tiny_model, tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    result = _train(tiny_model, tmp_path, "quant=4bit")
    quantized = [m for m in result.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized, "base linears must be bitsandbytes 4-bit"
    # A fresh 4-bit load of the same checkpoint quantizes identically: the trained base must equal it.
    fresh = AutoModelForCausalLM.from_pretrained(
        tiny_model,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
        ),
    )
    fresh_q = {n: m for n, m in fresh.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    for name, module in result.model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            twin = fresh_q[_base_name(name + ".weight").removesuffix(".weight")]
            assert torch.equal(module.weight.data, twin.weight.data), name
            assert not module.weight.requires_grad
    assert any(p.abs().sum() > 0 for n, p in result.model.named_parameters() if "lora_B" in n)


def test_run_folder_holds_everything_and_is_never_reused(tiny_model, tmp_path):
    result = _train(tiny_model, tmp_path, "run_name=first")
    files = {p.name for p in result.run_dir.iterdir()}
    assert {"config.yaml", "summary.json", "adapter"} <= files
    assert (result.run_dir / "adapter" / "tokenizer.json").is_file()
    summary = json.loads((result.run_dir / "summary.json").read_text())
    for key in (
        "steps",
        "final_loss",
        "tokens_per_second",
        "wall_seconds",
        "peak_cpu_rss_gib",
        "accuracy_before",
        "accuracy_after",
    ):
        assert key in summary, key
    assert summary["steps"] == 2 and 0 <= summary["accuracy_after"] <= 1
    with pytest.raises(UserError, match="already exists"):
        pipeline.run(compose(tiny_overrides(tiny_model, tmp_path, "run_name=first")))
    second = _train(tiny_model, tmp_path)  # automatic names never collide either
    assert second.run_dir != result.run_dir


def test_cli_trains_end_to_end(tiny_model, tmp_path):
    result = run_cli(*tiny_overrides(tiny_model, tmp_path, "run_name=cli"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out exact match" in result.stdout
    assert (tmp_path / "cli" / "adapter" / "adapter_model.safetensors").is_file()


def test_dry_run_plans_a_7b_for_a_4090_without_loading(tmp_path):
    result = run_cli("model=qwen2.5-7b", "hw=rtx4090", "dry_run=true", f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "7.62B parameters" in result.stdout and "rtx4090" in result.stdout
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"


@pytest.mark.parametrize(
    "args,message",
    [
        (["model=llama-3-8b", "hw=rtx4090"], "plans for a GPU, but torch sees none"),
        (["model=llama-3-8b", "hw=cpu"], "could not load 'meta-llama/Meta-Llama-3-8B-Instruct'"),
    ],
)
def test_missing_gpu_or_weights_says_what_to_do(tmp_path, args, message):
    result = run_cli(*args, f"output_dir={tmp_path}")
    assert result.returncode == 2
    assert message in result.stderr and "dry_run=true" in result.stderr
    assert "Traceback" not in result.stderr


def test_mixture_of_experts_attention_only_lora_keeps_experts_frozen(tmp_path):
    """Named attention targets on a MoE: experts and routers stay exactly as loaded (expert adapters
    under all-linear are tests/test_experts.py's)."""
    from conftest import build_tiny_model

    moe = build_tiny_model(
        tmp_path / "tiny-gpt-oss", arch="gpt_oss", num_local_experts=4, num_experts_per_tok=2, head_dim=16
    )
    cfg = compose(
        tiny_overrides(
            moe,
            tmp_path / "runs",
            "model=gpt-oss-20b",
            "model.name=test-moe",
            f"model.name_or_path={moe}",
            "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
        )
    )
    result = pipeline.run(cfg)
    # gpt-oss's attention sinks have no SDPA path in transformers: finetune.attention's runs
    assert result.model.config._attn_implementation == attention.NAME
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable and all("self_attn" in n and "lora_" in n for n in trainable)
    experts = {
        n: p
        for n, p in result.model.named_parameters()
        if ("experts" in n or "router" in n) and "lora" not in n
    }
    original = _original_weights(moe)
    assert experts and all(torch.equal(p.detach(), original[_base_name(n)]) for n, p in experts.items())
    assert any(p.abs().sum() > 0 for n, p in result.model.named_parameters() if "lora_B" in n)


def test_vision_language_model_trains_on_image_chats(tmp_path):
    import json as _json

    from conftest import build_tiny_vlm
    from PIL import Image

    vlm = build_tiny_vlm(tmp_path / "tiny-qwen2-vl")
    rows = []
    for i, colour in enumerate(["red", "blue"] * 6):
        Image.new("RGB", (56, 56), colour).save(tmp_path / f"{colour}{i}.png")
        rows.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": f"{colour}{i}.png"},
                            {"type": "text", "text": "what colour is this shape"},
                        ],
                    },
                    {"role": "assistant", "content": f"a {colour} square"},
                ]
            }
        )
    data = tmp_path / "image_chats.jsonl"
    data.write_text("\n".join(_json.dumps(r) for r in rows))
    cfg = compose(
        tiny_overrides(
            vlm,
            tmp_path / "runs",
            "model=qwen2-vl-7b",
            "model.name=test-vlm",
            f"model.name_or_path={vlm}",
            "model.gguf_file=null",
            "data=file",
            f"data.path={data}",
            "data.max_length=512",
            "batch.grad_accum=1",
        )
    )
    result = pipeline.run(cfg)
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable and all(
        "lora_" in n and "visual" not in n for n in trainable
    )  # the vision tower stays frozen
    from transformers import AutoModelForImageTextToText

    # checkpoints keep the pre-v5 key layout: compare with a fresh load, which maps the names
    original = dict(AutoModelForImageTextToText.from_pretrained(vlm).named_parameters())
    vision = {n: p for n, p in result.model.named_parameters() if "visual" in n}
    assert vision and all(torch.equal(p.detach(), original[_base_name(n)]) for n, p in vision.items())
    assert any(p.abs().sum() > 0 for n, p in result.model.named_parameters() if "lora_B" in n)
    assert (result.run_dir / "adapter" / "processor_config.json").is_file()  # the processor is saved with it
