"""The estimator's view of an architecture, matched from its reading: which Linear plays which role
in a decoder layer, and which known mechanisms (gated MLP, parallel block, experts, ...) the layer has.

What is not recognised is listed in ``Layer.unknown``; the activation model then falls back to a
conservative estimate for that layer and the estimate says it is approximate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finetune.memory.reading import reading
from finetune.memory.settings import ParamCount

# Activation modules by what their backward keeps, in tensors of the MLP's width: one op keeps its
# input; GELU written out in tensor ops (gelu_new, gelu_fast) keeps ~4 intermediates; QuickGELU keeps
# x, the sigmoid and the product.
ACTIVATION_COPIES = {
    "SiLUActivation": 1,
    "SiLU": 1,
    "GELUActivation": 1,
    "GELU": 1,
    "GELUTanh": 1,
    "PytorchGELUTanh": 1,
    "ReLU": 1,
    "ReLU6": 1,
    "Tanh": 1,
    "Sigmoid": 1,
    "QuickGELUActivation": 3,
    "NewGELUActivation": 4,
    "FastGELUActivation": 4,
    "ReLUSquaredActivation": 2,
}
# Tensors one (token, expert) pair keeps for backward, in units of the expert width: SwiGLU keeps the
# gate_up output (2) and the activated gate (1); gpt-oss's clamped SwiGLU also its clamp, sigmoid,
# up + 1 and product.
EXPERT_SAVED = {"swiglu": 3, "clamped_swiglu": 6}
_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "proj", "o")


@dataclass(frozen=True)
class Linear:
    """A Linear/Conv1D (or an Embedding, for LoRA targets), once per ``count`` repetitions."""

    name: str  # module path, list indices as '*' (model.layers.*.self_attn.q_proj)
    in_f: int
    out_f: int
    bias: bool
    count: int = 1
    group: str = "decoder"  # decoder | head | vision | other
    kind: str = "linear"  # linear | embedding

    @property
    def leaf(self) -> str:
        return self.name.rpartition(".")[2]

    @property
    def params(self) -> int:
        return self.in_f * self.out_f + (self.out_f if self.bias else 0)


@dataclass(frozen=True)
class Layer:
    """One kind of decoder layer and how many layers are of that kind."""

    count: int
    qkv: tuple[Linear, ...]  # projections that read the attention norm's output
    o: tuple[Linear, ...]  # the attention output projection
    ups: tuple[Linear, ...]  # MLP projections reading the MLP norm's output
    down: tuple[Linear, ...]
    shared_ups: tuple[Linear, ...] = ()  # MoE shared expert (runs on every token)
    shared_down: tuple[Linear, ...] = ()
    other: tuple[Linear, ...] = ()  # Linears in no recognised role
    q_dim: int = 0
    kv_dim: int = 0
    inter: int = 0
    shared_inter: int = 0
    gated: bool = True
    act_copies: int = 1
    norms: int = 2  # norms on the residual stream (post-norms included)
    attn_norms: int = 1
    qk_norm: bool = False
    parallel: bool = False  # attention and MLP read one norm's output (phi, falcon-7b, gpt-j)
    fused_qkv: bool = False
    experts: int = 0
    top_k: int = 0
    expert_inter: int = 0
    expert_saved: int = 0
    expert_fused: bool = True
    sinks: bool = False
    mechanisms: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()

    @property
    def linears(self) -> tuple[Linear, ...]:
        return self.qkv + self.o + self.ups + self.down + self.shared_ups + self.shared_down + self.other


@dataclass(frozen=True)
class Vision:
    depth: int
    heads: int
    embed_dim: int
    mlp_dim: int


@dataclass(frozen=True)
class Arch:
    model_type: str
    hidden: int
    vocab: int
    heads: int
    head_dim: int
    tied: bool
    params: ParamCount
    layers: tuple[Layer, ...]
    modules: tuple[Linear, ...]  # every Linear/Conv1D/Embedding of the model
    all_linear: tuple[tuple[str, int, int, int, int], ...]  # PEFT: (pattern, in, out, rank multiple, count)
    tensors: tuple[tuple[int, int, int, bool, int], ...]  # every parameter: (rows, cols, lead, galore, count)
    norm_kind: str = "rms"
    norm_fp32_scale: bool = False  # Gemma norms scale in fp32: a trained norm keeps an fp32 copy
    encoder: bool = False
    dropout: float = 0.0
    hidden_dropout: float = 0.0
    attn_softcap: bool = False
    final_softcap: bool = False
    sdpa_supported: bool = True
    vision: Vision | None = None
    unknown: tuple[str, ...] = field(default=())
    attn_kernels: tuple[str, ...] = ()  # flash_attention_2 / flex_attention when the class supports them
    all_linear_error: str = ""  # why PEFT refuses target_modules='all-linear' on this model

    @property
    def n_layers(self) -> int:
        return sum(layer.count for layer in self.layers)

    @property
    def sinks(self) -> bool:
        """Attention with sinks (gpt-oss): SDPA through finetune.attention, whatever the class says."""
        return any(layer.sinks for layer in self.layers)


_described: dict[int, tuple[dict, Arch]] = {}


def describe(arch: dict, task: str = "causal-lm") -> Arch:
    r = reading(arch, task)
    hit = _described.get(id(r))
    if hit is not None and hit[0] is r:
        return hit[1]
    a = from_reading(r)
    _described[id(r)] = (r, a)
    return a


def from_reading(r: dict) -> Arch:
    h, heads, hd = r["hidden"], r["heads"], r["head_dim"]
    layers = tuple(_layer(k, r["layer_prefix"], h, heads * hd, hd) for k in r["layers"])
    v = r.get("vision")
    vision = None
    if v and v["linears"]:
        ed = v["linears"][0][1]
        vision = Vision(
            v["depth"], v["heads"], ed, max(o for _, i, o, _ in v["linears"] if i == ed and o != 3 * ed)
        )
    first = r["layers"][0] if r["layers"] else {}
    unknown = sorted({u for layer in layers for u in layer.unknown})
    return Arch(
        model_type=r["model_type"],
        hidden=h,
        vocab=r["vocab"],
        heads=heads,
        head_dim=hd,
        tied=r["tied"],
        params=ParamCount(**r["params"]),
        layers=layers,
        modules=tuple(
            Linear(name, i, o, bias, count, group, kind)
            for name, kind, i, o, bias, group, count in r["modules"]
        ),
        all_linear=tuple(tuple(x) for x in r["all_linear"]) if isinstance(r["all_linear"], list) else (),
        all_linear_error=r["all_linear"].get("error", "") if isinstance(r["all_linear"], dict) else "",
        tensors=tuple(tuple(x) for x in r["tensors"]),
        norm_kind=first.get("norm_kind", "rms"),
        norm_fp32_scale=first.get("norm_class", "").startswith("Gemma"),
        encoder=r["task"] == "sequence-classification",
        dropout=r["dropout"]["attention"],
        hidden_dropout=r["dropout"]["hidden"],
        attn_softcap=r["softcap"]["attention"],
        final_softcap=r["softcap"]["final"],
        sdpa_supported=r["attn"]["sdpa"],
        attn_kernels=tuple(k for k in ("flash_attention_2", "flex_attention") if r["attn"][k]),
        vision=vision,
        unknown=tuple(unknown),
    )


def _layer(k: dict, prefix: str, h: int, q: int, hd: int) -> Layer:
    lins = [Linear(prefix + n, i, o, b, k["count"]) for n, i, o, b, _ in k["linears"]]
    group = {prefix + n: g for n, _, _, _, g in k["linears"]}
    attn = [x for x in lins if group[x.name] == "attention"]
    mlp = [x for x in lins if group[x.name] == "mlp"]
    shared = [x for x in lins if group[x.name] == "shared" and x.out_f > 1]  # minus the 1-wide gate
    mechanisms, unknown, other = [], [], []

    # ---- attention: the output projection maps the heads back to the residual stream; the others
    # read the norm's output and together produce q, k and v
    o = [x for x in attn if x.out_f == h and x.in_f == q]
    if len(o) > 1:
        o = [next((x for x in o if x.leaf in _OUT_NAMES), o[-1])]
    qkv = [x for x in attn if x not in o]
    kv, fused = 0, False
    if len(o) == 1 and all(x.in_f == h for x in qkv):
        outs = sorted(x.out_f for x in qkv)
        if len(qkv) == 1 and (outs[0] - q) % 2 == 0 and (outs[0] - q) // 2 % hd == 0 and outs[0] > q:
            kv, fused = (outs[0] - q) // 2, True
        elif len(qkv) == 3 and q in outs:
            rest = list(outs)
            rest.remove(q)
            kv = rest[0] if rest[0] == rest[1] else 0
    if not kv:
        unknown.append(f"attention {k['attention'] or '(none)'}")
        other += attn
        qkv, o = [], []
    else:
        mechanisms.append("fused_qkv" if fused else "attention")

    # ---- dense MLP (or the shared expert of a MoE block): up/gate read the norm, down writes back
    def mlp_roles(group_lins, what):
        down = [x for x in group_lins if x.out_f == h and x.in_f != h] or [
            x for x in group_lins if x.out_f == h
        ][-1:]
        ups = [x for x in group_lins if x not in down and x.in_f == h]
        if len(down) != 1 or len(ups) + 1 != len(group_lins):
            unknown.append(f"{what} {[x.leaf for x in group_lins]}")
            other.extend(group_lins)
            return (), (), 0, True
        inter = down[0].in_f
        width = sum(x.out_f for x in ups)
        if width not in (inter, 2 * inter):
            unknown.append(f"{what} widths {width} -> {inter}")
            other.extend(group_lins)
            return (), (), 0, True
        return tuple(ups), tuple(down), inter, width == 2 * inter

    ups, down, inter, gated = mlp_roles(mlp, "mlp") if mlp else ((), (), 0, True)
    if mlp and inter:
        mechanisms.append("gated_mlp" if gated else "mlp")
    shared_ups, shared_down, shared_inter, _ = (
        mlp_roles(shared, "shared expert") if shared else ((), (), 0, True)
    )
    if shared_inter:
        mechanisms.append("shared_experts")

    acts = k["activations"]
    copies = [ACTIVATION_COPIES.get(a) for a in acts]
    if None in copies:
        unknown.append(f"activation {acts}")
    act_copies = max((c or 4 for c in copies), default=1)

    e = k.get("experts")
    experts = top_k = e_inter = e_saved = 0
    if e:
        experts, top_k, e_inter = e["count"], e["top_k"], e["inter"]
        gate_act = e["activation"] if e["activation"] == "clamped_swiglu" else "swiglu"
        e_saved = EXPERT_SAVED[gate_act]
        mechanisms.append("experts")
        if not e["fused"]:
            unknown.append(f"experts as a module list ({e['class']})")
        if e_inter <= 0:
            unknown.append(f"expert width of {e['class']}")
    if not mlp and not e:
        unknown.append("no MLP")

    sinks = any(x.endswith("(sinks)") for x in k["extras"])
    if sinks:
        mechanisms.append("sinks")
    unknown += [f"module {x}" for x in k["extras"] if not x.endswith("(sinks)")]
    if k["other_norms"]:
        unknown.append(f"{k['other_norms']} norms off the residual stream")
    if k["qk_norms"]:
        mechanisms.append("qk_norm")
    norms = k["norms"]
    parallel = norms == 1 and bool(qkv) and bool(ups)
    if parallel:
        mechanisms.append("parallel_block")
    if norms == 4:
        mechanisms.append("post_norms")
    return Layer(
        count=k["count"],
        qkv=tuple(qkv),
        o=tuple(o),
        ups=ups,
        down=down,
        shared_ups=shared_ups,
        shared_down=shared_down,
        other=tuple(other),
        q_dim=q,
        kv_dim=kv,
        inter=inter,
        shared_inter=shared_inter,
        gated=gated,
        act_copies=act_copies,
        norms=norms,
        attn_norms=2 if norms == 4 else 1,
        qk_norm=bool(k["qk_norms"]),
        parallel=parallel,
        fused_qkv=fused,
        experts=experts,
        top_k=top_k,
        expert_inter=e_inter,
        expert_saved=e_saved,
        expert_fused=bool(e and e["fused"]),
        sinks=sinks,
        mechanisms=tuple(mechanisms),
        unknown=tuple(unknown),
    )
