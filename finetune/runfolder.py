"""A finished run's folder, for the commands that work on one (merge, export, chat): their
`key=value` arguments, the folder's config and trained weights, and the model they make.

These commands take a run folder, not a composition of config groups, so their arguments are
parsed here and never reach Hydra: a misspelt key gets a did-you-mean, not a config error.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune import UserError, cache_dir
from finetune.schema import Config

DTYPES = ("auto", "bfloat16", "float16", "float32")


def _usage(command: str, summary: str, options: dict[str, str]) -> str:
    """`options`: name -> "<default or value>  <what it does>" (two spaces between)."""
    lines = [f"usage: python -m {command} " + " ".join(f"{k}=..." for k in options), "", summary, ""]
    lines.append("Options:")
    for name, text in options.items():
        value, what = [*re.split(r"\s{2,}", text.strip(), maxsplit=1), ""][:2]
        lines.append(f"  {name + '=' + value:<26} {what}")
    return "\n".join(lines)


def parse(command: str, summary: str, options: dict[str, str], defaults: dict[str, str | None]) -> dict:
    """This command's `key=value` arguments from sys.argv; --help prints `options` and exits."""
    from finetune.schema import did_you_mean

    argv = sys.argv[1:]
    if "--help" in argv or "-h" in argv:
        print(_usage(command, summary, options))
        sys.exit(0)
    if "--version" in argv:
        from finetune import __version__

        print(f"finetune {__version__}")
        sys.exit(0)
    given = dict(defaults)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise UserError(
                f"'{arg}': write this command's options as key=value (e.g. run=runs/my-run). "
                f"Options: {', '.join(options)}."
            )
        if key not in options:
            raise UserError(
                f"unknown option '{key}' for python -m {command}.{did_you_mean(key, list(options))} "
                f"Options: {', '.join(options)}."
            )
        given[key] = value
    if not given.get("run"):
        raise UserError(
            f"which run? Add run=<run folder>, e.g. python -m {command} run=runs/<name> (or run=latest)."
        )
    return given


def main(command: Callable[[], None]) -> None:
    """Run a command; a user mistake is one `finetune: error:` line and exit 2, Ctrl-C exits quietly."""
    from finetune.errors import _quiet_warnings

    _quiet_warnings()
    try:
        command()
    except UserError as err:
        print(f"finetune: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\nfinetune: stopped (Ctrl-C).", file=sys.stderr)
        sys.exit(130)


@dataclass
class Run:
    folder: Path
    cfg: Config | None  # the run's fully resolved config (config.yaml); None for a bare model folder
    weights: Path  # adapter/, model/, merged/ or a bare model folder
    kind: str  # "adapter" (LoRA over the base), "full" (full fine-tune) or "model" (merged / bare folder)

    @property
    def home(self) -> Path:
        """The run folder itself, also when `folder` is its merged/ (where export/ goes)."""
        return self.folder.parent if self.kind == "model" and self.cfg is not None else self.folder

    @property
    def name(self) -> str:
        return self.home.name


def _latest(base: Path) -> Path:
    runs = [p for p in base.glob("*/config.yaml")] if base.is_dir() else []
    if not runs:
        raise UserError(
            f"run=latest: no run folders in {base}/. Give the folder: run=<output_dir>/<run name>."
        )
    return max(runs, key=lambda p: p.stat().st_mtime).parent


def is_model_folder(path: Path) -> bool:
    weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    return (path / "config.json").is_file() and weights


