"""The typed root schema: the one place where a configuration is validated.

Hydra merges every group file and command-line override into these dataclasses, so an unknown key
or a wrong type fails during composition. `validate()` then checks what types cannot express
(ranges, allowed names, combinations that cannot train). Both kinds of failure reach the user as a
`UserError` that names the key and the fix. No torch import here: `--cfg job` must stay fast.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import MISSING, DictConfig, OmegaConf

from finetune import UserError, config_dir, warn


@dataclass
class ModelConfig:
    name: str = MISSING  # short name, used for run folders
    name_or_path: str = MISSING  # hub id or local folder (a folder with only config.json plans)
    # "<pip distribution>:<path inside it>": an offline GGUF copy of the catalog model (arch._name_or_path)
    gguf_file: str | None = None
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2
    # auto | true | false: keep the frozen input embedding in host RAM, its rows looked up on the CPU
    # (LoRA on a GPU, untied embeddings); frees vocab x hidden x 2 bytes of GPU memory. auto: when needed to fit
    offload_embedding: Any = "auto"
    trust_remote_code: bool = False
    # A catalog model's config.json numbers, for planning offline; `_name_or_path` names the model
    # they describe, and they are used only while model.name_or_path is that model.
    arch: dict[str, Any] = field(default_factory=dict)


# Fields the auto-fit resolver can fill hold "auto" or a concrete value, so they are typed Any here
# and checked by validate(); every other field is checked by its type during composition.
AUTO = "auto"


@dataclass
class QuantConfig:
    load_in: str = "none"  # auto | none | 8bit | 4bit
    bnb_4bit_quant_type: str = "nf4"
    double_quant: bool = True


@dataclass
class LoraConfig:
    enabled: bool = True  # false: full fine-tune
    r: Any = 16  # int, or auto
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Any = "all-linear"  # all-linear (PEFT's rule: every linear but the LM head) or names
    use_dora: bool = False


@dataclass
class BatchConfig:
    size: Any = 8  # micro-batch per device: int, or auto
    grad_accum: Any = 1  # int, or auto (derived from effective)
    effective: int | None = 16  # global batch, kept fixed when size or grad_accum is auto


@dataclass
class OptimConfig:
    name: str = "adamw"  # or auto
    lr: Any = "auto"  # a float, or auto: LORA_LR with adapters, FULL_LR for a full fine-tune
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    galore_rank: int = 128
    galore_update_proj_gap: int = 200
    galore_scale: float = 0.25
    galore_layerwise: bool = False


@dataclass
class HardwareConfig:
    name: str = "cpu"  # a preset name, or auto: detect the GPUs torch sees
    match: str | None = None  # part of the driver's device name, to recognise the preset when detected
    num_gpus: int = 0
    gpu_memory_gb: float = 0.0
    compute_capability: float | None = None
    bf16: bool = False
    flash_attention: bool = False
    tflops: float = 0.0


@dataclass
class DataColumns:
    """Your column names for the fields finetune reads (null: the standard name)."""

    messages: str | None = None  # a conversation: OpenAI role/content or ShareGPT from/value
    conversations: str | None = None  # ShareGPT
    instruction: str | None = None  # Alpaca: instruction, input, output, system
    input: str | None = None
    output: str | None = None
    system: str | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    images: str | None = None  # VLM: image file paths


@dataclass
class DataConfig:
    name: str = "demo"  # demo | file | hub
    path: str | None = None  # file: a file or folder; hub: a dataset id
    format: str = "auto"  # auto | messages | sharegpt | alpaca | prompt_completion | text
    columns: DataColumns = field(default_factory=DataColumns)
    subset: str | None = None  # hub: the dataset's configuration name
    split: str = "train"  # hub (and saved datasets): the split to train on
    eval_split: str | None = None  # hub: a split to score on, instead of eval_fraction
    eval_path: str | None = None  # file: a file or folder to score on, instead of eval_fraction
    num_train: int = 400  # demo only: generated training examples
    eval_fraction: float = 0.05  # share held out for scoring when no eval file/split is given
    max_length: Any = 1024  # tokens per example: int, or auto (from the data's lengths)
    overlong: str = "truncate"  # truncate | drop: examples longer than max_length
    chat_template: str | None = (
        None  # null: the tokenizer's own; chatml | llama-3 | gemma | phi-3 | alpaca | .jinja
    )
    train_on_prompt: bool = False  # false: loss on assistant turns / the completion only
    packing: bool = False  # true: pack several examples into each max_length row
    padding_free: Any = "auto"  # true | false | auto (on with flash_attention_2)
    empty_rows: str = "drop"  # drop | error: rows with nothing to train on (no reply, empty completion/text)


@dataclass
class TrainConfig:
    max_steps: int = -1
    epochs: float = 1.0
    gradient_checkpointing: Any = True  # true | false | auto
    # auto | true | false: checkpointed layer inputs in pinned host RAM (one copy out in forward, one back
    # in backward); frees layers x tokens x hidden x 2 bytes of GPU memory. auto: when needed to fit
    offload_activations: Any = "auto"
    logging_steps: int = 5
    eval_samples: int = 30
    save_steps: Any = "auto"  # checkpoint every N optimizer steps; auto: every 10 minutes; 0: only on Ctrl-C
    save_total_limit: int = 2  # checkpoints kept (the newest)
    eval_steps: Any = "auto"  # eval loss every N steps; auto: at each checkpoint; both also at the end
    report_to: Any = "none"  # none, or trackers: tensorboard, wandb, trackio, mlflow, ... (or a list)


@dataclass
class DistConfig:
    """How a run spreads over several GPUs (configs/dist/): mapped onto accelerate's FSDP2 and
    DeepSpeed plugins by finetune/launch.py, planned per GPU by finetune/memory/distributed.py."""

    strategy: str = "auto"  # auto | none | ddp | fsdp | zero2 | zero3
    candidates: list[str] = field(default_factory=lambda: ["ddp", "fsdp", "fsdp_offload"])  # auto tries these
    reshard_after_forward: bool = True  # FSDP2: free gathered layers after forward
    cpu_offload: bool = False  # FSDP2: shards in host RAM
    offload_optimizer: bool = False  # ZeRO: optimizer state and step in host RAM
    offload_params: bool = False  # ZeRO-3: parameters in host RAM
    activation_checkpointing: Any = "auto"  # FSDP: true | false | auto (follows train.gradient_checkpointing)
    host_memory_gb: Any = (
        "auto"  # host RAM of the machine, for offload plans; auto: 256 GiB per GPU preset, or this machine's
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    hw: HardwareConfig = field(default_factory=HardwareConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    seed: int = 42
    output_dir: str = "runs"
    run_name: str | None = None
    dry_run: bool = False
    resume: str | None = None  # a run folder (or latest): continue that run from its last checkpoint


ConfigStore.instance().store(name="finetune_schema", node=Config)


class _PackagedConfigs(SearchPathPlugin):
    """Keeps the packaged configs on Hydra's search path when a recipe folder is the primary one
    (`-cd my_recipes -cn my-recipe`), so the recipe can build on them: `defaults: [finetune, ...]`."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="finetune", path=f"file://{config_dir()}")


