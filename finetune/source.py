"""Where a model comes from: its config.json (for planning) and its weights (for training).

`model.name_or_path` always wins. Its config is read from the local folder it names; else from the
catalog's numbers (configs/model/*.yaml `arch`) while it is the catalog model they describe; else
from the Hugging Face cache; else from the hub. When none has it, planning stops with one line
before anything loads — it never plans another model under this one's name.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from finetune import UserError
from finetune.schema import ModelConfig

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# config.json numbers that must be whole numbers when present (a string here breaks every estimate)
_WHOLE = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
)


def is_catalog(model_cfg: ModelConfig) -> bool:
    """Does the model group's `arch` describe model.name_or_path (and not another model)?"""
    arch = model_cfg.arch or {}
    return bool(arch) and arch.get("_name_or_path") == model_cfg.name_or_path


def local_folder(name_or_path: str) -> Path | None:
    """The local folder name_or_path names, None for a hub id; a missing path is an error."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(
            f"model.name_or_path={name_or_path} is a file: give the folder that holds config.json "
            "(and the weights, for training)."
        )
    if not _HUB_ID.match(name_or_path) or name_or_path.startswith((".", "~")):
        raise UserError(
            f"model.name_or_path={name_or_path}: no such folder. Give a local model folder (with config.json) "
            "or a hub id such as Qwen/Qwen2.5-7B-Instruct."
        )
    return None


def read_config(file: Path) -> dict:
    """A config.json, checked enough that planning can trust it (keys starting with `_` dropped)."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{file}: cannot read it ({err.__class__.__name__}: {err}).") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{file}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}).") from None
    if not isinstance(config, dict):
        raise UserError(f"{file}: a JSON {type(config).__name__}; config.json must hold an object.")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise UserError(
            f'{file} has no "model_type": it is not a transformers model config. '
            'Use the config.json that came with the model (it names its model_type, e.g. "llama").'
        )
    for part, where in ((config, ""), (config.get("text_config") or {}, "text_config.")):
        for key in _WHOLE:
            value = part.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise UserError(f'{file}: "{where}{key}" is {value!r}; it must be a whole number.')
    return {k: v for k, v in config.items() if not k.startswith("_")}  # `_` keys: notes, not architecture


def _cached_or_downloaded(repo: str) -> Path:
    """config.json of a hub model from the local Hugging Face cache, else from the hub."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json")
    if isinstance(cached, str):
        return Path(cached)
    try:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false"):
            raise OSError("offline mode is on (HF_HUB_OFFLINE)")
        _hub_reachable()  # the hub client retries a dead network for ~20 s: ask the resolver once instead
        return Path(hf_hub_download(repo, "config.json", etag_timeout=5))
    except Exception as err:  # offline, no network, unknown or gated repository: all the user's to fix
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"model.name_or_path={repo}: cannot read its config.json ({reason[:160]}), and it is not in the "
            "local cache. Download the model where you can (`hf download "
            f"{repo} --local-dir <folder>`) and give model.name_or_path=<folder>, or pick a catalog model "
            "(model=<name>, see configs/model/)."
        ) from None


def _hub_reachable() -> None:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        raise OSError(f"no network: {host} cannot be resolved") from None


def architecture(model_cfg: ModelConfig) -> dict:
    """The config.json dict to plan `model_cfg` with (see the module docstring for the order)."""
    folder = local_folder(model_cfg.name_or_path)
    if folder is not None:
        if not (folder / "config.json").is_file():
            raise UserError(
                f"model.name_or_path={model_cfg.name_or_path} holds no config.json: give the model's folder "
                "(as written by save_pretrained or `hf download`)."
            )
        return read_config(folder / "config.json")
    if is_catalog(model_cfg):
        return {k: v for k, v in model_cfg.arch.items() if k != "_name_or_path"}
    return read_config(_cached_or_downloaded(model_cfg.name_or_path))


def display_name(model_cfg: ModelConfig) -> str:
    """A short name for run folders when name_or_path is not the catalog model: its last part."""
    return Path(model_cfg.name_or_path.rstrip("/")).name or "model"
