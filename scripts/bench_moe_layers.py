"""What gpt-oss-20b's layers keep for backward, and how long a step of them takes, at real width on CPU.

    python scripts/bench_moe_layers.py                 # 1,024 tokens, 5 repeats (~2 min on two cores)
    python scripts/bench_moe_layers.py --tokens 512 --repeats 3

1. Attention (one layer: 64 heads of 64, 8 key/value heads, sinks): transformers' eager code against
   finetune.attention's SDPA with sinks. Bytes kept for backward (saved tensors, weights excluded) and
   forward+backward time, the median of the repeats.
2. Experts (finetune.experts' NF4 twin with per-expert LoRA r16, gpt-oss widths, top-4 routing; 8 of
   the 32 experts, which changes the tokens per expert, not the bytes per (token, expert) pair): the
   loop as it is against the loop as it was before this change (gate kept whole, index_add_, a
   gathered input per pair), rebuilt here from the module's own pieces as the baseline.

Memory on a GPU differs in the kernels (the fused SDPA kernel there, PyTorch's CPU kernel here) but not
in what autograd keeps; the timings are CPU timings, ratios only.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from finetune import attention, experts


def kept_bytes(fn, weights) -> int:
    """Bytes autograd keeps for backward while fn() runs forward (each storage once, weights excluded)."""
    skip = {w.untyped_storage().data_ptr() for w in weights}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.float().sum().backward()
    return sum(seen.values())


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn().float().sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def attention_layer(tokens: int, repeats: int) -> None:
    from transformers import AutoModelForCausalLM, GptOssConfig

    attention.register()
    config = GptOssConfig(
        hidden_size=2880,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        num_local_experts=2,
        num_experts_per_tok=1,
        vocab_size=64,
        layer_types=["full_attention"],
    )
    rows = []
    for impl in ("eager", attention.NAME):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(
            copy.deepcopy(config), attn_implementation=impl, dtype=torch.bfloat16
        )
        layer = model.model.layers[0].self_attn
        hidden = torch.randn(1, tokens, 2880, dtype=torch.bfloat16, requires_grad=True)
        pos = torch.arange(tokens)[None]
        rope = model.model.rotary_emb(hidden, pos)
        mask = None  # causal, no padding: transformers' own skip for both
        if impl == "eager":
            mask = torch.full((tokens, tokens), float("-inf")).triu(1)[None, None].to(torch.bfloat16)

        def step(layer=layer, hidden=hidden, rope=rope, mask=mask):
            return layer(hidden, position_embeddings=rope, attention_mask=mask)[0]

        weights = list(layer.parameters())
        rows.append((impl, kept_bytes(step, weights), timed(step, repeats)))
    base = rows[0]
    print(f"\nattention, one gpt-oss layer, {tokens} tokens (bf16, CPU)")
    print("| attention | kept for backward | vs eager | fwd+bwd (median) | vs eager |")
    print("| --- | --- | --- | --- | --- |")
    for impl, mem, sec in rows:
        print(
            f"| {impl} | {mem / 2**20:.1f} MiB | {mem / base[1]:.3f} | {sec * 1000:.0f} ms | {sec / base[2]:.2f} |"
        )


def _before(self, hidden_states, top_k_index, top_k_weights):
    """The expert loop before this change: the whole gate kept, index_add_, a gathered input per pair."""
    out = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit[:, 0].tolist():
        if e == self.num_experts:
            continue
        pos, tok = torch.where(mask[e])
        h = self._apply_gate(self._project("gate_up_proj", e, hidden_states[tok]))
        y = self._project("down_proj", e, h) * top_k_weights[tok, pos, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def experts_layer(tokens: int, repeats: int) -> None:
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    n_experts, top_k = 8, 4
    config = GptOssConfig(hidden_size=2880, intermediate_size=2880, num_local_experts=n_experts)
    torch.manual_seed(0)
    original = GptOssExperts(config).to(torch.bfloat16)
    for p in original.parameters():
        torch.nn.init.normal_(p, std=0.02)
    twin = experts.QuantizedExperts(original, "4bit", device="cpu")
    twin.add_adapters(16, 32, ("gate_up_proj", "down_proj"), torch.bfloat16)
    for name, p in twin.named_parameters():
        p.requires_grad_("lora" in name)
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    hidden = torch.randn(tokens, 2880, dtype=torch.bfloat16, requires_grad=True)
    index = torch.stack([torch.randperm(n_experts)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, dtype=torch.bfloat16, requires_grad=True)
    kept = [*twin.parameters(), *twin.buffers()]
    rows = []
    for label, forward in (("before", _before), ("now", type(twin).forward)):

        def step(forward=forward):
            return forward(twin, hidden, index, weights)

        rows.append((label, kept_bytes(step, kept), timed(step, repeats)))
    base = rows[0]
    pairs = tokens * top_k
    print(f"\nexperts, gpt-oss widths, NF4 + LoRA r16, {tokens} tokens x top-{top_k} (bf16, CPU)")
    print(
        "| expert loop | kept for backward | per (token, expert) pair | vs before | fwd+bwd (median) | vs before |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for label, mem, sec in rows:
        print(
            f"| {label} | {mem / 2**20:.1f} MiB | {mem / pairs / 1024:.1f} KiB | {mem / base[1]:.3f} | "
            f"{sec * 1000:.0f} ms | {sec / base[2]:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    attention_layer(args.tokens, args.repeats)
    experts_layer(args.tokens, args.repeats)


if __name__ == "__main__":
    main()
