"""Activation memory: the tensors autograd saves for backward, plus the largest backward working set.

Per decoder layer the accounting is a small table of mechanisms, matched from the module reading
(see ``arch.py``): what attention keeps (q, k, v, output and logsumexp for SDPA/flash; the S x S
probabilities for eager), what a Linear's backward needs (its input, for LoRA's A or the weight
gradient), what each norm keeps (its fp32 input), what a plain, gated or composite-GELU MLP keeps,
what a (token, expert) pair keeps, and the parallel block (attention and MLP share one norm output),
post-norms, q/k norms, soft-capping and attention sinks. A layer with parts outside the table gets a
conservative estimate: every Linear keeps its input and its output. Every other number comes from
HF's modeling code under bf16 autocast; scripts/fake_tensor_check.py verifies it against MemTracker.
"""

from __future__ import annotations

from finetune.memory.arch import Arch, Layer, Linear
from finetune.memory.settings import DTYPE_BYTES, TRL_LOGPROB_TILE, Settings
from finetune.memory.tensors import (
    adapted,
    adapter_bytes,
    expert_dequant_bytes,
    expert_lora,
    head_trained,
    quantized,
    twinned,
    unquantized_bytes,
)

UNKNOWN_MARGIN = 1.25  # a layer outside the table: its Linears' inputs and outputs, plus a quarter


def phases(a: Arch, s: Settings) -> dict[str, float]:
    """Activation bytes alive at the candidate peaks of one step.

    Phases: ``lm_fwd`` (loss computed, end of forward), ``lm_bwd`` (loss gradient), ``layer_fwd`` (a
    decoder layer running forward, for transients such as DoRA's), ``layer_bwd`` (the last layer
    recomputed and back-propagated).
    """
    B, S = s.batch_size, s.seq_len
    t = B * S
    h = a.hidden
    autocast = s.dtype != "float32"  # HF Trainer runs bf16/fp16 under torch.autocast
    c = DTYPE_BYTES[s.dtype]  # bytes of tensors computed by matmuls
    rb = unquantized_bytes(s)  # residual stream: it starts at the embedding, in the weights' dtype
    full = s.lora_r is None
    adapted_names = {x[0] for x in adapted(a, s)}
    eager = s.attn == "eager" or (s.attn == "sdpa" and not (a.sdpa_supported or a.sinks))
    # gpt-oss's sliding-window layers build a boolean mask whatever the batch
    masked = a.encoder or eager or (s.attn == "sdpa" and (B > 1 and not s.packed or a.sinks))

    per_layer = [_layer(a, layer, s, adapted_names, eager, masked) for layer in a.layers]
    # bitsandbytes dequantizes a quantized weight to compute dtype for each matmul's backward
    dequant = c * max((m.in_f * m.out_f for m in a.modules if quantized(s, m)), default=0)
    dequant = max(dequant, expert_dequant_bytes(a, s))  # finetune.experts: one expert's matrix

    # ---- autocast copies of fp32 weights: kept (cached) until the forward ends, and saved by
    # their matmuls, i.e. for the whole step without checkpointing
    ab = adapter_bytes(s)
    fp32_trainable = autocast and (full and rb == 4 or not full and ab == 4)
    casts = [
        c * _trainable_matmul_params(a, layer, s, adapted_names) if fp32_trainable else 0.0
        for layer in a.layers
    ]
    head_fp32 = autocast and rb == 4 and not a.encoder  # amp master weights or kbit fp32 upcast
    cast_head = c * a.vocab * h if head_fp32 else 0.0

    # ---- the LM head and loss, bytes per token
    lm_head_adapted = any(x.split(".")[-1] in ("lm_head", "embed_out") for x in adapted_names)
    head_in = c * h if (head_trained(a, s) or lm_head_adapted) else 0
    final_norm = (0 if a.encoder else _norm_saved(a, s, h)) + head_in
    V = 0 if a.encoder else a.vocab
    if s.loss_impl == "full":
        # HF: logits in compute dtype, upcast to fp32 for cross-entropy, whose log-softmax output is
        # kept; accelerate returns another fp32 copy of the logits. Backward: the NLL gradient and
        # the log-softmax gradient (both fp32 t x V) while the saved log-softmax is still alive.
        soft = c if a.final_softcap else 0  # tanh output of logit soft-capping
        lm_fwd = V * ((c if autocast else 0) + 8 + soft)
        lm_bwd = V * (12 + soft)
    elif s.loss_impl == "chunked":
        # logits produced in 8 chunks, each upcast and cross-entropied; the log-softmax outputs stay
        lm_fwd, lm_bwd = V * (c + 4 + 4 / 8), V * (4 + 8 / 8)
    else:  # fused (TRL chunked log-prob / Liger / cut-cross-entropy): a tile instead of the logits
        tile = min(t, TRL_LOGPROB_TILE[0]) * min(V, TRL_LOGPROB_TILE[1]) * c / t
        lm_fwd, lm_bwd = tile, tile + 4 * h  # + fp32 gradient of the hidden states
        if head_in:  # fp32 accumulator of the LM head weight gradient
            lm_bwd += 4 * V * h / t

    # ---- whole model
    ckpt_input = 0 if s.offload_activations else rb * h  # non-reentrant checkpoint keeps the layer input
    n_layers = sum(layer.count for layer in a.layers)
    if s.grad_ckpt:  # one layer at a time is rebuilt in backward, on top of the kept layer inputs
        kept = n_layers * ckpt_input * t
        casts_fwd = sum(layer.count * cast for layer, cast in zip(a.layers, casts))
        rebuilt = [x["layer"] * t + x["fixed"] for x in per_layer]
        fwd_layer = max(rebuilt, default=0.0)
        bwd_layer = max(
            (r + x["bwd"](t) + cast for r, x, cast in zip(rebuilt, per_layer, casts)), default=0.0
        )
    else:
        kept = sum(
            layer.count * (x["layer"] * t + x["fixed"] + cast)
            for layer, x, cast in zip(a.layers, per_layer, casts)
        )
        casts_fwd = fwd_layer = 0.0
        bwd_layer = max((x["bwd"](t) for x in per_layer), default=0.0)
    shared = (B * S * S * (1 if s.attn != "eager" else c)) if masked else 0  # 4-D attention mask
    base = kept + shared + _vision(a, s, c, rb)
    dora = _dora_transient(a, s, c, adapted_names) if s.use_dora else 0.0
    return {
        "lm_fwd": base + casts_fwd + cast_head + (final_norm + lm_fwd) * t,
        "lm_bwd": base + cast_head + (final_norm + lm_bwd) * t,
        "layer_fwd": base + casts_fwd + fwd_layer + max(dora, dequant),
        "layer_bwd": base + bwd_layer + max(dora if s.grad_ckpt else 0, dequant),
    }