Plugins.instance().register(_PackagedConfigs)

DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")
QUANT = ("auto", "none", "8bit", "4bit")
QUANT_4BIT_TYPES = ("nf4", "fp4")
# Our optimizer names -> transformers' `optim` names.
OPTIMIZERS = {
    "adamw": "adamw_torch_fused",  # fused kernel: faster, and no state-sized temporary per step
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "adafactor": "adafactor",
    "galore": "galore_adamw",
    "galore_8bit": "galore_adamw_8bit",
}
# The transformers schedulers that need no arguments beyond the warmup (the others need
# lr_scheduler_kwargs that finetune does not pass, or an eval metric).
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
LORA_LR = 2e-4  # optim.lr=auto with adapters (the QLoRA paper's and most recipes' choice)
FULL_LR = 1e-5  # optim.lr=auto for a full fine-tune: every weight moves, so 20x smaller
SEED_MAX = 2**32 - 1  # numpy's seed range, which transformers' set_seed also seeds
DATA_SOURCES = ("demo", "file", "hub")
# train.report_to names transformers' integrations take -> the packages that provide each one.
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "trackio": ("trackio",),
    "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",),
    "neptune": ("neptune",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
    "swanlab": ("swanlab",),
    "azure_ml": ("azureml",),
    "codecarbon": ("codecarbon",),
    "dagshub": ("dagshub",),
    "flyte": ("flytekit",),
}
DATA_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text")

