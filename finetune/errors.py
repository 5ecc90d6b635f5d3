"""Turn Hydra and OmegaConf composition errors into one message that names the key and the fix.

Hydra already detects every problem (unknown key, unknown option, wrong type, bad syntax); it only
lacks the suggestion. Anything not recognised here is a bug in finetune and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from collections.abc import Callable

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from finetune import UserError, config_dir
from finetune.schema import Config, did_you_mean


def _schema_keys(full_key: str) -> list[str]:
    """The keys the schema allows next to `full_key` (its siblings)."""
    node: typing.Any = Config
    for part in full_key.split(".")[:-1]:
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        node = hints.get(part)
    if not dataclasses.is_dataclass(node):
        return []
    return [f.name for f in dataclasses.fields(node)]


def _where(err: OmegaConfBaseException) -> str:
    """The key path of an OmegaConf error (full_key), without the message's extra lines."""
    return str(getattr(err, "full_key", "") or getattr(err, "key", "") or "")


def _unknown_key(full_key: str, source: str) -> str:
    keys = _schema_keys(full_key)
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    prefix = f"{parent}." if parent else ""
    hint = did_you_mean(full_key.rsplit(".", 1)[-1], keys)
    if hint:
        hint = hint.replace("'", f"'{prefix}", 1)
    known = f" Keys{' of ' + parent if parent else ''}: {', '.join(keys)}." if keys else ""
    return f"unknown key '{full_key}'{source}.{hint}{known}"


def explain(err: BaseException) -> str | None:
    """A one-paragraph message for a user mistake, or None for an unexpected error (a bug)."""
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, MissingConfigException) and err.options is not None and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        if not group:  # a primary config (-cn) that does not exist
            return f"no config named '{option}' in the config folder. Check -cd/-cn.{did_you_mean(option, err.options)}"
        return (
            f"{group}={option} is not a known option.{did_you_mean(option, err.options)} "
            f"Options for {group}: {', '.join(sorted(err.options))}."
        )
    if isinstance(err, MissingConfigException):
        return str(err).split("\nConfig search path", 1)[0].strip()
    if isinstance(err, OverrideParseException):
        return (
            f"could not parse the command line: {str(err).splitlines()[0]}. "
            "Write overrides as key=value (quote lists: 'lora.target_modules=[q_proj,v_proj]')."
        )
    # Hydra chains the OmegaConf error as the cause, or only as the context when merging a file.
    cause = (err.__cause__ or err.__context__) if isinstance(err, ConfigCompositionException) else err
    text = str(err)
    source = ""
    if isinstance(err, ConfigCompositionException) and text.startswith("In '"):
        source = f" in {text.split(chr(39))[1]}.yaml"  # Hydra names the config file it was merging
    if isinstance(cause, MissingMandatoryValue):
        key = _where(cause)
        return f"'{key}' must be set: add {key}=<value> on the command line or in your recipe."
    if isinstance(cause, ConfigKeyError) or (
        isinstance(err, ConfigCompositionException) and text.startswith("Could not override")
    ):
        key = _where(cause) if isinstance(cause, OmegaConfBaseException) else text.split("'")[1]
        return _unknown_key(key, source)
    if isinstance(cause, ValidationError):
        key = _where(cause)
        detail = str(cause).splitlines()[0]
        return f"wrong value for '{key}'{source}: {detail}."
    if isinstance(err, ConfigCompositionException):
        return text.splitlines()[0]
    return None


def _fail(message: str) -> None:
    print(f"finetune: error: {message}", file=sys.stderr)
    sys.exit(2)


def run_cli(job: Callable[[typing.Any], None]) -> None:
    """Compose the config from sys.argv with Hydra and run `job(cfg)`; user errors become one line.

    Hydra prints its own composition errors and exits; with HYDRA_FULL_ERROR it raises them instead,
    so they can be explained here with a did-you-mean. Whoever set it himself gets the traceback.
    """
    import hydra

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="finetune")
    def _job(cfg: typing.Any) -> None:
        try:
            job(cfg)
        except UserError as err:  # inside the job: Hydra would print a banner before re-raising
            _fail(str(err))

    raw = "HYDRA_FULL_ERROR" in os.environ
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _job()
    except Exception as err:
        message = explain(err)
        if raw or message is None:
            raise
        _fail(message)


def own_args(defaults: dict[str, str | None]) -> dict[str, str | None]:
    """Take this command's own `key=value` arguments (format=, chart=, ...) out of sys.argv, so Hydra
    composes the rest exactly as for training. Returns the defaults updated with what was given."""
    own, rest = dict(defaults), []
    for arg in sys.argv[1:]:
        key, sep, value = arg.partition("=")
        if sep and key in own:
            own[key] = value
        else:
            rest.append(arg)
    sys.argv = [sys.argv[0], *rest]
    return own