def _norm_saved(a: Arch, s: Settings, width: int) -> float:
    """RMSNorm upcasts to fp32 and keeps that copy; LayerNorm autocasts to fp32 and keeps its input.
    A trainable weight also keeps the normalised tensor."""
    full = s.lora_r is None
    trainable = 0 if not full else (4 if a.norm_fp32_scale else unquantized_bytes(s)) * width
    return 4 * width + trainable


def _layer(a: Arch, L: Layer, s: Settings, names: set[str], eager: bool, masked: bool) -> dict:
    """Bytes per token one layer keeps (``layer``), bytes independent of the tokens (``fixed``), and its
    backward working set as a function of the token count (``bwd``)."""
    S = s.seq_len
    h = a.hidden
    autocast = s.dtype != "float32"
    c = DTYPE_BYTES[s.dtype]
    rb = unquantized_bytes(s)
    ab = adapter_bytes(s)
    full = s.lora_r is None
    norm_out = 4 if (a.norm_kind == "layer" and autocast) else rb  # LayerNorm autocasts to fp32
    mid = c if autocast else 4  # tensors produced inside the block (attention output, MLP product)

    def inputs_saved(src: int, lins: tuple[Linear, ...]) -> float:
        """Bytes/token that the Linears reading one tensor (of ``src`` bytes/elt) keep for backward."""
        shared, per_module = False, 0.0
        for lin in lins:
            if s.quant == "8bit" and quantized(s, lin):
                shared = True  # bitsandbytes' int8 matmul keeps its input for backward
            if full:  # the weight gradient needs the input, in compute dtype
                if not autocast or src == c:
                    shared = True
                else:  # autocast casts non-leaf inputs afresh for every op
                    per_module += c * lin.in_f
            elif lin.name in names:
                # PEFT casts x to the adapter dtype (4-bit layers skip that under autocast), then
                # autocast casts it to the compute dtype for lora_A, which keeps it for backward
                x = src if (s.quant == "4bit" and autocast) else ab
                final = c if autocast else x
                if s.lora_dropout > 0:  # dropout mask (1 byte on CUDA) + the dropped-out copy
                    per_module += lin.in_f * (1 + final)
                elif x != src or final != x:
                    per_module += final * lin.in_f
                else:
                    shared = True
                per_module += s.lora_r * (c if autocast else ab)  # lora_A output, kept by lora_B
                if s.use_dora:  # base and LoRA results, kept for the magnitude gradient
                    per_module += 2 * c * lin.out_f
        return per_module + (src * lins[0].in_f if shared and lins else 0)

    if L.unknown:
        # outside the table: every Linear keeps its input and output, each norm its fp32 input,
        # attention its q, k, v, output (or the eager probabilities), with a margin on top
        lins = L.linears
        layer = sum(c * (x.in_f + x.out_f) + inputs_saved(c, (x,)) for x in lins)
        layer += _norm_saved(a, s, h) * max(L.norms, 1) + 4 * h
        if eager:
            layer += a.heads * S * (c + 4)
        layer += _experts_saved(a, L, s, c, rb, full)
        layer *= UNKNOWN_MARGIN
        biggest = max((x.out_f for x in lins), default=h)
        return {
            "layer": layer,
            "fixed": _experts_fixed(a, L, s, rb)[0],
            "bwd": lambda t: (layer + 4 * c * biggest + 2 * rb * h) * t,
        }

    q, kv, nh = L.q_dim, L.kv_dim, a.heads
    sink_sdpa = L.sinks and s.attn == "sdpa"  # finetune.attention: keys shared explicitly, head dim padded
    # SDPA's own grouped-query path needs no mask
    repeat_kv = eager or sink_sdpa or (s.attn == "sdpa" and masked and kv < q)
    kv_saved = q if repeat_kv else kv

    # ---- attention block of one layer, bytes per token
    attn = _norm_saved(a, s, h) * L.attn_norms
    attn += inputs_saved(norm_out, L.qkv + (L.ups if L.parallel else ()))
    v_storage = (q + 2 * kv) if L.fused_qkv else kv_saved  # V is a view into the fused output
    attn += c * (q + kv_saved) + c * v_storage  # q, k (after RoPE) and v kept by attention
    if L.qk_norm:  # q/k norms keep their fp32 inputs (and the normalised copy when trained)
        attn += _norm_saved(a, s, q + kv)
    if eager:
        # scores -> softmax -> (dropout) -> matmul with V. HF upcasts the softmax to fp32 (explicitly,
        # or autocast does), except gpt-oss whose sink softmax stays in compute dtype; the matmul
        # keeps its input in compute dtype, a fresh copy whenever a cast or dropout intervenes.
        sm = c if (L.sinks or not autocast) else 4
        probs = sm
        if a.dropout > 0:
            probs += 1 + (c if autocast else sm)  # mask (1 byte on CUDA) + the dropped-out copy
        elif sm != c:
            probs += c
        if a.attn_softcap:
            probs += c  # tanh output
        attn += nh * S * probs
        attn_bwd = nh * S * (c + 4)  # gradients of the probabilities and of the fp32 scores
    else:
        attn += c * q + 4 * nh  # attention output + logsumexp
        attn_bwd = c * (2 * q + 2 * kv_saved)  # gradients of q, k, v and of the output
        if sink_sdpa:  # q, k, v and the output padded by the sink channel; the layer's mask + sink column
            pad = nh * (-(-(a.head_dim + 1) // 8) * 8) - q  # finetune.attention.ALIGN; masks pad to 16
            attn += c * 4 * pad + c * (-(-(S + 1) // 16) * 16)
            attn_bwd += c * 4 * pad
    attn += inputs_saved(mid, L.o)
    if a.hidden_dropout > 0:
        attn += h  # residual dropout mask (1 byte)

    # ---- MLP block
    mlp = _norm_saved(a, s, h) * (L.norms - L.attn_norms)
    fixed = bwd_fixed = 0.0  # bytes independent of the token count
    mlp_bwd = 0.0
    if L.experts:
        mlp += _experts_saved(a, L, s, c, rb, full)
        mlp_bwd = c * 3 * L.expert_inter * L.top_k
        fixed, bwd_fixed = _experts_fixed(a, L, s, rb)
    if L.ups:
        if not L.parallel:
            mlp += inputs_saved(norm_out, L.ups)
        mlp += c * L.inter * ((2 + L.act_copies) if L.gated else L.act_copies)
        mlp += inputs_saved(mid, L.down)
        mlp_bwd = max(mlp_bwd, c * L.inter * (3 if L.gated else 2))
    if L.shared_ups:  # the shared expert: a gated MLP on every token, reading the same norm output
        mlp += inputs_saved(norm_out, L.shared_ups) + c * L.shared_inter * (2 + L.act_copies)
        mlp += inputs_saved(mid, L.shared_down)
    if a.hidden_dropout > 0:
        mlp += h
    layer = attn + mlp

    # Backward of a layer on top of its saved tensors: the MLP runs first (with everything saved),
    # then attention (the MLP's tensors released); the residual-stream gradient flows in and out.
    def bwd(t: int) -> float:
        return max(mlp_bwd * t + bwd_fixed, attn_bwd * t - mlp * t - fixed) + 2 * rb * h * t

    return {"layer": layer, "fixed": fixed, "bwd": bwd}


def _experts_saved(a: Arch, L: Layer, s: Settings, c: int, rb: int, full: bool) -> float:
    """Eager expert loop over t*k (token, expert) pairs: gate_up output and activation intermediates
    (only gate_up under finetune.experts),
    the expert output kept by the routing-weight multiply, the fp32 router softmax. Frozen experts
    (finetune.experts' dequantizing matmul, or a frozen 16-bit stack) keep no matmul input; trained
    ones keep both inputs, and per-expert LoRA (x @ A then @ B, on the activations) also both A outputs."""
    if not L.experts:
        return 0.0
    h, ffn = a.hidden, L.expert_inter
    lora = expert_lora(a, s)
    train = full or lora
    # finetune.experts recomputes the gate from its gate_up input (2 x ffn) in backward
    per_pair = c * (2 if twinned(a, s) else L.expert_saved) * ffn + c * h
    if train:
        per_pair += c * (h + ffn)  # inputs of both expert matmuls, for the weight / A gradients
    shared_in = 0
    if lora and twinned(a, s):  # finetune.experts' first A reads the layer input, kept once a token
        per_pair -= c * h
        shared_in = rb * h
    if lora and twinned(a, s):  # x @ A outputs of both stacks, kept by the B matmuls
        per_pair += c * 2 * s.lora_r
    # kept for the router weight gradient; finetune.experts' runs leave the router frozen
    router_in = rb * h if full or (lora and not twinned(a, s)) else 0
    return L.top_k * per_pair + 8 * L.experts + router_in + shared_in


def _experts_fixed(a: Arch, L: Layer, s: Settings, rb: int) -> tuple[float, float]:
    """PEFT (16-bit runs) folds LoRA factors into the expert stacks, W' = W + B@A (one baddbmm per
    stack, in the weights' dtype), and the expert matmuls keep W' for backward. Backward then builds
    the full gradient of the gate_up stack once the down stack's W' has been released.
    finetune.experts (quantized runs) never builds W'."""
    if not L.experts or not expert_lora(a, s) or twinned(a, s):
        return 0.0, 0.0
    return rb * L.experts * 3 * a.hidden * L.expert_inter, rb * L.experts * a.hidden * L.expert_inter


def _trainable_matmul_params(a: Arch, L: Layer, s: Settings, names: set[str]) -> int:
    """Per decoder layer: trainable parameters that feed a matmul (what autocast casts)."""
    if s.lora_r is None:
        return sum(x.params for x in L.linears) + L.experts * 3 * a.hidden * L.expert_inter
    return sum(s.lora_r * (x.in_f + x.out_f) for x in L.linears if x.name in names)


def _dora_transient(a: Arch, s: Settings, c: int, names: set[str]) -> float:
    """DoRA rebuilds each adapted weight every forward: an identity matrix (in x in, fp32 and its
    autocast copy) pushed through the adapter, then fp32 copies of W, B@A and their sum for the
    column norms. The largest module sets the transient."""
    worst = 0.0
    for m in a.modules:
        if m.name in names and m.kind == "linear":
            i, o = m.in_f, m.out_f
            worst = max(worst, i * i * (4 + c) + c * i * o, i * i * c + 16 * i * o)
    return worst


def _vision(a: Arch, s: Settings, c: int, rb: int) -> float:
    """The vision tower over ``image_patches`` per sample. A block keeps what a decoder layer does:
    two LayerNorm inputs in fp32, the fused qkv output, q/k after RoPE, attention output and
    logsumexp, fc1 output with its activation pieces (fc2 input); then the 2x2 patch merger. Modelled
    on Qwen2-VL; not covered by the fake-tensor check, which runs text-only models."""
    v = a.vision
    if not v or not s.image_patches:
        return 0.0
    p = s.batch_size * s.image_patches
    ed, m = v.embed_dim, v.mlp_dim
    block = 2 * 4 * ed + c * (3 * ed + 2 * ed + ed) + 4 * v.heads + c * 3 * m
    if s.lora_r is not None:
        block += c * (2 * ed + m)  # adapter input casts: qkv, proj, fc2 (fc1 reads a LayerNorm too)
    kept = v.depth * (rb * ed if s.grad_ckpt else block) * p
    recompute = block * p if s.grad_ckpt else 0
    merger = (4 + c) * ed * p  # its LayerNorm input (fp32) and the merged MLP input
    return kept + recompute + merger