def open_run(spec: str) -> Run:
    """The run folder `spec` names (or `latest`), or a merged/bare model folder, checked."""
    from finetune import schema

    folder = _latest(Path("runs")) if spec == "latest" else Path(spec).expanduser()
    if not folder.exists():
        raise UserError(
            f"run={spec}: no such folder. Give a run folder, e.g. run=runs/<run name> (or run=latest)."
        )
    if not folder.is_dir():
        raise UserError(f"run={spec} is a file: give the run's folder (the one holding config.yaml).")
    if not (folder / "config.yaml").is_file() and is_model_folder(folder):
        parent = folder.parent / "config.yaml"  # <run>/merged: keep the run's config for its name and base
        cfg = schema.load(parent) if parent.is_file() else None
        return Run(folder, cfg, folder, "model")
    if not (folder / "config.yaml").is_file():
        raise UserError(
            f"run={spec}: not a run folder (no config.yaml in it). A run folder is what `python -m finetune` "
            "wrote under output_dir (runs/ by default)."
        )
    cfg = schema.load(folder / "config.yaml")
    for sub, kind in (("adapter", "adapter"), ("model", "full")):
        if (folder / sub).is_dir():
            return Run(folder, cfg, folder / sub, kind)
    raise UserError(
        f"run={spec} has no trained weights (no adapter/ or model/ in it): the run stopped before it finished. "
        f"Resume it with python -m finetune resume={folder}, or train again."
    )


def base_path(run: Run) -> str:
    """Where the run's base model loads from, offline: name_or_path, or the converted cache copy."""
    from finetune import models

    return models.weights_path(run.cfg.model)


def user_base(cfg: Config) -> str:
    """The base model's name for people and other tools: the hub id or folder the run was given,
    never the converted copy inside our cache (no one else knows it is there)."""
    return str(cfg.model.name_or_path)


def point_adapter_at_user_base(adapter: Path, cfg: Config) -> str | None:
    """Make adapter_config.json (and peft's model card) name the user's base model instead of a path
    inside finetune's cache. Returns the old name when it changed something."""

    file = adapter / "adapter_config.json"
    if not file.is_file():
        return None
    config = json.loads(file.read_text())
    old, new = config.get("base_model_name_or_path"), user_base(cfg)
    cache = str(cache_dir().expanduser().resolve())
    if not old or old == new or not str(Path(old).expanduser().resolve()).startswith(cache):
        return None
    config["base_model_name_or_path"] = new
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    card = adapter / "README.md"
    if card.is_file():
        card.write_text(card.read_text().replace(old, new))
    return old


def model_source(run: Run) -> str:
    """The folder whose config.json and weights the run's model starts from."""
    return base_path(run) if run.kind == "adapter" else str(run.weights)


def saved_dtype(path: str) -> str:
    """The dtype a checkpoint was stored in (config.json), float32 when it does not say."""
    config = (
        json.loads((Path(path) / "config.json").read_text()) if (Path(path) / "config.json").is_file() else {}
    )
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return dtype if dtype in DTYPES else "float32"


def load_model(run: Run, dtype: str = "auto", merge: bool = True, device: str = "cpu"):
    """(model, tokenizer) for the run: the adapter over its un-quantized base (merged into it when
    `merge`), a full fine-tune's model, or a model folder. `dtype=auto` keeps the base's own dtype."""
    import logging

    # peft imports bitsandbytes, which logs on CPU that an optional hub kernel is missing; the
    # load progress bars say nothing for a model this command loads once.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source = model_source(run)
    if dtype == "auto":
        dtype = saved_dtype(source)
    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype}: use one of {', '.join(DTYPES)}.")
    trust = bool(run.cfg.model.trust_remote_code) if run.cfg is not None else False
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=getattr(torch, dtype), trust_remote_code=trust
        )
    except OSError as err:
        raise UserError(f"could not load the model from {source}: {str(err).splitlines()[0]}") from None
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise
        raise UserError(
            f"{source} is not a text-only causal language model (a vision-language model?): merge, export "
            "and chat handle text models only."
        ) from None
    if run.kind == "adapter":
        from peft import PeftModel

        from finetune import experts
        from finetune.memory.reading import keep_linear_targets

        keep_linear_targets()  # reload the shared-expert / dense-MLP adapters where they trained
        model = PeftModel.from_pretrained(model, str(run.weights))
        if merge:
            model = model.merge_and_unload()
        # A quantized MoE run keeps its expert adapters beside PEFT's: fold them into the 16-bit experts.
        experts.merge_expert_adapters(model if merge else model.get_base_model(), run.weights)
    tokenizer = AutoTokenizer.from_pretrained(str(run.weights), trust_remote_code=trust)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
