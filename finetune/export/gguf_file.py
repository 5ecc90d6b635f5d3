"""A merged transformers decoder (llama, qwen2) as one GGUF file, through the `gguf` package: its
writer, its tensor-name maps and its numpy quantizers. Only layouts we can write exactly are
accepted; anything else (fused QKV, convolutions, MoE, rope scaling) is refused with one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune import UserError

# transformers model_type -> (gguf MODEL_ARCH member, rotary halves re-interleaved for llama.cpp)
ARCHS = {
    # llama.cpp's llama graph applies rope to adjacent pairs (x0,x1),(x2,x3)...; transformers pairs
    # each head's halves (x_i, x_{i+d/2}). Reordering q/k rows turns one into the other exactly.
    "llama": ("LLAMA", True),
    # qwen2 runs llama.cpp's NeoX rope, which pairs halves as transformers does: rows stay put.
    "qwen2": ("QWEN2", False),
}
QUANTS = ("f16", "q8_0", "bf16", "f32")


def _interleave_rotary_halves(rows, n_heads: int):
    """Per head, rows [0..d/2) and [d/2..d) become (0, d/2, 1, d/2+1, ...): rope on pairs of neighbours."""
    shape = rows.shape
    return rows.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def check_config(config: Any) -> tuple[Any, bool]:
    """(gguf arch, permute) for a config we can export, else a UserError naming what is in the way."""
    import gguf

    kind = config.model_type
    if kind not in ARCHS:
        raise UserError(
            f"format=gguf: cannot export a {kind} model (supported: {', '.join(ARCHS)}). "
            "Use format=safetensors, or llama.cpp's own convert_hf_to_gguf.py on the merged model."
        )
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(
            f"format=gguf: this {kind} model uses rope scaling ({rope.get('rope_type') or rope.get('type')}), "
            "which this exporter does not write yet. Use format=safetensors."
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UserError(f"format=gguf: hidden_act={config.hidden_act}; llama.cpp's {kind} graph uses silu.")
    if getattr(config, "use_sliding_window", False):
        raise UserError("format=gguf: sliding-window attention is not exported. Use format=safetensors.")
    arch, permute = ARCHS[kind]
    return getattr(gguf.MODEL_ARCH, arch), permute


def _metadata(writer: Any, config: Any, arch: Any, n_vocab: int, name: str) -> None:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(n_vocab)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != config.hidden_size:  # llama.cpp assumes hidden/heads otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _target_type(quant: str, data: Any):
    """The GGML type a tensor is stored as: vectors (norms, biases) stay F32, as llama.cpp expects;
    a matrix whose rows do not split into Q8_0 blocks of 32 falls back to F16."""
    import gguf

    t = gguf.GGMLQuantizationType
    if data.ndim < 2 or quant == "f32":
        return t.F32
    wanted = {"f16": t.F16, "bf16": t.BF16, "q8_0": t.Q8_0}[quant]
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if data.shape[-1] % block == 0 else t.F16


def write(model: Any, tokenizer: Any, path: Path, quant: str, name: str) -> dict:
    """Write `model` (merged, unquantized) and its tokenizer as a GGUF file at `path`. Returns counts."""
    import gguf

    from finetune.export import vocab

    config = model.config.get_text_config()
    arch, permute = check_config(config)
    state = model.state_dict()
    n_vocab = (
        state["model.embed_tokens.weight"].shape[0]
        if "model.embed_tokens.weight" in state
        else config.vocab_size
    )
    words = vocab.read(tokenizer, n_vocab)  # refuses an unsupported vocabulary before any tensor work
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    allowed = set(gguf.MODEL_TENSORS[arch])
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    heads, kv_heads = (
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    )

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    _metadata(writer, config, arch, n_vocab, name)
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}[quant]
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    if quant == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.write(writer, words)

    counts: dict[str, int] = {}
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        found = names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in allowed:
            raise UserError(
                f"format=gguf: the tensor {hf_name} has no place in llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} "
                "layout. Use format=safetensors."
            )
        kind, gguf_name = found
        data = tensor.detach().to("cpu").float().numpy()
        if permute and kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
            data = _interleave_rotary_halves(data, heads if kind == gguf.MODEL_TENSOR.ATTN_Q else kv_heads)
        qtype = _target_type(quant, data)
        writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts
