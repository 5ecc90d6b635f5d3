"""Read an architecture from transformers itself: build the model on the meta device and record its modules.

A *reading* is a plain JSON-able dict: every Linear/Conv1D with its shape, the parameters grouped for
the optimizer, the decoder layers grouped by structure, the experts, the norms, the vision tower, the
attention kernels the class supports, and what PEFT's ``all-linear`` adapts on that very model. The
estimator works from readings only, so planning needs neither torch nor transformers once a reading
exists: the catalog's readings ship inside the package (``readings.json``, written by
``scripts/write_readings.py``); any other architecture is read once (torch + transformers, a few
seconds) and kept in the user cache folder, keyed by a hash of its config's content.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path

from finetune import UserError

FORMAT = 2  # bump when the reading's layout or meaning changes: old cached readings are then ignored
SHIPPED = Path(__file__).with_name("readings.json")
TASKS = ("causal-lm", "sequence-classification")  # the second only for the calibration's BERT rows
PROBE_RANK = 4  # LoRA rank PEFT is run with while reading; adapter sizes are linear in the rank

# Config keys that say nothing about the architecture's shapes (provenance, tokens, quantization of a
# shipped checkpoint), dropped before hashing so equal architectures share a reading.
_IGNORED = {"quantization_config", "transformers_version", "architectures", "torch_dtype", "dtype"}


def clean(arch: dict) -> dict:
    return {k: v for k, v in arch.items() if not k.startswith("_") and k not in _IGNORED}


def key(arch: dict, task: str = "causal-lm") -> str:
    """Content hash of a config dict: the name of its reading."""
    text = json.dumps({"format": FORMAT, "task": task, "arch": clean(arch)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@lru_cache(maxsize=1)
def _shipped() -> dict:
    return json.loads(SHIPPED.read_text()) if SHIPPED.is_file() else {}


def _cache_file(k: str) -> Path:
    from finetune import cache_dir

    return cache_dir() / "readings" / f"{k}.json"


_memo: dict[str, dict] = {}


def reading(arch: dict, task: str = "causal-lm") -> dict:
    """The reading of ``arch``: shipped, cached, or read now (and cached)."""
    if not isinstance(arch, dict) or not isinstance(arch.get("model_type"), str):
        raise UserError(
            "the architecture has no 'model_type': pass the model's config.json (a dict with model_type, "
            "hidden_size, ...)"
        )
    k = key(arch, task)
    if k in _memo:
        return _memo[k]
    found = _shipped().get(k)
    if found is None:
        path = _cache_file(k)
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError):
            found = read(arch, task)
            _write_atomic(path, found)
    _memo[k] = found
    return found


def _write_atomic(path: Path, data: dict) -> None:
    """A reading is written aside and renamed, so concurrent runs never see half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a re-read next time


# --------------------------------------------------------------------------------------------
# Building the model
# --------------------------------------------------------------------------------------------


def _config(arch: dict):
    """The transformers config for ``arch``; the class fills whatever the dict leaves out."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    a = clean(arch)
    mt = a.pop("model_type")
    if mt not in CONFIG_MAPPING_NAMES:
        from difflib import get_close_matches

        near = get_close_matches(mt, list(CONFIG_MAPPING_NAMES), n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise UserError(
            f"model_type {mt!r} is not an architecture transformers knows{hint}: check config.json's "
            "model_type, or upgrade transformers (pip install -U transformers)"
        )
    try:
        return AutoConfig.for_model(mt, **a)
    except Exception as e:  # transformers validates configs with many exception types
        raise UserError(f"transformers rejects this {mt!r} config.json: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _model_class(config, task: str):
    from transformers.models.auto import modeling_auto as auto

    mt = config.model_type
    if task == "sequence-classification":
        return auto.AutoModelForSequenceClassification
    # encoders (BERT, RoBERTa, ...) also map to a causal head, usable only as a seq2seq decoder part
    encoder = mt in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    if mt in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not encoder:
        return auto.AutoModelForCausalLM
    if mt in auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return auto.AutoModelForImageTextToText
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(
            f"model_type {mt!r} is an encoder-decoder model: finetune trains causal (decoder-only) language "
            "models. Pick a decoder-only model (Llama, Qwen, Gemma, Mistral, ...)"
        )
    raise UserError(
        f"model_type {mt!r} has no causal language-model head in transformers (an encoder-only or other "
        "model): finetune trains causal (decoder-only) language models. Pick a decoder-only model"
    )


def build(arch: dict, task: str = "causal-lm"):
    """The transformers model of ``arch`` on the meta device: real modules, no memory, no weights."""
    import torch

    config = _config(arch)
    auto = _model_class(config, task)
    try:
        with torch.device("meta"):
            return auto.from_config(config)
    except UserError:
        raise
    except Exception as e:
        raise UserError(
            f"transformers cannot build model_type {config.model_type!r} from this config: {_first_line(e)}"
        ) from None


# --------------------------------------------------------------------------------------------
# Reading the modules
# --------------------------------------------------------------------------------------------

_LAYER_INDEX = re.compile(r"\.(\d+)(?=\.|$)")
_ATTENTION = re.compile(r"attn|attention|mixer", re.I)
_QK_NORM = re.compile(r"(^|_)(q|k|query|key|qk)_?(norm|layernorm|layer_norm)$")
_ROUTER = {"gate", "router", "gate_proj_router"}
_TOPK_KEYS = ("num_experts_per_tok", "experts_per_token", "moe_topk", "num_experts_per_token", "top_k")


def _pattern(name: str) -> str:
    """Module path with list indices as '*': one entry per repeated module."""
    return _LAYER_INDEX.sub(".*", name)


def _is_norm(module) -> bool:
    import torch

    return isinstance(module, torch.nn.LayerNorm) or "norm" in type(module).__name__.lower()


def _linear_shape(module):
    """(in, out, bias) of a Linear or transformers Conv1D, else None."""
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1], module.bias is not None
    return None


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if get else config


def _attr(cfg, *names, default=None):
    for n in names:
        try:
            v = getattr(cfg, n, None)
        except Exception:  # per-layer attributes (Gemma-4 head_dim) refuse a global read
            v = None
        if v is not None:
            return v
    return default


def _under(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


def _is_experts(path: list[str]) -> bool:
    """Inside a routed-experts container (not a shared expert, which every token runs)."""
    return any(s.startswith("experts") for s in path) and not any("shared" in s for s in path)


def read(arch: dict, task: str = "causal-lm") -> dict:
    """Build ``arch`` on the meta device and read it (imports torch, transformers and peft)."""
    import torch
    import transformers

    model = build(arch, task)
    config = model.config
    text = _text_config(config)
    vlm = task == "causal-lm" and getattr(config, "vision_config", None) is not None
    names = {id(m): n for n, m in model.named_modules()}
    emb = model.get_input_embeddings()
    emb_name = names[id(emb)]
    head = model.get_output_embeddings() if task == "causal-lm" else None
    head_name = names.get(id(head), "") if head is not None else ""
    tied = head is not None and head.weight is emb.weight
    decoder, layers_name = _decoder(model, emb_name)
    layers = list(model.get_submodule(layers_name)) if layers_name else []

    # ---- every parameter once (a tied weight is one parameter), into the count's buckets
    owner = {}
    for n, m in model.named_modules():
        for _, p in m.named_parameters(recurse=False):
            owner.setdefault(id(p), (n, m))
    buckets = dict.fromkeys(
        ("embeddings", "lm_head", "attention", "mlp", "experts", "router", "norms", "vision", "other"), 0
    )
    tensors: dict[tuple, int] = {}
    for _, p in model.named_parameters():
        mname, module = owner[id(p)]
        b = _bucket(model, mname, module, decoder, layers_name, head_name, vlm)
        buckets[b] += p.numel()
        shape = tuple(p.shape) if p.dim() else (1,)
        rows, cols = (shape[-2], shape[-1]) if len(shape) >= 2 else (shape[0], 1)
        lead = p.numel() // (rows * cols)
        # GaLore projects the 2-D weights of the decoder's attention and MLP Linears
        galore = b in ("attention", "mlp") and p.dim() == 2 and _linear_shape(module) is not None
        k = (rows, cols, lead, galore)
        tensors[k] = tensors.get(k, 0) + 1
    total = sum(p.numel() for p in model.parameters())
    assert total == sum(buckets.values()), (total, buckets)

    # ---- every module LoRA could adapt or bitsandbytes could quantize
    modules: dict[tuple, int] = {}
    for n, m in model.named_modules():
        shape, kind = _linear_shape(m), "linear"
        if shape is None and isinstance(m, torch.nn.Embedding):
            shape, kind = (m.num_embeddings, m.embedding_dim, False), "embedding"
        if shape is None:
            continue
        if n == head_name:
            group = "head"
        elif _under(n, decoder) or not decoder:
            group = "decoder"
        else:
            group = "vision" if vlm else "other"
        k = (_pattern(n), kind, *shape, group)
        modules[k] = modules.get(k, 0) + 1

    hidden = emb.embedding_dim
    heads = int(_attr(text, "num_attention_heads", "n_head", default=1))
    head_dim = int(_attr(text, "head_dim", default=0) or hidden // heads)
    return {
        "format": FORMAT,
        "model_type": config.model_type,
        "class": type(model).__name__,
        "task": task,
        "transformers": transformers.__version__,
        "params": {"total": total, **buckets},
        "hidden": hidden,
        "vocab": emb.num_embeddings,
        "tied": bool(tied),
        "lm_head_bias": bool(head is not None and getattr(head, "bias", None) is not None),
        "heads": heads,
        "head_dim": head_dim,
        "attn": {
            "sdpa": bool(getattr(model, "_supports_sdpa", False)),
            "flash_attention_2": bool(getattr(model, "_supports_flash_attn", False)),
            "flex_attention": bool(getattr(model, "_supports_flex_attn", False)),
        },
        "softcap": {
            "attention": getattr(text, "attn_logit_softcapping", None) is not None,
            "final": getattr(text, "final_logit_softcapping", None) is not None,
        },
        "dropout": {
            "attention": float(
                _attr(text, "attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", default=0.0)
                or 0
            ),
            "hidden": float(_attr(text, "resid_pdrop", "hidden_dropout_prob", default=0.0) or 0),
        },
        "tensors": [[*k, n] for k, n in tensors.items()],
        "modules": [[*k, n] for k, n in modules.items()],
        "layer_prefix": f"{_pattern(layers_name)}.*." if layers_name else "",
        "layers": _read_layers(layers, text, hidden),
        "vision": _read_vision(model, decoder, config) if vlm else None,
        "all_linear": _peft_all_linear(model) if task == "causal-lm" else [],
    }


def _decoder(model, emb_name: str) -> tuple[str, str | None]:
    """The module holding the token embedding and the layers (its nearest ancestor with a layer
    list), and that list: the ModuleList below it holding the most parameters."""
    import torch

    parts = emb_name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:depth])
        root = model.get_submodule(prefix) if prefix else model
        lists = [
            (sum(p.numel() for p in m.parameters()), n)
            for n, m in root.named_modules()
            if isinstance(m, torch.nn.ModuleList)
            and len(m)
            and ".".join(filter(None, (prefix, n))) != emb_name
        ]
        if lists:
            return prefix, ".".join(filter(None, (prefix, max(lists)[1])))
    return "", None


def _bucket(model, mname, module, decoder, layers_name, head_name, vlm) -> str:
    import torch

    if head_name and mname == head_name:
        return "lm_head"
    if decoder and not _under(mname, decoder):
        return "vision" if vlm else "other"
    if isinstance(module, torch.nn.Embedding):
        return "embeddings"
    if _is_norm(module):
        return "norms"
    if not layers_name or not _under(mname, layers_name) or mname == layers_name:
        return "other"
    path = mname[len(layers_name) + 1 :].split(".")[1:]  # inside one layer
    if _is_experts(path):
        return "experts"
    if path and path[-1] in _ROUTER and _has_experts(model, mname):
        return "router"
    if path and _ATTENTION.search(path[0]):
        return "attention"
    return "mlp" if path else "other"


def _has_experts(model, mname: str) -> bool:
    parent = model.get_submodule(mname.rpartition(".")[0])
    return any(n.startswith("experts") for n, _ in parent.named_children())


def _read_layers(layers, text, hidden) -> list[dict]:
    """The decoder layers grouped by structure: one entry per kind, with how many layers have it."""
    kinds: dict[str, dict] = {}
    for layer in layers:
        desc = _read_layer(layer, text, hidden)
        sig = json.dumps(desc, sort_keys=True)
        if sig in kinds:
            kinds[sig]["count"] += 1
        else:
            kinds[sig] = {**desc, "count": 1}
    return list(kinds.values())


def _read_layer(layer, text, hidden) -> dict:
    """One decoder layer: its Linears (in forward registration order) by role, norms, activations,
    experts, and any parameter-holding module the estimator's mechanism table may not know."""
    children = dict(layer.named_children())
    # the attention module: the attention-named child holding the most parameters (not its dropout)
    sized = [(sum(p.numel() for p in m.parameters()), n) for n, m in children.items() if _ATTENTION.search(n)]
    attn = max(sized)[1] if sized and max(sized)[0] > 0 else ""
    linears, acts, extras = [], set(), set()
    norms = qk_norms = other_norms = 0
    experts = None
    for n, m in layer.named_modules():
        if not n:
            continue
        path = n.split(".")
        if _is_experts(path):
            if experts is None and path[-1].startswith("experts"):
                experts = _read_experts(m, text, hidden)
            continue
        shape = _linear_shape(m)
        if shape is not None:
            parent = layer.get_submodule(".".join(path[:-1])) if len(path) > 1 else layer
            if path[-1] in _ROUTER and any(c.startswith("experts") for c, _ in parent.named_children()):
                group = "router"
            elif any("shared" in s for s in path):
                group = "shared"
            else:
                group = "attention" if attn and path[0] == attn else "mlp"
            linears.append([n, *shape, group])
        elif _is_norm(m):
            size = sum(p.numel() for p in m.parameters(recurse=False))
            if _QK_NORM.search(path[-1]):
                qk_norms += 1
            elif size in (hidden, 2 * hidden) or (size == 0 and len(path) == 1):
                norms += 1
            else:
                other_norms += 1
        elif type(m).__module__ in ("transformers.activations", "torch.nn.modules.activation"):
            acts.add(type(m).__name__)
        else:
            own = [pn for pn, _ in m.named_parameters(recurse=False)]
            if path[-1] in _ROUTER and own and experts is not None or path[-1] in _ROUTER and own:
                continue  # a router holding its weight directly (transformers 5 TopKRouter)
            if own:
                extras.add(f"{type(m).__name__}({','.join(own)})")
    if attn:
        own = [pn for pn, _ in children[attn].named_parameters(recurse=False)]
        if own:
            extras.add(f"{type(children[attn]).__name__}({','.join(own)})")
    return {
        "linears": linears,
        "norms": norms,
        "qk_norms": qk_norms,
        "other_norms": other_norms,
        "norm_kind": _norm_kind(layer),
        "norm_class": next((type(m).__name__ for m in layer.modules() if _is_norm(m)), ""),
        "activations": sorted(acts) or [_config_activation(text)],
        "attention": type(children[attn]).__name__ if attn else "",
        "experts": experts,
        "extras": sorted(extras),
    }


def _config_activation(text) -> str:
    """The MLP's activation class when the module calls it functionally instead of holding it."""
    from transformers.activations import ACT2CLS

    act = _attr(text, "hidden_act", "activation_function", "hidden_activation", default="")
    cls = ACT2CLS.get(act) if isinstance(act, str) else None
    cls = cls[0] if isinstance(cls, tuple) else cls
    return cls.__name__ if cls else str(act)


def _norm_kind(layer) -> str:
    import torch

    return "layer" if any(isinstance(m, torch.nn.LayerNorm) for m in layer.modules()) else "rms"


def _read_experts(m, text, hidden) -> dict:
    """Fused 3-D expert stacks (transformers 5) or a ModuleList of expert MLPs."""
    import torch

    params = list(m.parameters())
    stacked = [p for p in params if p.dim() >= 3]
    count = len(m) if isinstance(m, torch.nn.ModuleList) else (stacked[0].shape[0] if stacked else 1)
    down = getattr(m, "down_proj", None)
    if isinstance(down, torch.nn.Parameter) and down.dim() == 3:
        inter = down.shape[2] if down.shape[1] == hidden else down.shape[1]
    else:
        inter = _attr(
            text, "moe_intermediate_size", "expert_intermediate_size", "intermediate_size", default=0
        )
    # gpt-oss: a clamped SwiGLU (clamp, sigmoid, +1, product) keeps twice what a plain SwiGLU keeps
    clamped = hasattr(m, "limit") and hasattr(m, "alpha")
    return {
        "count": int(count),
        "top_k": int(_attr(text, *_TOPK_KEYS, default=1)),
        "params": sum(p.numel() for p in params) // max(int(count), 1),
        "inter": int(inter),
        "class": type(m).__name__,
        "activation": "clamped_swiglu" if clamped else _config_activation(text),
        "fused": bool(stacked),
    }


def _read_vision(model, decoder, config) -> dict | None:
    """The vision tower's repeated block (depth, Linears) and heads, for its activations."""
    import torch

    best = None
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) and not _under(n, decoder):
            size = sum(p.numel() for p in m.parameters())
            if best is None or size > best[0]:
                best = (size, n, m)
    if best is None:
        return None
    _, name, blocks = best
    vcfg = getattr(config, "vision_config", None)
    return {
        "blocks": _pattern(name),
        "depth": len(blocks),
        "linears": [[n, *_linear_shape(x)] for n, x in blocks[0].named_modules() if _linear_shape(x)],
        "heads": int(_attr(vcfg, "num_heads", "num_attention_heads", default=1)),
    }


def lora_config(**fields):
    """The LoraConfig for PEFT, in training (finetune.models.peft_config, which TRL hands to PEFT) and
    while reading what all-linear adapts (_peft_all_linear): one path, so the plan counts the adapters
    that train. PEFT's own config, with its MoE target conversion made to keep Linear modules
    (keep_linear_targets)."""
    from peft import LoraConfig

    keep_linear_targets()
    return LoraConfig(**fields)


def keep_linear_targets() -> None:
    """Make PEFT's transformers-5 MoE target conversion keep the Linear modules the targets name.

    On models patterned on Qwen2-MoE or Mixtral (DeepSeek-V2/V3, Qwen3-MoE, OLMoE, ...) PEFT 0.21
    (peft/utils/transformers_weight_conversion.py, ``_convert_peft_config_moe``) moves every target
    named like a v4 expert projection (gate_proj, up_proj, down_proj; ``all-linear`` resolved to
    them too) out of target_modules into target_parameters, the fused 3-D expert stacks -- also
    where the name is an ordinary Linear, even one named in full: the shared experts and the dense
    MLP layers then get no LoRA at all (huggingface/peft#3711, fix proposed in peft#3715). Wrapped
    here: Linears named in full pass the conversion by; the rest is converted as before (routed
    experts and routers stay PEFT's parameter LoRA); then the Linear/Conv1D modules with those
    names that the config targets are targets by their full names, and the expert parameters the
    conversion added that this model does not have (finetune.experts swapped them out under
    quantization) are dropped, so a saved adapter loads the same way on the 16-bit model. Idempotent;
    changes PEFT for the whole process."""
    from peft.utils import transformers_weight_conversion as conversion

    convert = conversion._convert_peft_config_moe
    if getattr(convert, "keeps_linears", False):
        return

    def convert_keeping_linears(peft_config, model) -> None:
        linears = _renamed_linears(peft_config, model, conversion)
        if not linears:
            return convert(peft_config, model)
        if not isinstance(peft_config.target_modules, str):
            peft_config.target_modules = [t for t in peft_config.target_modules if t not in linears]
        before = {f: dict(getattr(peft_config, f) or {}) for f in ("rank_pattern", "alpha_pattern")}
        before_params = set(peft_config.target_parameters or ())
        convert(peft_config, model)
        if isinstance(peft_config.target_modules, str):  # the conversion left it alone
            return None
        params = [n for n, _ in model.named_parameters()]
        for t in set(peft_config.target_parameters or ()) - before_params:
            if not any(n == t or n.endswith(f".{t}") for n in params):
                peft_config.target_parameters.discard(t)
                pattern = rf".*\.{re.escape(t)}"  # the conversion's rank/alpha for a fused stack
                for f, kept in before.items():
                    if pattern not in kept:
                        getattr(peft_config, f).pop(pattern, None)
        peft_config.target_modules = set(peft_config.target_modules or ()) | linears
        return None

    convert_keeping_linears.keeps_linears = True
    conversion._convert_peft_config_moe = convert_keeping_linears


def _renamed_linears(peft_config, model, conversion) -> set[str]:
    """Full names of the Linear/Conv1D modules the config targets (PEFT's own matching, all-linear
    resolved PEFT's way) that the conversion would move to target_parameters by their leaf name."""
    import copy

    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists

    base = conversion._MODEL_TO_CONVERSION_PATTERN.get(getattr(model.config, "model_type", None))
    mapping = conversion._MOE_TARGET_MODULE_MAPPING.get(base) or {}
    renamed = {old for old, new in mapping.items() if not new.endswith(".weight")}  # routers: PEFT's way
    if not renamed or not getattr(peft_config, "target_modules", None):
        return set()
    probe = _maybe_include_all_linear_layers(copy.copy(peft_config), model)
    return {
        name
        for name, m in model.named_modules()
        if name.rpartition(".")[2] in renamed and _is_linear(m) and check_target_module_exists(probe, name)
    }


def _is_linear(module) -> bool:
    """PEFT's all-linear test: nn.Linear (bitsandbytes' too), Conv1D, or a Linear PEFT already wrapped."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, BaseTunerLayer):
        return "Linear" in type(module).__name__
    return isinstance(module, (torch.nn.Linear, Conv1D))


def _peft_all_linear(model) -> list[list] | dict:
    """What PEFT's ``target_modules='all-linear'`` adapts on this model, from the LoRA tensors it
    creates at rank PROBE_RANK: [pattern, in, out, rank multiple, count] per adapted module."""
    import warnings

    import torch
    from peft import get_peft_model

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # PEFT's notes on MoE rank patterns it could not apply
        try:
            peft_model = get_peft_model(model, lora_config(r=PROBE_RANK, target_modules="all-linear"))
        except Exception as e:  # PEFT refuses some models (Mamba): the estimate says so if asked
            return {"error": _first_line(e)}
    found: dict[str, dict] = {}
    for n, p in peft_model.named_parameters():
        if p.requires_grad:
            m = re.match(r"base_model\.model\.(.+)\.lora_([AB])\.default\.weight$", n)
            assert m, f"unexpected PEFT parameter {n}"
            found.setdefault(m.group(1), {})[m.group(2)] = tuple(p.shape)
    grouped: dict[tuple, int] = {}
    for module, e in found.items():
        (ra, in_f), (out_f, _) = e["A"], e["B"]
        k = (_pattern(module).replace(".base_layer", ""), in_f, out_f, ra // PROBE_RANK)
        grouped[k] = grouped.get(k, 0) + 1
    return [[*k, n] for k, n in grouped.items()]
