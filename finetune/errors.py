"""Turn Hydra and OmegaConf composition errors into one message that names the key and the fix.

Hydra already detects every problem (unknown key, unknown option, wrong type, bad syntax); it only
lacks the suggestion. Anything not recognised here is a bug in finetune and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from finetune import UserError, config_dir
from finetune.schema import Config, did_you_mean, unknown_key


def _where(err: OmegaConfBaseException) -> str:
    """The key path of an OmegaConf error (full_key), without the message's extra lines."""
    return str(getattr(err, "full_key", "") or getattr(err, "key", "") or "")


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
        return unknown_key(key, source)
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


def _groups() -> dict[str, list[str]]:
    """Each config group the user picks from, with its options (configs/<group>/*.yaml)."""
    import yaml

    defaults = {}
    for entry in yaml.safe_load((config_dir() / "finetune.yaml").read_text())["defaults"]:
        if isinstance(entry, dict):
            defaults.update({str(k): str(v) for k, v in entry.items()})
    found = {}
    for folder in sorted(config_dir().iterdir()):
        if folder.is_dir() and folder.name != "tuned":  # tuned/ applies by itself (model_data)
            names = sorted(p.stem for p in folder.glob("*.yaml"))
            first = defaults.get(folder.name)
            found[folder.name] = [first, *(n for n in names if n != first)] if first in names else names
    return found


def _help(command: str, summary: str, options: dict[str, str]) -> str:
    lines = [
        f"usage: python -m {command} [group=option ...] [group.key=value ...]"
        + "".join(f" [{name}=...]" for name in options),
        "",
        summary,
        "",
    ]
    if options:
        lines.append("This command's own options:")
        lines += [f"  {name}={text}" for name, text in options.items()]
        lines.append("")
    lines.append("Config groups (group=option; the default first):")
    for group, names in _groups().items():
        lines.append(f"  {group:<6} {', '.join(names)}")
    lines += [
        "",
        "Keys: group.key=value, e.g. optim.lr=1e-4 batch.size=2 data.path=chats.jsonl; every key and its",
        f"value: python -m {command} --cfg job. Your own recipe: -cd <folder> -cn <recipe>.",
        "A sweep: -m lora=r8,r16 (one job each). --version prints the version; --hydra-help, Hydra's help.",
    ]
    return "\n".join(lines)


def _flag(argv: list[str], short: str, long: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg in (short, long) and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"{long}="):
            return arg.split("=", 1)[1]
    return None


def yaml_problem(file: Path) -> str | None:
    """'file:line: ...' for a YAML file that does not parse, else None."""
    import yaml

    try:
        yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        line = f":{mark.line + 1}" if mark else ""
        tabs = " (a tab: YAML indents with spaces only)" if "'\\t'" in str(err.problem) else ""
        return f"{file}{line}: not valid YAML: {err.problem}{tabs}."
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        return f"{file}: not valid YAML: {err}."
    return None


def _check_recipe(argv: list[str]) -> None:
    """-cd <folder> -cn <recipe>: the folder exists, the recipe parses and builds on finetune's defaults."""
    import yaml

    folder, name = _flag(argv, "-cd", "--config-dir"), _flag(argv, "-cn", "--config-name")
    if folder is not None and not Path(folder).expanduser().is_dir():
        _fail(f"-cd {folder}: no such folder (the folder that holds your recipe YAML files).")
    if name is None:
        return
    base = Path(folder).expanduser() if folder else config_dir()
    file = base / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not file.is_file():
        known = sorted(p.stem for p in base.glob("*.yaml"))
        _fail(
            f"-cn {name}: no recipe {file.name} in {base}.{did_you_mean(name, known)} "
            f"Recipes there: {', '.join(known) or 'none'}."
        )
    problem = yaml_problem(file)
    if problem:
        _fail(problem)
    spec = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    defaults = spec.get("defaults", []) if isinstance(spec, dict) else []
    if file.parent != config_dir() and "finetune" not in [d for d in defaults if isinstance(d, str)]:
        _fail(
            f"{file} does not build on finetune's defaults: start it with `defaults: [finetune, _self_]` "
            "(group choices go between them as `- override model: llama-3-8b`; see recipes/README.md)."
        )


def _check_argv(argv: list[str]) -> None:
    """Mistakes Hydra would answer with a traceback or a puzzling message, caught before it composes."""
    _check_recipe(argv)
    groups = _groups()
    values = {
        _flag(argv, "-cd", "--config-dir"),
        _flag(argv, "-cn", "--config-name"),
        _flag(argv, "-c", "--cfg"),
    }
    for arg in argv:
        if (arg.startswith("-") and not arg.startswith("~")) or arg in values:
            continue
        key, sep, value = arg.lstrip("+").partition("=")
        if key.startswith("~"):
            target = key[1:]
            group, _, rest = target.partition(".")
            if group in groups and not rest:
                _fail(
                    f"~{group} removes the {group} group, which every run needs: pick an option instead ({group}=<{'|'.join(groups[group][:4])}|...>)."
                )
            _fail(
                f"~{target} removes a key, but every key of the schema has a value: set {target}=<value> instead."
            )
        if sep and key in groups and value.replace(".", "", 1).lstrip("-").isdigit():
            hint = did_you_mean(value, groups[key]) or did_you_mean(f"r{value}", groups[key])
            _fail(
                f"{key}={value}: a {key} option is a name, not a number.{hint} Options for {key}: "
                f"{', '.join(groups[key])}. To set one key use {key}.<key>={value} (e.g. lora.r=16)."
            )


def run_cli(
    job: Callable[[Config], None],
    command: str = "finetune",
    summary: str = "Fine-tune a model: compose the config groups, plan the run for the GPU, then train.",
    options: dict[str, str] | None = None,
    machine_output: bool = False,
) -> None:
    """Compose the config from sys.argv with Hydra and run `job(cfg)`; user errors become one line.

    Hydra prints its own composition errors and exits; with HYDRA_FULL_ERROR it raises them instead,
    so they can be explained here with a did-you-mean. Whoever set it himself gets the traceback.
    `machine_output`: the job prints JSON on stdout, so sweep headings go to stderr.
    """
    argv = sys.argv[1:]
    if "--help" in argv or "-h" in argv:
        print(_help(command, summary, options or {}))
        return
    if "--version" in argv:
        from finetune import __version__

        print(f"finetune {__version__}")
        return
    _check_argv(argv)
    _quiet_warnings()
    import hydra

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="finetune")
    def _job(cfg: typing.Any) -> None:
        _sweep_heading(machine_output)
        from finetune import schema

        try:
            job(schema.typed(cfg))  # validated once; every module takes the typed Config from here
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
    except KeyboardInterrupt:
        print("\nfinetune: stopped (Ctrl-C).", file=sys.stderr)
        sys.exit(130)


def _sweep_heading(machine_output: bool) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        overrides = " ".join(hc.overrides.task) or "(no overrides)"
        print(
            f"=== job {hc.job.num}: {overrides}",
            file=sys.stderr if machine_output else sys.stdout,
            flush=True,
        )


def _quiet_warnings() -> None:
    """One line per finetune warning; the libraries' deprecation notices are not the user's to act on."""
    import warnings

    from finetune import FinetuneWarning

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, FinetuneWarning):
            print(f"finetune: warning: {message}", file=sys.stderr, flush=True)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


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
