"""A byte-level BPE tokenizer (GPT-2 style: Llama 3, Qwen2, SmolLM, ...) as GGUF vocabulary metadata:
tokens, merges, token types, special token ids, the pre-tokenizer's name and the chat template.

llama.cpp does not read a tokenizer.json: it names its pre-tokenizer (the regex that splits text
before the merges) by a fixed set of names, so only splits we can name exactly are exported.
"""

from __future__ import annotations

import json
from typing import Any

from finetune import UserError

_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = _QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
# llama.cpp's names for the splits a Split pre-tokenizer's regex spells out
_SPLITS = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5  # gguf.TokenType values


def _steps(part: dict | None) -> list[dict]:
    """A tokenizer.json pipeline part as a flat list of its steps (Sequences unpacked)."""
    if not part:
        return []
    if part.get("type") == "Sequence":
        children = part.get("pretokenizers") or part.get("decoders") or part.get("normalizers") or []
        return [step for child in children for step in _steps(child)]
    return [part]


def pre_tokenizer_name(backend: dict) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer, or a UserError saying why there is none."""
    steps = _steps(backend.get("pre_tokenizer"))
    kinds = [s["type"] for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"  # GPT-2's split after single digits
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = _SPLITS.get(steps[0].get("pattern", {}).get("Regex", ""))
        if name:
            return name
    raise UserError(
        f"format=gguf: this tokenizer's pre-tokenizer ({' + '.join(kinds) or 'none'}) has no llama.cpp name "
        "we can vouch for (supported: GPT-2's, Llama 3's and Qwen2's splits). Use format=safetensors."
    )


def read(tokenizer: Any, n_vocab: int) -> dict:
    """Everything the GGUF writer needs about the vocabulary; refuses what llama.cpp would misread."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            "format=gguf needs a fast (tokenizer.json) tokenizer; this run's tokenizer is a slow one."
        )
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model") or {}
    decoders = [s["type"] for s in _steps(backend.get("decoder"))]
    if model.get("type") != "BPE" or "ByteLevel" not in decoders:
        kind = model.get("type", "unknown")
        raise UserError(
            f"format=gguf exports byte-level BPE vocabularies (GPT-2 style: Llama 3, Qwen2, SmolLM); this model's "
            f"is {kind}{'' if 'ByteLevel' in decoders else ' without byte-level decoding (SentencePiece style)'}. "
            "Use format=safetensors."
        )
    normalizers = [s["type"] for s in _steps(backend.get("normalizer"))]
    if any(n != "NFC" for n in normalizers):
        raise UserError(
            f"format=gguf: the tokenizer normalizes text ({', '.join(normalizers)}), which llama.cpp does not "
            "repeat for a byte-level vocabulary. Use format=safetensors."
        )
    pre = pre_tokenizer_name(backend)
    vocab = tokenizer.get_vocab()
    # A token past the embedding's last row (transformers' Qwen2 tokenizer adds <|endoftext|> to a
    # vocabulary that had none) can never reach the model: it is left out, and said so.
    beyond = sorted((index, token) for token, index in vocab.items() if index >= n_vocab)
    if len(vocab) - len(beyond) < n_vocab // 2:
        raise UserError(
            f"format=gguf: the tokenizer ({len(vocab)} tokens) does not match the model's embedding ({n_vocab} rows)."
        )
    for index, token in beyond:
        print(
            f"note: token {token!r} (id {index}) has no embedding row in the model; it is left out of the GGUF vocabulary."
        )
        del vocab[token]
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]  # rows no token uses (a padded embedding) stay named
    types = [_UNUSED] * n_vocab
    for token, index in vocab.items():
        tokens[index], types[index] = token, _NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        if index < n_vocab:
            types[index] = _CONTROL if added.special else _USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    specials = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return {
        "pre": pre,
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "specials": {k: v for k, v in specials.items() if v is not None and v < n_vocab},
        "add_bos": bool(probe) and specials["bos"] is not None and probe[0] == specials["bos"],
        "add_eos": bool(probe) and specials["eos"] is not None and probe[-1] == specials["eos"],
        "chat_template": template,
    }


def write(writer: Any, info: dict) -> None:
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(info["pre"])
    writer.add_token_list(info["tokens"])
    writer.add_token_types(info["types"])
    writer.add_token_merges(info["merges"])
    for name, index in info["specials"].items():
        getattr(writer, f"add_{name}_token_id")(index)
    writer.add_add_bos_token(info["add_bos"])
    writer.add_add_eos_token(info["add_eos"])
    if info["chat_template"]:
        writer.add_chat_template(info["chat_template"])
