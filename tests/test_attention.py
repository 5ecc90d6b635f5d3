"""finetune.attention: SDPA with gpt-oss's attention sinks, exact against transformers' eager code."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import compose

from finetune import UserError, attention, autofit, memory, source

HEADS, SEQ = 4, 96


@pytest.fixture(scope="module")
def pair():
    """The same tiny gpt-oss (one sliding-window layer of 8, one full layer; grouped keys) twice: with
    transformers' eager attention and with finetune's. Sinks drawn large so that they matter."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    attention.register()
    config = GptOssConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=300,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(
        copy.deepcopy(config), attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        for layer in eager.model.layers:
            layer.self_attn.sinks.normal_(0, 2)
    ours = AutoModelForCausalLM.from_config(
        copy.deepcopy(config), attn_implementation=attention.NAME, dtype=torch.float32
    )
    ours.load_state_dict(eager.state_dict())
    assert ours.config._attn_implementation == attention.NAME
    return eager, ours


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (2, 21))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: the mask path (and a row whose first queries see no key but the sink)
    return ids, mask


def test_logits_match_eager(pair):
    eager, ours = pair
    ids, mask = _batch()
    with torch.no_grad():
        for attention_mask in (None, mask):  # None: the is_causal path with the dummy first query
            want = eager(input_ids=ids, attention_mask=attention_mask).logits
            got = ours(input_ids=ids, attention_mask=attention_mask).logits
            keep = slice(None) if attention_mask is None else mask.bool()
            assert torch.allclose(got[keep], want[keep], atol=1e-5), (got[keep] - want[keep]).abs().max()


def test_gradients_match_eager_sinks_included(pair):
    eager, ours = pair
    ids, mask = _batch()
    for model in pair:
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    grads = dict(ours.named_parameters())
    for name, p in eager.named_parameters():
        assert torch.allclose(grads[name].grad, p.grad, atol=1e-5), name
    assert eager.model.layers[0].self_attn.sinks.grad.abs().sum() > 0


def test_generation_with_a_cache_matches_eager(pair):
    ids, _ = _batch()
    out = [m.eval().generate(ids[:1], max_new_tokens=12, do_sample=False) for m in pair]
    assert torch.equal(out[0], out[1])


def test_keeps_no_heads_x_tokens_x_tokens_tensor(pair):
    """What autograd keeps for backward: eager attention holds the (heads x S x S) probabilities of every
    layer; ours only q, k, v, the output and the (S x S, 1-byte) window mask. On a GPU the same call
    runs the fused memory-efficient kernel; here it is PyTorch's CPU kernel."""
    ids = torch.randint(0, 300, (1, SEQ))
    largest = {}
    for model in pair:
        params = {p.data_ptr() for p in model.parameters()}
        sizes = []

        def pack(t, sizes=sizes, params=params):
            if t.data_ptr() not in params:
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.train()(input_ids=ids).logits.sum()
        largest[model.config._attn_implementation] = max(sizes)
    assert largest["eager"] >= HEADS * SEQ * SEQ
    assert largest[attention.NAME] < HEADS * SEQ * SEQ / 2


def test_sdpa_maps_to_the_sink_kernel_for_gpt_oss_only():
    gpt_oss = source.architecture(compose(["model=gpt-oss-20b"]).model)
    llama = source.architecture(compose(["model=llama-3-8b"]).model)
    assert attention.implementation("sdpa", gpt_oss) == attention.NAME
    assert attention.implementation("eager", gpt_oss) == "eager"
    assert attention.implementation("sdpa", llama) == "sdpa"
    assert "flash_attention_2" not in memory.attention_implementations(gpt_oss)  # it would drop the sinks


def test_plan_picks_sdpa_and_refuses_flash_attention_for_sinks():
    same = [
        "model=gpt-oss-20b",
        "hw=a100-80gb",
        "batch.size=1",
        "data.max_length=4096",
        "train.gradient_checkpointing=true",
    ]
    plan = autofit.resolve(compose(same))
    assert plan.cfg.model.attn_implementation == "sdpa"
    assert any(row[0] == "attention" and "sinks" in row[2] for row in plan.decisions)
    eager = autofit.resolve(compose([*same, "model.attn_implementation=eager"]))
    # eager keeps heads x S x S probabilities (64 x 4096 x 4096 x 2 bytes = 2 GiB) in the layer it rebuilds
    assert plan.estimate.activations_gib < eager.estimate.activations_gib - 2
    with pytest.raises(UserError, match="no attention sinks"):
        autofit.resolve(
            compose(["model=gpt-oss-20b", "hw=a100-80gb", "model.attn_implementation=flash_attention_2"])
        )