# Names other tools use for our keys: a user coming from them gets pointed at ours.
KNOWN_ALIASES = {
    "learning_rate": "lr",
    "batch_size": "size",
    "micro_batch_size": "size",
    "per_device_train_batch_size": "size",
    "gradient_accumulation_steps": "grad_accum",
    "gradient_accumulation": "grad_accum",
    "lora_r": "r",
    "rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "model_name": "name_or_path",
    "base_model": "name_or_path",
    "load_in_4bit": "load_in",
    "load_in_8bit": "load_in",
    "sequence_len": "max_length",
    "max_seq_length": "max_length",
    "cutoff_len": "max_length",
}


def did_you_mean(word: str, choices: list[str]) -> str:
    """' Did you mean X?' for the closest choice, or '' when nothing is close."""
    if KNOWN_ALIASES.get(word) in choices:
        return f" Did you mean '{KNOWN_ALIASES[word]}'?"
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not close:  # a prefix of a longer name: model=qwen -> qwen2.5-7b
        close = [c for c in choices if word and c.startswith(word)][:1]
    return f" Did you mean '{close[0]}'?" if close else ""


def _count(errors: list[str], key: str, value: Any, hint: str = "") -> None:
    """A whole number >= 1, or auto."""
    if value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        errors.append(f"{key}={value} must be a whole number of at least 1, or auto.{hint}")


def _true_false_auto(errors: list[str], key: str, value: Any) -> bool:
    """Is a tri-state knob true, false or auto? Adds the error line when not."""
    if value in (True, False, AUTO):
        return True
    errors.append(f"{key}={value} must be true, false or auto.")
    return False


def _one_of(errors: list[str], key: str, value: str, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        errors.append(
            f"{key}={value!r} is not one of {', '.join(allowed)}.{did_you_mean(str(value), list(allowed))}"
        )


def targets(lora: Any) -> list[str]:
    """lora.target_modules as a list of names; `all-linear` may be given as a plain string."""
    value = lora.target_modules
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value] if value is not None else ["all-linear"]


def unknown_keys(cfg: Any, node: Any = None, prefix: str = "") -> list[str]:
    """Keys in `cfg` that the schema does not have: `+key=` and `++key=` add them past Hydra's checks."""
    import typing

    node = node or Config
    hints = typing.get_type_hints(node)
    found = []
    for key in cfg:
        if key not in hints:
            found.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(hints[key]) and hasattr(cfg[key], "keys"):
            found += unknown_keys(cfg[key], hints[key], f"{prefix}{key}.")
    return found


def schema_keys(full_key: str) -> list[str]:
    """The keys the schema allows next to `full_key` (its siblings)."""
    import typing

    node: Any = Config
    for part in full_key.split(".")[:-1]:
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        node = hints.get(part)
    if not dataclasses.is_dataclass(node):
        return []
    return [f.name for f in dataclasses.fields(node)]


def unknown_key(full_key: str, source: str = "") -> str:
    """The message for a key the schema does not have, with the closest one and the allowed ones."""
    keys = schema_keys(full_key)
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    prefix = f"{parent}." if parent else ""
    hint = did_you_mean(full_key.rsplit(".", 1)[-1], keys)
    if hint:
        hint = hint.replace("'", f"'{prefix}", 1)
    known = f" Keys{' of ' + parent if parent else ''}: {', '.join(keys)}." if keys else ""
    return f"unknown key '{full_key}'{source}.{hint}{known}"


def command_line_keys() -> dict[str, str]:
    """The dotted keys named on the command line (key=, +key=, ++key=, ~key) with the values as
    typed, when Hydra composed the config."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    keys = {}
    for override in HydraConfig.get().overrides.task:
        key, _, value = override.partition("=")
        if "." in key:
            keys[key.lstrip("+~")] = value
    return keys


# (key, when it has no effect, why): settings of an option that is not in use.
_INACTIVE = (
    *(
        (f"lora.{k}", lambda c: not c.lora.enabled, "lora=none trains every weight, with no adapters")
        for k in ("r", "alpha", "dropout", "target_modules", "use_dora")
    ),
    *(
        (
            f"quant.{k}",
            lambda c: c.quant.load_in in ("none", "8bit"),
            "only 4-bit quantization uses it (quant={q})",
        )
        for k in ("bnb_4bit_quant_type", "double_quant")
    ),
    *(
        (
            f"optim.{k}",
            lambda c: not c.optim.name.startswith("galore"),
            "only optim=galore and galore_8bit use it",
        )
        for k in ("galore_rank", "galore_update_proj_gap", "galore_scale", "galore_layerwise")
    ),
    ("data.num_train", lambda c: c.data.name != "demo", "only the built-in demo data is generated"),
    ("data.subset", lambda c: c.data.name != "hub", "only data=hub reads a dataset's subsets"),
    ("data.eval_split", lambda c: c.data.name != "hub", "only data=hub reads splits; use data.eval_path"),
    ("data.format", lambda c: c.data.name == "demo", "the built-in demo data has its own format"),
    ("data.columns", lambda c: c.data.name == "demo", "the built-in demo data has its own columns"),
    (
        "data.eval_fraction",
        lambda c: bool(c.data.eval_path or (c.data.name == "hub" and c.data.eval_split)),
        "a separate eval file or split is scored instead",
    ),
    ("train.epochs", lambda c: c.train.max_steps > 0, "train.max_steps is set and decides the length"),
    *(
        (
            f"hw.{k}",
            lambda c: c.hw.name != AUTO and c.hw.num_gpus == 0,
            "this plan has no GPU (hw.num_gpus=0)",
        )
        for k in ("gpu_memory_gb", "compute_capability", "bf16", "flash_attention", "tflops")
    ),
)


def _inactive_warnings(cfg: Config) -> None:
    """Warn about each key set (on the command line, or away from its default) that has no effect."""
    defaults = Config()
    named = command_line_keys()
    for key, unused, why in _INACTIVE:
        value = get(cfg, key)
        if unused(cfg) and (key in named or value != get(defaults, key)):
            shown = named.get(key) or (
                dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
            )
            warn(f"{key}={shown} has no effect: {why.format(q=cfg.quant.load_in)}.")


def get(cfg: Config, key: str) -> Any:
    """The value at a dotted key (`train.max_steps`)."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def put(cfg: Config, key: str, value: Any) -> None:
    """Set the value at a dotted key, in place."""
    parent, _, leaf = key.rpartition(".")
    setattr(get(cfg, parent) if parent else cfg, leaf, value)


def typed(cfg: DictConfig) -> Config:
    """The one way a composed configuration enters the program: checked by `validate`, then turned
    into the `Config` dataclasses every module takes (a `Config` passes through unchanged)."""
    if isinstance(cfg, Config):
        return cfg
    unknown = unknown_keys(cfg)  # `+key=` past Hydra's checks: to_object would fail on them less clearly
    if unknown:
        raise UserError(unknown_key(unknown[0]))
    out = OmegaConf.to_object(cfg)
    validate(out)
    return out


