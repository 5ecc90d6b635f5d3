"""PyTorch SDPA for attention with sinks (gpt-oss), which transformers runs only eagerly.

A sink is one learned logit per head that joins every query's softmax and carries no value: it
takes a share of the attention away from the keys. transformers' gpt-oss class has no SDPA path, so
``attn_implementation=sdpa`` used to fall back to eager attention, which holds several
(heads x tokens x tokens) tensors per layer: about 0.75 GiB at 1,024 tokens and 12 GiB at 4,096.

Here the sink becomes one extra key, exactly: every query gets an extra channel holding
``sink / scaling`` for its head, every key a zero in that channel, and an appended key is zero
everywhere but a one there, with a zero value. Its score is the sink logit, its value adds nothing,
and the softmax is the sink softmax. SDPA's fused kernels (memory-efficient, or flash where the mask
allows) then keep only q, k, v, the output and the log-sum-exp. The head dimension is padded to a
multiple of 8, which the fused kernels need. Without a padding or sliding-window mask, a dummy query
placed before the first one turns the shifted causal pattern back into SDPA's plain ``is_causal``.

``implementation`` maps ``sdpa`` to the registered name for a model class that takes sinks and has
no SDPA of its own; the estimator plans those layers like SDPA's (memory/activations.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "sink_attention"  # registered with transformers (a name without "sdpa": transformers tests substrings)
ALIGN = 8  # head-dimension multiple the fused SDPA kernels take


def sdpa_with_sinks(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, s_aux=None, **kwargs
):
    """transformers' attention-function signature: query [B, H, Sq, D], key/value [B, Hkv, Sk, D],
    ``attention_mask`` the boolean [B, 1, Sq, Sk] mask of transformers' sdpa_mask, or None for plain
    causal attention (or a single query that sees every key). Returns ([B, Sq, H, D], None)."""
    if s_aux is None:
        raise ValueError(f"{NAME} is attention with sinks: this layer passed none")
    B, H, Sq, D = query.shape
    Sk = key.shape[2]
    groups = H // key.shape[1]
    if groups > 1:  # the memory-efficient kernel has no grouped-query path: share keys explicitly
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = D**-0.5 if scaling is None else scaling
    width = -(-(D + 1) // ALIGN) * ALIGN
    pad = width - D - 1

    sink = (s_aux.to(query.dtype) / scaling).view(1, H, 1, 1).expand(B, H, Sq, 1)
    q = torch.cat([query, sink, query.new_zeros(B, H, Sq, pad)], dim=-1)
    k = F.pad(key, (0, width - D))
    v = F.pad(value, (0, width - D))
    sink_key = k.new_zeros(B, H, 1, width)
    sink_key[..., D] = 1
    none = v.new_zeros(B, H, 1, width)

    causal = attention_mask is None and Sq == Sk and Sq > 1
    if causal:
        # sink first, then the keys; a dummy first query makes query i+1 see the sink and keys 0..i
        k, v = torch.cat([sink_key, k], dim=2), torch.cat([none, v], dim=2)
        q = torch.cat([q.new_zeros(B, H, 1, width), q], dim=2)
        mask = None
    else:
        k, v = torch.cat([k, sink_key], dim=2), torch.cat([v, none], dim=2)
        mask = attention_mask
        if mask is None and Sq > 1:  # queries after a cache: causal, aligned to the last key
            mask = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(Sk - Sq).expand(B, 1, Sq, Sk)
        if mask is not None:
            if mask.dtype != torch.bool:
                raise ValueError(f"{NAME} takes transformers' boolean sdpa mask, got {mask.dtype}")
            mask = torch.cat([mask, mask.new_ones(*mask.shape[:-1], 1)], dim=-1)  # the sink: always seen
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=causal
    )
    if causal:
        out = out[:, :, 1:]
    return out[..., :D].transpose(1, 2).contiguous(), None


def register() -> None:
    """Make NAME loadable by transformers (idempotent): the function above, and sdpa's boolean masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, sdpa_with_sinks)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def implementation(requested: str, arch: dict) -> str:
    """What to pass transformers for model.attn_implementation: NAME where the model's attention has
    sinks and its class no SDPA of its own, else the request itself."""
    from finetune import memory

    a = memory.describe(arch)
    if requested != "sdpa" or a.sdpa_supported or not a.sinks:
        return requested
    register()
    return NAME