def load(file: Path) -> Config:
    """A run's saved config.yaml as a `Config` (written fully resolved by the run itself)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(file)))
    except (OmegaConfBaseException, ValueError) as err:  # edited by hand, or from another version
        raise UserError(
            f"{file} is not a run config this version of finetune reads: {str(err).splitlines()[0]}"
        ) from None


def validate(cfg: Config) -> None:
    """Check ranges and combinations; raise one UserError listing every problem found."""
    _inactive_warnings(cfg)
    e: list[str] = []
    m, q, lo, b, o, hw, d, t = (
        cfg.model,
        cfg.quant,
        cfg.lora,
        cfg.batch,
        cfg.optim,
        cfg.hw,
        cfg.data,
        cfg.train,
    )

    _one_of(e, "model.dtype", m.dtype, DTYPES)
    _one_of(e, "model.attn_implementation", m.attn_implementation, ATTENTION)
    _one_of(e, "quant.load_in", q.load_in, QUANT)
    _one_of(e, "quant.bnb_4bit_quant_type", q.bnb_4bit_quant_type, QUANT_4BIT_TYPES)
    _one_of(e, "optim.name", o.name, [AUTO, *OPTIMIZERS])
    _one_of(e, "data.name", d.name, DATA_SOURCES)

    if lo.enabled:
        _count(e, "lora.r", lo.r, " Typical: 8-64. For a full fine-tune use lora=none.")
        if lo.alpha <= 0:
            e.append(f"lora.alpha={lo.alpha} must be positive (common choice: 2 * lora.r).")
        if not 0 <= lo.dropout < 1:
            e.append(f"lora.dropout={lo.dropout} must be in [0, 1).")
        if not targets(lo) or not all(targets(lo)):
            e.append("lora.target_modules is empty: name modules (e.g. [q_proj,v_proj]) or use all-linear.")
    elif q.load_in not in ("none", AUTO):
        e.append(
            f"quant={q.load_in} with a full fine-tune (lora=none): quantized weights cannot be trained. "
            "Use lora=r16 (QLoRA) or quant=none."
        )

    _count(e, "batch.size", b.size)
    _count(e, "batch.grad_accum", b.grad_accum)
    if AUTO in (b.size, b.grad_accum) and b.effective is None:
        e.append(
            "batch.size or batch.grad_accum is auto: set batch.effective=<global batch> (e.g. 16) to keep fixed."
        )
    pinned_size, pinned_accum = (
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (b.size, b.grad_accum)
    )
    if b.effective is not None:
        # The effective batch must split into the pinned factors; the resolver fills the rest exactly.
        factors = [("batch.size", b.size)] * pinned_size + [("batch.grad_accum", b.grad_accum)] * pinned_accum
        per_step = max(hw.num_gpus, 1)
        for _, value in factors:
            per_step *= value
        names = " x ".join([name for name, _ in factors] + ["GPUs"])
        if b.effective < 1 or b.effective % per_step:
            e.append(
                f"batch.effective={b.effective} must be a positive multiple of {names} = {per_step} "
                f"(e.g. batch.effective={per_step * max(1, round(max(b.effective, 1) / per_step))})."
            )
        elif pinned_size and pinned_accum and per_step != b.effective:
            e.append(
                f"batch.effective={b.effective} disagrees with batch.size x batch.grad_accum x GPUs = "
                f"{per_step}: set batch.grad_accum=auto to derive it, or drop batch.effective."
            )

    if o.lr != AUTO and (isinstance(o.lr, bool) or not isinstance(o.lr, int | float) or o.lr <= 0):
        e.append(f"optim.lr={o.lr} must be a positive number, or auto (2e-4 with LoRA, 1e-5 full fine-tune).")
    if o.lr_scheduler not in SCHEDULERS:
        e.append(
            f"optim.lr_scheduler={o.lr_scheduler!r} is not one of {', '.join(SCHEDULERS)}."
            f"{did_you_mean(str(o.lr_scheduler), list(SCHEDULERS))}"
        )
    if o.weight_decay < 0:
        e.append(f"optim.weight_decay={o.weight_decay} must not be negative.")
    if not 0 <= o.warmup_ratio < 1:
        e.append(f"optim.warmup_ratio={o.warmup_ratio} must be in [0, 1).")
    if o.name.startswith("galore"):
        if lo.enabled:
            e.append(f"optim={o.name} trains full weights through low-rank gradients: use it with lora=none.")
        if o.galore_rank < 1:
            e.append(f"optim.galore_rank={o.galore_rank} must be at least 1 (typical: 128-1024).")
        if o.galore_layerwise and b.grad_accum not in (1, AUTO):
            e.append("optim.galore_layerwise=true updates during backward: it needs batch.grad_accum=1.")

    if not 0 <= cfg.seed <= SEED_MAX:
        e.append(f"seed={cfg.seed} must be between 0 and {SEED_MAX}.")
    if hw.num_gpus < 0:
        e.append(f"hw.num_gpus={hw.num_gpus} must not be negative (0 = CPU).")
    for key in ("gpu_memory_gb", "tflops", "compute_capability"):
        value = getattr(hw, key)
        if value is not None and value < 0:
            e.append(f"hw.{key}={value} must not be negative.")
    if m.attn_implementation == "flash_attention_2" and hw.name != AUTO and not hw.flash_attention:
        e.append(
            f"model.attn_implementation=flash_attention_2 needs a GPU with FlashAttention-2 (Ampere or newer); "
            f"hw={hw.name} has none: use model.attn_implementation=sdpa (or auto)."
        )

    _one_of(e, "data.format", d.format, DATA_FORMATS)
    _one_of(e, "data.overlong", d.overlong, ("truncate", "drop"))
    _one_of(e, "data.empty_rows", d.empty_rows, ("drop", "error"))
    if d.name == "file" and not d.path:
        e.append("data=file needs data.path=<your .jsonl/.json/.csv/.parquet file, or a folder of them>.")
    if d.name == "demo" and (d.path or d.eval_path):
        key = "data.path" if d.path else "data.eval_path"
        e.append(
            f"{key}={d.path or d.eval_path} is set but data=demo (the built-in task) is selected: "
            "add data=file to train on your file (or data=hub for a hub dataset)."
        )
    if d.max_length != AUTO and (isinstance(d.max_length, bool) or not isinstance(d.max_length, int)):
        e.append(f"data.max_length={d.max_length} must be a whole number of tokens, or auto.")
    elif d.max_length != AUTO and d.max_length < 8:
        e.append(f"data.max_length={d.max_length} is too short to hold a prompt and an answer (use >= 64).")
    if _true_false_auto(e, "data.padding_free", d.padding_free) and d.packing and d.padding_free is False:
        e.append("data.packing=true packs examples into padding-free rows: drop data.padding_free=false.")
    if not 0 <= d.eval_fraction < 1:
        e.append(f"data.eval_fraction={d.eval_fraction} must be in [0, 1).")
    if d.num_train < 1:
        e.append(f"data.num_train={d.num_train} must be at least 1.")

    _true_false_auto(e, "train.gradient_checkpointing", t.gradient_checkpointing)
    if (
        _true_false_auto(e, "train.offload_activations", t.offload_activations)
        and t.offload_activations is True
        and t.gradient_checkpointing is False
    ):
        e.append(
            "train.offload_activations=true offloads the inputs gradient checkpointing keeps: "
            "set train.gradient_checkpointing=true (or auto), or drop train.offload_activations."
        )
    _true_false_auto(e, "model.offload_embedding", m.offload_embedding)
    sharded = cfg.dist.strategy not in (AUTO, "none", "ddp")
    for key, value in (
        ("model.offload_embedding", m.offload_embedding),
        ("train.offload_activations", t.offload_activations),
    ):
        if value is True and sharded:
            e.append(
                f"{key}=true works with one process or dist=ddp; dist={cfg.dist.strategy} places weights and "
                f"checkpoints layers itself: drop {key}, or use dist=ddp."
            )
    if t.max_steps == 0 or t.max_steps < -1:
        e.append(f"train.max_steps={t.max_steps} must be -1 (use train.epochs) or at least 1.")
    if t.epochs <= 0:
        e.append(f"train.epochs={t.epochs} must be positive.")
    if t.logging_steps < 1:
        e.append(f"train.logging_steps={t.logging_steps} must be at least 1.")
    if t.eval_samples < 0:
        e.append(f"train.eval_samples={t.eval_samples} must not be negative (0 skips scoring).")
    save = t.save_steps
    if save != AUTO and (isinstance(save, bool) or not isinstance(save, int) or save < 0):
        e.append(f"train.save_steps={save} must be a whole number of steps, 0 (only on Ctrl-C) or auto.")
    if t.save_total_limit < 1:
        e.append(f"train.save_total_limit={t.save_total_limit} must be at least 1 (checkpoints kept).")
    _count(e, "train.eval_steps", t.eval_steps, " auto evaluates at each checkpoint.")
    for tracker in [t.report_to] if isinstance(t.report_to, str) else list(t.report_to):
        if tracker != "none" and tracker not in TRACKERS:
            e.append(
                f"train.report_to={tracker!r} is not a tracker transformers knows."
                f"{did_you_mean(str(tracker), list(TRACKERS))} Use none or one of {', '.join(TRACKERS)} "
                "(a list: 'train.report_to=[tensorboard,wandb]')."
            )

    _validate_dist(e, cfg.dist)

    if len(e) == 1:
        raise UserError(e[0])
    if e:
        raise UserError(f"{len(e)} problems in the configuration:\n  - " + "\n  - ".join(e))


DIST_STRATEGIES = ("auto", "none", "ddp", "fsdp", "zero2", "zero3")


def _validate_dist(e: list[str], dist: Any) -> None:
    _one_of(e, "dist.strategy", dist.strategy, DIST_STRATEGIES)
    options = sorted(p.stem for p in (config_dir() / "dist").glob("*.yaml") if p.stem != AUTO)
    for name in dist.candidates:
        _one_of(e, "dist.candidates", name, options)
    _true_false_auto(e, "dist.activation_checkpointing", dist.activation_checkpointing)
    host = dist.host_memory_gb
    if host != AUTO and (isinstance(host, bool) or not isinstance(host, int | float) or host <= 0):
        e.append(f"dist.host_memory_gb={host} must be a positive number of GiB, or auto.")
    if dist.strategy == "zero3" and not dist.reshard_after_forward:
        e.append(
            "dist.reshard_after_forward=false is FSDP's; ZeRO-3 always re-partitions: use dist=zero2 instead."
        )
    if dist.offload_params and dist.strategy != "zero3":
        e.append("dist.offload_params=true needs dist=zero3 (FSDP offloads with dist.cpu_offload=true).")
    if dist.cpu_offload and dist.strategy not in ("fsdp", AUTO):
        e.append(
            "dist.cpu_offload=true is FSDP's: use dist=fsdp_offload, or dist.offload_optimizer with ZeRO."
        )
