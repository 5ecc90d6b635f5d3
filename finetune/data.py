"""Training data, one linear path from what the user has to what the model is trained on:

    read (demo | file/folder | hub) ─► check and normalise every row (one function, every format)
    ─► split ─► render with the chat template and tokenize: input_ids + labels (-100 = not trained)
    ─► truncate or drop over-long examples, with counts ─► SFTTrainer (it only batches or packs)

Every format becomes one of the forms TRL understands: `messages` (a conversation), `prompt` +
`completion` (message lists; loss on the completion) or `text` (loss on everything). We tokenize
ourselves so that `python -m finetune.data` shows exactly the tokens, and the trained ones, that
training sees. Bad data raises `UserError` naming the file, the line or row, and the fix.

`python -m finetune.data <the same overrides as training> [example=N] [format=table|json]` loads,
checks and tokenizes the data with the model's tokenizer (no weights) and prints what it found.
"""

from __future__ import annotations

import calendar
import datetime as dt
import json
import os
import random
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune import UserError

DEMO_INSTRUCTION = "Convert to ISO date: "
SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# The columns each format reads (our names; data.columns.<name>=<yours> maps a different one).
FORMAT_COLUMNS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
# Role names in the wild -> the four roles chat templates know. ShareGPT writes human/gpt.
ROLES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool",
}  # fmt: skip
AUTO_MAX_LENGTH_QUANTILE = 0.99  # data.max_length=auto covers this share of examples untruncated
AUTO_MAX_LENGTH_SAMPLE = 2000  # examples tokenized to measure the length distribution
PARALLEL_ROWS = 50_000  # from this many examples, checking and tokenizing run in several processes
PLANNING_MAX_LENGTH = 2048
"""data.max_length=auto when planning without the tokenizer or the data on this machine: a common
length for chat SFT. A real run always measures the data."""
TRAINED, MASKED = "[[", "]]"  # how `python -m finetune.data` marks trained tokens without colour

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# data.chat_template=<name>: templates for base models that ship none, with the tokens each relies on.
# llama-3, gemma and phi-3 are byte-identical to the originals TRL recognises (trl/chat_templates/).
CHAT_TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml": (CHATML, ("<|im_start|>", "<|im_end|>")),
    "llama-3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
        "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
        "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}",
        ("<start_of_turn>", "<end_of_turn>"),
    ),
    "phi-3": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
        "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",
        ("<|user|>", "<|assistant|>", "<|end|>"),
    ),
    # Plain text markers: for base models without chat tokens; the reply ends with the EOS token.
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
        "{% else %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}",
        (),
    ),
}


# ---------------------------------------------------------------------------------------------
# The built-in demo task


def _date_text(day: dt.date, rng: random.Random) -> str:
    """One of several ways people write a date, so the model must learn the mapping, not one pattern."""
    month, short = calendar.month_name[day.month], calendar.month_abbr[day.month]
    return rng.choice(
        [f"{month} {day.day}, {day.year}", f"{day.day} {month} {day.year}", f"{short} {day.day}, {day.year}"]
    )


def demo_examples(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Date-normalisation examples; held-out dates never appear in training."""
    rng = random.Random(seed)
    start, span = dt.date(1950, 1, 1), (dt.date(2049, 12, 31) - dt.date(1950, 1, 1)).days
    days = rng.sample(range(span + 1), n_train + n_eval)
    examples = []
    for offset in days:
        day = start + dt.timedelta(days=offset)
        examples.append(
            {
                "prompt": [{"role": "user", "content": DEMO_INSTRUCTION + _date_text(day, rng)}],
                "completion": [{"role": "assistant", "content": day.isoformat()}],
            }
        )
    return examples[:n_train], examples[n_train:]


# ---------------------------------------------------------------------------------------------
# Reading: files, folders, saved datasets, the hub


def load(data_cfg: Any, eval_samples: int, seed: int):
    """(train, eval) datasets in normal form; eval is None when nothing is held out.

    Normal form: `messages`, or `prompt` + `completion` (lists of {role, content}), or `text`;
    plus `origin` ("file:line" or "file, row N": where each example came from) and `images`
    (paths) for VLM data. Arrow files on disk, memory-mapped: no file is held in Python lists.
    """
    from datasets import Dataset

    _quiet_datasets()
    if data_cfg.name == "demo":
        train, held_out = demo_examples(data_cfg.num_train, max(eval_samples, 1), seed)
        return Dataset.from_list(train), Dataset.from_list(held_out)
    # validate() checks data=file; data=hub is checked here, so that its preset composes without a path
    if not data_cfg.path:
        what = "a dataset id" if data_cfg.name == "hub" else "a file or folder"
        raise UserError(f"data={data_cfg.name} needs data.path=<{what}>.")
    if data_cfg.name == "hub":
        train = _read_hub(data_cfg, data_cfg.split)
        if data_cfg.eval_split:
            return train, _read_hub(data_cfg, data_cfg.eval_split)
    else:
        train = _read_files(data_cfg, data_cfg.path, "data.path")
        if data_cfg.eval_path:
            return train, _read_files(data_cfg, data_cfg.eval_path, "data.eval_path")
    if data_cfg.eval_fraction <= 0 or len(train) < 2:
        return train, None
    held = max(1, round(len(train) * data_cfg.eval_fraction))
    split = train.train_test_split(test_size=held, seed=seed)
    return split["train"], split["test"]


def _quiet_datasets() -> None:
    """Progress bars help on a terminal with a big file; in logs and pipes they are noise."""
    import datasets

    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _files(spec: str, key: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise UserError(
                f"{key}={spec}: unsupported file type '{path.suffix}'. Use {', '.join(SUFFIXES)}."
            )
        return [path]
    if path.is_dir():
        files = sorted(
            f
            for f in path.rglob("*")
            if f.is_file()
            and f.suffix.lower() in SUFFIXES
            and not any(p.startswith(".") for p in f.relative_to(path).parts)
        )
        if not files:
            seen = sorted(p.name for p in path.iterdir())[:8]
            raise UserError(
                f"{key}={spec}: the folder holds no {'/'.join(SUFFIXES)} files (found: {', '.join(seen) or 'nothing'})."
            )
        return files
    hint = ""
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        hint = f" To load the hub dataset '{spec}', use data=hub data.path={spec}."
    raise UserError(
        f"{key}={spec}: no such file or folder. Give a {'/'.join(SUFFIXES)} file or a folder of them.{hint}"
    )


def _read_files(data_cfg: Any, spec: str, key: str):
    """Every file of `spec` (a file, a folder of files, or a folder written by save_to_disk), normalised."""
    from datasets import concatenate_datasets, load_from_disk

    path = Path(spec).expanduser()
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        saved = load_from_disk(str(path))
        if hasattr(saved, "keys"):  # a DatasetDict: take the training split
            saved = saved[data_cfg.split if data_cfg.split in saved else next(iter(saved))]
        return _non_empty(normalise(saved, data_cfg, str(path), path), spec)
    parts = [normalise(_read_file(file), data_cfg, str(file), file.parent) for file in _files(spec, key)]
    try:
        dataset = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    except ValueError:  # different forms in one folder cannot share columns
        forms = {p[0]["origin"]: [c for c in p.column_names if c != "origin"] for p in parts}
        raise UserError(
            f"{key}={spec}: the files hold different kinds of data ({forms}); keep one kind per folder "
            "(messages, ShareGPT and Alpaca files mix; prompt/completion and text files do not)."
        ) from None
    return _non_empty(dataset, spec)


def _non_empty(dataset, where: str):
    if len(dataset) == 0:
        raise UserError(f"{where} holds no examples.")
    return dataset


def _read_file(file: Path):
    """One file as an Arrow dataset on disk, values kept as written.

    JSON goes in as one raw string per record (parsed and checked by `normalise`), so a bad line
    is reported by its number and no value is re-typed: pyarrow's own JSON reader turns strings
    that look like dates ("2021-03-05") into timestamps. CSV cells are read as strings too.
    """
    import csv

    import datasets

    if file.stat().st_size == 0:
        raise UserError(f"{file} holds no examples (the file is empty). Remove it or fill it.")
    suffix = file.suffix.lower()
    raw_json = datasets.Features({"_json": datasets.Value("string"), "origin": datasets.Value("string")})
    try:
        if suffix in (".json", ".jsonl"):
            stat = file.stat()  # size and time in the cache key: a changed file is read again
            stamp = f"{stat.st_size}-{stat.st_mtime_ns}"
            raw = datasets.Dataset.from_generator(
                _json_records, gen_kwargs={"path": str(file), "stamp": stamp}, features=raw_json
            )
        elif suffix == ".csv":
            with open(file, newline="", encoding="utf-8", errors="replace") as handle:
                header = next(csv.reader(handle), [])
            strings = datasets.Features({name: datasets.Value("string") for name in header})
            raw = datasets.load_dataset(
                "csv", data_files=str(file), split="train", features=strings, na_filter=False
            )
        else:
            raw = datasets.load_dataset("parquet", data_files=str(file), split="train")
    except UserError:
        raise
    except (
        Exception
    ) as err:  # datasets wraps parse errors in several types; the innermost has the parser's words
        while err.__cause__ is not None or err.__context__ is not None:
            if isinstance(err.__cause__ or err.__context__, UserError):
                raise (err.__cause__ or err.__context__) from None
            err = err.__cause__ or err.__context__
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"could not read {file}: {detail}") from None
    if len(raw) == 0:
        raise UserError(f"{file} holds no examples (only blank lines). Remove it or fill it.")
    return raw


def _json_records(path: str, stamp: str):
    """(raw record, origin) for every non-blank line of a .jsonl file, or every element of a .json array."""
    file = Path(path)
    if file.suffix.lower() == ".json":
        try:
            with open(file, encoding="utf-8", errors="replace") as handle:
                # A JSON array has no record boundaries to stream by: .jsonl is the format for big data.
                records = json.load(handle)
        except json.JSONDecodeError as err:
            if "Extra data" not in err.msg:  # otherwise: JSON Lines in a .json file, read line by line below
                raise UserError(
                    f"{file}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})."
                ) from None
        else:
            if not isinstance(records, list):
                raise UserError(
                    f"{file}: a JSON {type(records).__name__}; a .json file must hold an array of examples."
                )
            for number, record in enumerate(records, 1):
                yield {"_json": json.dumps(record, ensure_ascii=False), "origin": f"{file}, record {number}"}
            return
    with open(file, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                yield {"_json": line, "origin": f"{file}:{number}"}


def _read_hub(data_cfg: Any, split: str):
    """A dataset id through datasets.load_dataset (a local dataset folder works the same way)."""
    from datasets import load_dataset

    name = data_cfg.path
    try:
        raw = load_dataset(name, data_cfg.subset, split=split)
    except ConnectionError as err:
        offline = "OfflineMode" in str(err)
        raise UserError(
            f"data.path={name}: cannot reach the Hugging Face Hub ({'offline mode is on' if offline else 'no network'}) "
            "and the dataset is not in the local cache. Without network: download it where you can "
            f"(`hf download {name} --repo-type dataset --local-dir <folder>`), copy the folder here and use "
            "data=file data.path=<folder>."
        ) from None
    except ValueError as err:  # unknown split or subset
        raise UserError(
            f"data.path={name}: {str(err).splitlines()[0]} (data.split={split}, data.subset={data_cfg.subset})"
        ) from None
    except Exception as err:  # DatasetNotFoundError, gated or private repositories, ...
        raise UserError(
            f"data.path={name}: could not load it with datasets.load_dataset: {str(err).splitlines()[0]}. "
            "Check the id (and `hf auth login` for gated or private datasets), or use data=file for local files."
        ) from None
    return _non_empty(
        normalise(raw, data_cfg, f"{name} [{split}]", Path.cwd()), f"data.path={name} [{split}]"
    )


# ---------------------------------------------------------------------------------------------
# Checking and normalising: every format, one function


def detect_format(columns: list[str], data_cfg: Any, source: str) -> str:
    """The format of a dataset from its columns (after data.columns mapping), or data.format when set."""
    from finetune.schema import did_you_mean

    wanted = data_cfg.format
    if wanted != "auto":
        missing = [c for c in FORMAT_COLUMNS[wanted] if c not in columns]
        if not missing:
            return wanted
        hints = "".join(did_you_mean(c, columns) for c in missing)
        raise UserError(
            f"data.format={wanted} needs the column(s) {', '.join(repr(c) for c in missing)}, but {source} has "
            f"{columns}.{hints} Map yours with data.columns.{missing[0]}=<your column>."
        )
    for fmt, needed in FORMAT_COLUMNS.items():
        if all(c in columns for c in needed):
            return fmt
    expected = "; ".join(f"{fmt}: {' + '.join(cols)}" for fmt, cols in FORMAT_COLUMNS.items())
    close = [did_you_mean(c, [n for cols in FORMAT_COLUMNS.values() for n in cols]) for c in columns]
    hint = next((h for h in close if h), "")
    raise UserError(
        f"{source} has the columns {columns}, which match no known format. Expected ({expected}).{hint} "
        "Map yours with data.columns.<name>=<your column> (e.g. data.columns.messages=dialog), "
        "or force a format with data.format=<name>."
    )


def normalise(raw, data_cfg: Any, source: str, base: Path):
    """Check every row of `raw` and convert it to normal form; the first bad row raises with its location.

    `raw` is a typed Arrow dataset (Parquet, CSV, the hub, save_to_disk) or raw JSON records
    (`_json` + `origin`, from `_read_file`). Image paths are checked relative to `base`.
    """
    import pyarrow.compute as pc
    from datasets import Features, Json, List, Value

    renamed = {theirs: ours for ours, theirs in _columns(data_cfg).items() if theirs}
    raw_json = "_json" in raw.column_names
    found = raw.column_names
    if raw_json:  # the first record's keys name the columns
        try:
            found = list(_record(raw[0]["_json"], lambda problem: _fail(raw[0]["origin"], problem)))
        except _BadRow as bad:
            raise UserError(f"{bad.origin}: {bad.problem}") from None
    for theirs, ours in renamed.items():
        if theirs not in found:
            raise UserError(
                f"data.columns.{ours}={theirs}: {source} has no column '{theirs}'. Its columns: {found}."
            )
    # JSON records are renamed row by row. Any image key in the file: message contents stay part lists (JSON).
    if raw_json:
        columns = list(dict.fromkeys(renamed.get(c, c) for c in found))
        lines = raw.data.column("_json")
        images = next((theirs for theirs, ours in renamed.items() if ours == "images"), "images")
        if "images" not in columns and pc.any(pc.match_substring(lines, f'"{images}"')).as_py():
            columns.append("images")  # some later record has image paths
        multimodal = pc.any(pc.match_substring_regex(lines, r'"(image|images|image_url)"\s*:')).as_py()
    else:
        clashing = [ours for ours in renamed.values() if ours in raw.column_names and ours not in renamed]
        raw = raw.remove_columns(clashing).rename_columns(renamed) if renamed else raw
        renamed, columns = {}, raw.column_names
        contents = [_content_feature(raw.features[c]) for c in CHAT_COLUMNS if c in raw.column_names]
        multimodal = "images" in raw.column_names or any(not _is_text(c) for c in contents)
    fmt = detect_format(columns, data_cfg, source)
    print(f"data: {source}: {len(raw)} example{'s' * (len(raw) != 1)}, {fmt} format", file=sys.stderr)
    chat = List({"role": Value("string"), "content": Json() if multimodal else Value("string")})
    features = {"messages": chat} if fmt in ("messages", "sharegpt", "alpaca") else {}
    if fmt == "prompt_completion":
        features = {"prompt": chat, "completion": chat}
    if fmt == "text":
        features = {"text": Value("string")}
    features["origin"] = Value("string")
    # Decoded images (a hub Image column) stay as they are; paths are checked and kept as a list.
    decoded = "images" in raw.column_names and not _is_text(
        getattr(raw.features["images"], "feature", raw.features["images"])
    )
    if decoded:
        features["images"] = raw.features["images"]
    elif "images" in columns:
        features["images"] = List(Value("string"))
    try:
        return raw.map(
            _normal_row,
            with_indices=True,
            fn_kwargs={
                "fmt": fmt,
                "source": source,
                "base": str(base),
                "renamed": renamed,
                "image_paths": "images" in columns and not decoded,
            },
            remove_columns=[c for c in raw.column_names if not (decoded and c == "images")],
            features=Features(features),
            num_proc=_processes(len(raw)),
            desc=f"Checking {Path(source).name}",
        )
    except _BadRow as bad:
        raise UserError(f"{bad.origin}: {bad.problem}") from None


CHAT_COLUMNS = ("messages", "conversations", "prompt", "completion")


def _columns(data_cfg: Any) -> dict[str, str | None]:
    from omegaconf import OmegaConf

    columns = getattr(data_cfg, "columns", None)
    if columns is None:
        return {}
    return OmegaConf.to_container(columns) if OmegaConf.is_config(columns) else dict(columns)


def _is_text(feature: Any) -> bool:
    from datasets import Value

    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def _content_feature(feature: Any) -> Any:
    """The feature of `content`/`value` inside a list-of-messages column (a string column: itself)."""
    inner = getattr(feature, "feature", None)
    if isinstance(inner, dict):
        return inner.get("content", inner.get("value"))
    return feature


class _BadRow(Exception):
    """A row that cannot be trained on; becomes a UserError with its file and line."""

    def __init__(self, origin: str, problem: str):
        super().__init__(origin, problem)
        self.origin, self.problem = origin, problem


def _fail(origin: str, problem: str):
    raise _BadRow(origin, problem)


def _record(text: str, bad) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        bad(
            f"not valid JSON ({err.msg} at column {err.colno}). Each line of a .jsonl file must be one complete "
            "JSON object: fix or delete this line."
        )
    if not isinstance(record, dict):
        bad(
            f'a JSON {type(record).__name__}, not an object. Each example must be one object such as {{"messages": [...]}}.'
        )
    return record


def _normal_row(
    row: dict, index: int, fmt: str, source: str, base: str, renamed: dict, image_paths: bool
) -> dict:
    origin = row.get("origin") or f"{source}, row {index + 1}"

    def bad(problem: str):
        raise _BadRow(origin, problem)

    if "_json" in row:
        row = _record(row["_json"], bad)
        mapped = {ours: row[theirs] for theirs, ours in renamed.items() if theirs in row}
        row = {
            **{k: v for k, v in row.items() if k not in renamed},
            **mapped,
        }  # a mapped column wins over ours
    out: dict[str, Any] = {"origin": origin}
    if fmt in ("messages", "sharegpt"):
        out["messages"] = _messages(row.get("messages" if fmt == "messages" else "conversations"), fmt, bad)
    elif fmt == "alpaca":
        instruction, extra, system, output = (
            row.get(k) for k in ("instruction", "input", "system", "output")
        )
        for key, value in (
            ("instruction", instruction),
            ("input", extra),
            ("system", system),
            ("output", output),
        ):
            if value is not None and not isinstance(value, str):
                bad(f"'{key}' is a {type(value).__name__} ({_short(value)}); it must be a string.")
        if not (output or "").strip():
            bad("'output' is empty: nothing to train on. Give the expected answer, or remove the example.")
        user = "\n\n".join(s for s in (instruction, extra) if s and s.strip())
        if not user:
            bad("'instruction' and 'input' are both empty: there is no prompt to answer.")
        system_turn = [{"role": "system", "content": system}] if system and system.strip() else []
        out["messages"] = [
            *system_turn,
            {"role": "user", "content": user},
            {"role": "assistant", "content": output},
        ]
    elif fmt == "prompt_completion":
        prompt, completion = row.get("prompt") or "", row.get("completion") or ""  # an empty CSV cell: None
        out["prompt"] = (
            [{"role": "user", "content": prompt}]
            if isinstance(prompt, str)
            else _messages(prompt, "prompt", bad, need_reply=False)
        )
        out["completion"] = (
            [{"role": "assistant", "content": completion}]
            if isinstance(completion, str)
            else _messages(completion, "completion", bad, need_reply=False)
        )
        if not any(_text_of(m["content"]).strip() for m in out["completion"]):
            bad(
                "the completion is empty: nothing to train on. Give the expected answer, or remove the example."
            )
    else:
        text = row.get("text") or ""
        if not isinstance(text, str):
            bad(f"'text' is a {type(text).__name__} ({_short(text)}); it must be a string.")
        if not text.strip():
            bad("'text' is empty: nothing to train on. Remove the example.")
        out["text"] = text
    if image_paths:  # every row gets the column: [] for none
        out["images"] = _check_images(row.get("images"), base, bad)
    for column in ("messages", "prompt", "completion"):
        for message in out.get(column) or []:
            if not isinstance(message["content"], str):
                message["content"] = [_image_part(part, base, bad) for part in message["content"]]
    return out


def _messages(value: Any, column: str, bad, need_reply: bool = True) -> list[dict]:
    """A conversation as [{role, content}], from OpenAI-style role/content or ShareGPT from/value."""
    if not isinstance(value, list) or not value:
        bad(
            f'\'{column}\' must be a non-empty list of messages ({{"role": ..., "content": ...}}), got {_short(value)}.'
        )
    messages = []
    for number, message in enumerate(value, 1):
        if not isinstance(message, dict):
            bad(
                f"message {number} of '{column}' is a {type(message).__name__} ({_short(message)}), not an object."
            )
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if not isinstance(role, str) or role.lower() not in ROLES:
            from finetune.schema import did_you_mean

            hint = did_you_mean(str(role), list(ROLES)) if isinstance(role, str) else ""
            bad(
                f"message {number} has the role {role!r}, which no chat template knows.{hint} Use system, user, "
                "assistant or tool (ShareGPT: human, gpt, system)."
            )
        if isinstance(content, list) and all(isinstance(p, dict) for p in content):
            for part in content:
                if part.get("type", "text") == "text" and not isinstance(part.get("text"), str):
                    bad(f"message {number} ({role}) has a text part without a string 'text': {_short(part)}.")
            if all(part.get("type", "text") == "text" for part in content):
                content = _text_of(content)  # text-only parts: the plain string every template takes
        elif not isinstance(content, str):
            bad(
                f"message {number} ({role}) has content of type {type(content).__name__} ({_short(content)}); "
                "content must be a string (or, for images, a list of text/image parts)."
            )
        messages.append({"role": ROLES[role.lower()], "content": content})
    if need_reply and not any(m["role"] == "assistant" and _text_of(m["content"]).strip() for m in messages):
        bad(
            "no assistant message with content: nothing to train on. Each conversation needs at least one "
            "assistant reply; add it or remove the example."
        )
    return messages


def _text_of(content: Any) -> str:
    """The text of a message: the string itself, or the text parts of a multimodal content list."""
    if isinstance(content, str):
        return content
    return "".join(p.get("text") or "" for p in content if p.get("type", "text") == "text")


def _image_part(part: dict, base: str, bad) -> dict:
    """A content part; an image part's file must exist, and its path becomes absolute for the processor."""
    key = next((k for k in ("image", "path", "url") if isinstance(part.get(k), str)), None)
    if part.get("type", "image" if key else "text") == "text" or key is None:
        return {k: v for k, v in part.items() if v is not None}
    return {**{k: v for k, v in part.items() if v is not None}, key: _check_images(part[key], base, bad)[0]}


def _check_images(refs: Any, base: str, bad) -> list[str]:
    """Image paths must exist (relative paths: next to the data file); returned absolute. URLs pass."""
    resolved = []
    for ref in [refs] if isinstance(refs, str) else list(refs or []):
        if not isinstance(ref, str):
            bad(f"an image reference must be a file path or URL, got {_short(ref)}.")
        if ref.startswith(("http://", "https://", "data:")):
            resolved.append(ref)
            continue
        path = Path(ref).expanduser()
        path = path if path.is_absolute() else Path(base) / path
        if not path.is_file():
            bad(
                f"image file '{ref}' not found (looked for {path}). Relative image paths are read from the data "
                f"file's folder ({base}); fix the path or add the file."
            )
        resolved.append(str(path.resolve()))
    return resolved


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat template


def load_tokenizer(path: str, cfg: Any, local_only: bool = False, **kwargs: Any):
    """The model's tokenizer with the chat template training uses: data.chat_template, else its own."""
    from transformers import AutoTokenizer

    from finetune.models import _missing_weights

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=cfg.model.trust_remote_code, local_files_only=local_only, **kwargs
        )
    except (OSError, ValueError) as err:
        raise _missing_weights(path, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    use_chat_template(tokenizer, cfg.data)
    return tokenizer


def use_chat_template(tokenizer, data_cfg: Any) -> None:
    """data.chat_template, when set, replaces the tokenizer's own template (it is saved with the adapter)."""
    if data_cfg.chat_template:
        tokenizer.chat_template = _named_template(data_cfg.chat_template, tokenizer)


def tokenizer_only(cfg: Any, local_only: bool = False):
    """The tokenizer for `cfg.model` without loading weights (a GGUF model: from the GGUF's metadata)."""
    from finetune import models, source

    m = cfg.model
    if m.gguf_file and source.is_catalog(m):
        converted = models.cache_dir() / "models" / m.name
        if (converted / "tokenizer_config.json").is_file():
            return load_tokenizer(str(converted), cfg, local_only)
        gguf = models._gguf_source(m.gguf_file)
        return load_tokenizer(str(gguf.parent), cfg, local_only, gguf_file=gguf.name)
    return load_tokenizer(m.name_or_path, cfg, local_only)


def _named_template(choice: str, tokenizer) -> str:
    if choice in CHAT_TEMPLATES:
        template, needs = CHAT_TEMPLATES[choice]
        vocab = tokenizer.get_vocab()
        missing = [t for t in needs if t not in vocab]
        if missing:
            warnings.warn(
                f"data.chat_template={choice}: {', '.join(missing)} are not tokens of this tokenizer, so they are "
                "spelled out in ordinary tokens and learned from scratch. Prefer the template of the model's family, "
                "or data.chat_template=alpaca (plain-text markers).",
                stacklevel=3,
            )
        return template
    if choice.endswith(".jinja"):
        path = Path(choice).expanduser()
        if not path.is_file():
            raise UserError(f"data.chat_template={choice}: no such file.")
        return path.read_text(encoding="utf-8")
    if "{%" in choice or "{{" in choice:
        return choice  # a template written inline
    from finetune.schema import did_you_mean

    raise UserError(
        f"data.chat_template={choice} is not a known template.{did_you_mean(choice, list(CHAT_TEMPLATES))} "
        f"Known: {', '.join(CHAT_TEMPLATES)}; or a .jinja file."
    )


def _marked_template(tokenizer) -> str | None:
    """A template with {% generation %} markers for this tokenizer: its own, or TRL's training variant
    of a template TRL recognises. None: assistant spans come from diffing rendered prefixes instead."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    try:
        patched = get_training_chat_template(tokenizer)
    except Exception:  # TRL does not know this template (ValueError), or cannot render its probes
        return None
    if patched is None:  # already prefix-preserving with markers
        return tokenizer.chat_template if has_generation_markers(tokenizer.chat_template) else None
    return patched


# ---------------------------------------------------------------------------------------------
# Tokenizing: the exact tokens, and which of them are trained


def encode(row: dict, tokenizer, train_on_prompt: bool, marked: str | None) -> dict:
    """Render one normal-form row and tokenize it.

    Returns the rendered `text`, `input_ids`, `labels` (-100 where not trained) and `offsets`.
    Chat rows are trained on the assistant turns (or the completion). The spans are found in the
    rendered text: by the template's {% generation %} markers when it has them, else by rendering
    the conversation up to each assistant turn, with and without that turn, and taking the text
    between. Tokens inside a span are trained; it works for any template that renders earlier
    turns the same way when later turns are added (every common one does).
    """
    if "text" in row and row.get("text") is not None:
        text = (
            row["text"]
            if row["text"].endswith(tokenizer.eos_token or "")
            else row["text"] + (tokenizer.eos_token or "")
        )
        encoded = tokenizer(text, return_offsets_mapping=True)
        return {
            "text": text,
            "input_ids": encoded["input_ids"],
            "labels": list(encoded["input_ids"]),
            "offsets": encoded["offset_mapping"],
        }

    if tokenizer.chat_template is None:
        raise UserError(
            "the tokenizer has no chat template, and this data is chat-shaped. For a base model set "
            f"data.chat_template=<{'|'.join(CHAT_TEMPLATES)}> (or a .jinja file), or train on plain text with data.format=text."
        )
    prompt_completion = row.get("prompt") is not None
    convo = _text_messages(row["prompt"] + row["completion"] if prompt_completion else row["messages"])

    def render(messages: list[dict], generation: bool = False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    if marked is not None and not train_on_prompt and not prompt_completion:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, indices = render_jinja_template(
            conversations=[convo],
            chat_template=marked,
            return_assistant_tokens_mask=True,
            **tokenizer.special_tokens_map,
        )
        text, spans = rendered[0], [tuple(s) for s in indices[0]]
    else:
        text = render(convo)
        if train_on_prompt:
            spans = [(0, len(text))]
        elif prompt_completion:
            spans = [(_common_prefix(render(_text_messages(row["prompt"]), True), text), len(text))]
        else:
            spans = []
            for i, message in enumerate(convo):
                if message["role"] == "assistant":
                    start = _common_prefix(render(convo[:i], True), text) if i else 0
                    spans.append((start, _common_prefix(render(convo[: i + 1]), text)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    # A token is trained when it ends inside a span: a token that straddles a span's start carries
    # its first characters; one that straddles its end belongs to the next turn.
    labels = [t if any(s < end <= e for s, e in spans) else -100 for t, (_, end) in zip(ids, offsets)]
    return {"text": text, "input_ids": ids, "labels": labels, "offsets": offsets}


def _text_messages(messages: list[dict]) -> list[dict]:
    """Templates of text models need string contents: a multimodal message keeps its text parts here."""
    return [
        m if isinstance(m["content"], str) else {"role": m["role"], "content": _text_of(m["content"])}
        for m in messages
    ]


def _common_prefix(a: str, b: str) -> int:
    """Length of the common prefix of two strings (binary search on C-speed slice compares)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


def _encode_row(row: dict, index: int, tokenizer, train_on_prompt: bool, marked: str | None) -> dict:
    try:
        out = encode(row, tokenizer, train_on_prompt, marked)
    except UserError:
        raise
    except Exception as err:  # the template rejected this conversation (raise_exception, missing keys, ...)
        raise _BadRow(
            row.get("origin") or f"example {index + 1}", f"the chat template failed on it: {err}"
        ) from None
    trained = sum(label != -100 for label in out["labels"])
    if trained == 0:
        raise _BadRow(
            row.get("origin") or f"example {index + 1}",
            "the chat template leaves no assistant token to train on (it renders earlier turns differently once "
            "later turns are added, or drops the reply). Use another data.chat_template, or data.train_on_prompt=true.",
        )
    return {
        "input_ids": out["input_ids"],
        "labels": out["labels"],
        "n_tokens": len(out["input_ids"]),
        "n_trained": trained,
    }


def _processes(rows: int) -> int | None:
    return min(os.cpu_count() or 1, 8) if rows >= PARALLEL_ROWS and (os.cpu_count() or 1) > 1 else None


def tokenize(dataset, tokenizer, data_cfg: Any):
    """input_ids and labels (full length, untruncated) plus n_tokens and n_trained for every example."""
    marked = (
        None if data_cfg.train_on_prompt or "text" in dataset.column_names else _marked_template(tokenizer)
    )
    try:
        return dataset.map(
            _encode_row,
            with_indices=True,
            fn_kwargs={"tokenizer": tokenizer, "train_on_prompt": data_cfg.train_on_prompt, "marked": marked},
            remove_columns=dataset.column_names,
            num_proc=_processes(len(dataset)),
            desc="Tokenizing",
        )
    except _BadRow as bad:
        raise UserError(f"{bad.origin}: {bad.problem}") from None


# ---------------------------------------------------------------------------------------------
# Length: max_length=auto, truncation, the report


@dataclass
class Report:
    """What `prepare` did, for the run log and `python -m finetune.data`."""

    examples: int  # before dropping
    kept: int
    max_length: int
    truncated: int  # longer than max_length, cut to it (data.overlong=truncate)
    dropped_long: int  # longer than max_length, removed (data.overlong=drop)
    dropped_empty: int  # truncation left nothing to train on: removed
    over_max_length: int
    percentiles: dict[str, int]  # token lengths before truncation: p50, p90, p95, p99, max
    tokens: int  # after truncation
    trained_tokens: int
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        dropped = self.dropped_long + self.dropped_empty
        share = self.trained_tokens / self.tokens if self.tokens else 0
        return (
            f"data: {self.kept} examples to train on, {self.tokens:,} tokens ({share:.0%} trained); "
            f"max_length {self.max_length}: {self.over_max_length} longer, {self.truncated} truncated, "
            f"{dropped} dropped. Lengths p50 {self.percentiles['p50']}, p99 {self.percentiles['p99']}, "
            f"max {self.percentiles['max']}."
        )


def prepare(dataset, tokenizer, data_cfg: Any):
    """(tokenized train set for SFTTrainer, Report): every example tokenized with its labels, cut or
    dropped at data.max_length, and checked to keep at least one trained token."""
    import numpy as np

    max_length = data_cfg.max_length
    assert isinstance(max_length, int), "resolve_max_length(cfg) must run before prepare()"
    vision = _multimodal(dataset)
    tokens = tokenize(dataset, tokenizer, data_cfg)
    lengths = np.asarray(tokens.with_format("numpy")["n_tokens"])
    status = tokens.map(
        _fit,
        fn_kwargs={"max_length": max_length, "drop": data_cfg.overlong == "drop"},
        desc="Fitting max_length",
    )
    codes = np.asarray(status.with_format("numpy")["status"])
    kept = status.filter(lambda s: s["status"] < 2, desc="Dropping")
    trained = int(np.asarray(kept.with_format("numpy")["n_trained"]).sum()) if len(kept) else 0
    report = Report(
        examples=len(tokens),
        kept=len(kept),
        max_length=max_length,
        truncated=int((codes == 1).sum()),
        dropped_long=int((codes == 2).sum()),
        dropped_empty=int((codes == 3).sum()),
        over_max_length=int((lengths > max_length).sum()),
        percentiles=_percentiles(lengths),
        tokens=int(np.minimum(lengths, max_length)[codes < 2].sum()),
        trained_tokens=trained,
    )
    if len(kept) == 0:
        raise UserError(
            f"no example keeps a trained token within data.max_length={max_length}: {report.dropped_long} are longer "
            f"(data.overlong=drop) and {report.dropped_empty} lose every trained token when truncated. "
            f"Raise data.max_length (p99 of the lengths is {report.percentiles['p99']}), or data.max_length=auto."
        )
    # TRL's vision collator adds the image tokens on the fly with the processor: it gets the conversations.
    if vision:
        report.notes.append(
            "image examples: lengths count text tokens only; TRL's vision collator tokenizes them"
        )
        return dataset, report
    return kept.select_columns(["input_ids", "labels"]), report


def _multimodal(dataset) -> bool:
    """Image examples: an images column, or message contents kept as text/image part lists (Json)."""
    from datasets import Json

    contents = [_content_feature(dataset.features.get(c)) for c in ("messages", "prompt", "completion")]
    return "images" in dataset.column_names or any(isinstance(c, Json) for c in contents)


def _fit(row: dict, max_length: int, drop: bool) -> dict:
    """status 0: fits; 1: truncated; 2: too long, dropped; 3: truncation leaves nothing trained, dropped."""
    if row["n_tokens"] <= max_length:
        return {"status": 0}
    if drop:
        return {"status": 2}
    labels = row["labels"][:max_length]
    trained = sum(label != -100 for label in labels)
    return {
        "status": 1 if trained else 3,
        "input_ids": row["input_ids"][:max_length],
        "labels": labels,
        "n_trained": trained,
    }


def _percentiles(lengths) -> dict[str, int]:
    import numpy as np

    if len(lengths) == 0:
        return {"p50": 0, "p90": 0, "p95": 0, "p99": 0, "max": 0}
    q = np.percentile(lengths, [50, 90, 95, 99], method="inverted_cdf")
    return {
        "p50": int(q[0]),
        "p90": int(q[1]),
        "p95": int(q[2]),
        "p99": int(q[3]),
        "max": int(np.max(lengths)),
    }


def choose_max_length(lengths, limit: int | None) -> tuple[int, str]:
    """data.max_length=auto: the p99 token length rounded up to a multiple of 64 (at least 64), capped
    at what the model supports. One long outlier does not set the memory plan; the few longer
    examples are truncated (or dropped, data.overlong=drop) and counted."""
    import numpy as np

    p = int(np.percentile(lengths, AUTO_MAX_LENGTH_QUANTILE * 100, method="inverted_cdf"))
    value = max(64, -(-p // 64) * 64)
    why = f"auto: p{AUTO_MAX_LENGTH_QUANTILE * 100:g} of {len(lengths)} examples is {p} tokens, rounded up to a multiple of 64"
    if limit and value > limit:
        value, why = limit, f"{why}, capped at the model's {limit} positions"
    longer = int((np.asarray(lengths) > value).sum())
    return value, f"{why}; {longer} of them longer"


def resolve_max_length(cfg: Any, tokenizer=None, train=None, planning: bool | None = None) -> tuple[int, str]:
    """Fill data.max_length when it is `auto` (in place) and say why; a fixed value passes through.

    Measures the training data with the model's tokenizer (no weights; a sample of at most
    AUTO_MAX_LENGTH_SAMPLE examples). When only planning (`planning`, default: cfg.dry_run), a
    tokenizer or data file that is not on this machine gives PLANNING_MAX_LENGTH instead, with the
    reason; a real run raises. `tokenizer` and `train` (the normal-form training set) save loading
    them again.
    """
    from finetune.schema import AUTO

    d = cfg.data
    if d.max_length != AUTO:
        return d.max_length, "set by you or a config file"
    planning = bool(cfg.get("dry_run", False)) if planning is None else planning

    def fallback(reason: str) -> tuple[int, str]:
        d.max_length = PLANNING_MAX_LENGTH
        return (
            PLANNING_MAX_LENGTH,
            f"auto: {reason}; planning with {PLANNING_MAX_LENGTH} (a real run measures the data)",
        )

    try:
        tokenizer = tokenizer or tokenizer_only(cfg, local_only=planning)
    except UserError:
        if not planning:
            raise
        return fallback(f"the tokenizer of {cfg.model.name_or_path} is not on this machine")
    if planning and d.name == "file" and d.path and not Path(d.path).expanduser().exists():
        return fallback(f"data.path={d.path} is not on this machine")
    if train is None:
        train, _ = load(d, 0, cfg.seed)
    sample = (
        train
        if len(train) <= AUTO_MAX_LENGTH_SAMPLE
        else train.shuffle(seed=cfg.seed).select(range(AUTO_MAX_LENGTH_SAMPLE))
    )
    lengths = tokenize(sample, tokenizer, d).with_format("numpy")["n_tokens"]
    value, why = choose_max_length(lengths, _model_limit(cfg, tokenizer))
    d.max_length = value
    return value, why


def _model_limit(cfg: Any, tokenizer) -> int | None:
    """The longest sequence the model takes: its config's max_position_embeddings, else the tokenizer's."""
    from finetune import source

    arch = source.architecture(cfg.model) or {}
    limit = (arch.get("text_config") or arch).get("max_position_embeddings")
    if not limit and tokenizer.model_max_length and tokenizer.model_max_length < 1_000_000:
        limit = tokenizer.model_max_length
    return int(limit) if limit else None


# ---------------------------------------------------------------------------------------------
# Batching


def sft_kwargs(cfg: Any) -> dict:
    """The SFTConfig keys the data decides: sequence length, packing, padding-free batching.

    The dataset arrives tokenized, labelled and truncated, so TRL only batches it. Padding-free
    batching (a micro-batch flattened into one row, no pad tokens) is exact when the attention
    kernel honours the sequence boundaries: FlashAttention-2's variable-length kernels do, so
    `auto` turns it on there (with a micro-batch above 1); sdpa/eager would need a dense
    block-diagonal mask per micro-batch, so `auto` keeps padded batches for them.
    `data.packing=true` also packs several examples into each max_length row (TRL's best-fit
    decreasing; padding-free inside), which changes how many examples make one step.
    """
    d = cfg.data
    padding_free = d.padding_free
    if padding_free == "auto":
        padding_free = cfg.model.attn_implementation == "flash_attention_2" and cfg.batch.size != 1
    padding_free = bool(padding_free or d.packing)
    return {
        # TRL refuses a max_length with padding-free unpacked batches; our rows are already cut to it.
        "max_length": None if padding_free and not d.packing else d.max_length,
        "packing": bool(d.packing),
        "padding_free": padding_free,
    }


# ---------------------------------------------------------------------------------------------
# Scoring pairs for the before/after exact-match check


def scoring_pairs(dataset, limit: int) -> list[tuple[list[dict], str]]:
    """(chat prompt, reference answer) pairs for exact-match scoring; empty for plain-text data."""
    if dataset is None or limit <= 0:
        return []
    pairs = []
    for row in dataset.select(range(min(limit, len(dataset)))):
        if row.get("prompt") is not None and row.get("completion") is not None:
            prompt, completion = row["prompt"], row["completion"]
            if isinstance(prompt, str):
                prompt, completion = (
                    [{"role": "user", "content": prompt}],
                    [{"role": "assistant", "content": completion}],
                )
            pairs.append((prompt, completion[-1]["content"]))
        elif row.get("messages") and row["messages"][-1]["role"] == "assistant":
            pairs.append((row["messages"][:-1], row["messages"][-1]["content"]))
    return [
        (p, ref) for p, ref in pairs if isinstance(ref, str) and all(isinstance(m["content"], str) for m in p)
    ]


# ---------------------------------------------------------------------------------------------
# python -m finetune.data


def render_segments(text: str, offsets: list, labels: list) -> list[tuple[str, bool]]:
    """The rendered text cut into (piece, trained) runs, at token boundaries."""
    segments: list[tuple[str, bool]] = []
    cursor = 0
    for (_, end), label in zip(offsets, labels):
        if end <= cursor:
            continue
        trained = label != -100
        piece = text[cursor:end]
        if segments and segments[-1][1] == trained:
            segments[-1] = (segments[-1][0] + piece, trained)
        else:
            segments.append((piece, trained))
        cursor = end
    if cursor < len(text):
        segments.append((text[cursor:], False))
    return segments


def _inspect(cfg: Any, output: str, example: int) -> None:
    from finetune import schema

    schema.validate(cfg)
    train, held_out = load(cfg.data, cfg.train.eval_samples, cfg.seed)  # bad data fails before the tokenizer
    tokenizer = tokenizer_only(cfg)
    length, why = resolve_max_length(cfg, tokenizer, train)
    prepared, report = prepare(train, tokenizer, cfg.data)
    if not 0 <= example < len(train):
        raise UserError(
            f"example={example}: the training set has {len(train)} examples (0 to {len(train) - 1})."
        )
    row = train[example]
    marked = None if cfg.data.train_on_prompt or "text" in train.column_names else _marked_template(tokenizer)
    shown = encode(row, tokenizer, cfg.data.train_on_prompt, marked)
    origin = row.get("origin") or f"{cfg.data.name} example {example}"
    fmt = next(f for f in ("messages", "prompt", "text") if f in train.column_names)
    template = cfg.data.chat_template or ("tokenizer's own" if tokenizer.chat_template else "none")
    loss = (
        "every token"
        if cfg.data.train_on_prompt or fmt == "text"
        else ("completion" if fmt == "prompt" else "assistant turns")
    )
    info = {
        "source": cfg.data.path or cfg.data.name,
        "form": {"messages": "messages", "prompt": "prompt_completion", "text": "text"}[fmt],
        "train_examples": len(train),
        "eval_examples": len(held_out) if held_out is not None else 0,
        "chat_template": template if fmt != "text" else None,
        "loss_on": loss,
        "max_length": length,
        "max_length_why": why,
        "report": asdict(report),
        "batching": sft_kwargs(cfg),
        "example": {
            "index": example,
            "origin": origin,
            "tokens": len(shown["input_ids"]),
            "trained_tokens": sum(label != -100 for label in shown["labels"]),
            "segments": [
                {"text": t, "trained": k}
                for t, k in render_segments(shown["text"], shown["offsets"], shown["labels"])
            ],
        },
    }
    if output == "json":
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return
    _print(info, report)


def _print(info: dict, report: Report) -> None:
    from rich.console import Console
    from rich.text import Text

    console = Console(highlight=False, soft_wrap=True)
    colour = console.is_terminal and not os.environ.get("NO_COLOR")
    p = report.percentiles
    print(
        f"source: {info['source']} ({info['form']}): {info['train_examples']} train, {info['eval_examples']} held out"
    )
    if info["chat_template"]:
        print(f"chat template: {info['chat_template']}; loss on {info['loss_on']}")
    print(
        f"tokens per example: p50 {p['p50']}, p90 {p['p90']}, p95 {p['p95']}, p99 {p['p99']}, max {p['max']}"
    )
    print(f"max_length: {info['max_length']} ({info['max_length_why']})")
    print(
        f"over max_length: {report.over_max_length} examples; {report.truncated} truncated, "
        f"{report.dropped_long} dropped as too long, {report.dropped_empty} dropped with nothing left to train"
    )
    share = report.trained_tokens / report.tokens if report.tokens else 0
    print(
        f"to train on: {report.kept} examples, {report.tokens:,} tokens, {report.trained_tokens:,} trained ({share:.0%})"
    )
    b = info["batching"]
    print(f"batching: {'packed' if b['packing'] else 'padding-free' if b['padding_free'] else 'padded'}")
    ex = info["example"]
    legend = (
        "trained tokens in green, masked (context) dimmed"
        if colour
        else f"trained tokens between {TRAINED} and {MASKED}"
    )
    print(
        f"\nexample {ex['index']} ({ex['origin']}): {ex['tokens']} tokens, {ex['trained_tokens']} trained; {legend}"
    )
    if colour:
        text = Text()
        for seg in ex["segments"]:
            text.append(seg["text"], style="bold green" if seg["trained"] else "dim")
        console.print(text)
    else:
        print("".join(f"{TRAINED}{s['text']}{MASKED}" if s["trained"] else s["text"] for s in ex["segments"]))


def main() -> None:
    """Hydra composes the config exactly as for training; example= and format= are this command's own."""
    from finetune.errors import own_args, run_cli

    own = own_args({"example": "0", "format": "table"})
    if own["format"] not in ("table", "json") or not own["example"].isdigit():
        hint = (
            f" (the data's format is data.format={own['format']})" if own["format"] in FORMAT_COLUMNS else ""
        )
        print(
            f"finetune: error: format={own['format']} example={own['example']}: format= is this command's output, "
            f"table or json{hint}; example= a row number.",
            file=sys.stderr,
        )
        sys.exit(2)
    run_cli(
        lambda cfg: _inspect(cfg, own["format"], int(own["example"])),
        command="finetune.data",
        summary="Check the data before training: load, check and tokenize it with the model's tokenizer "
        "(no weights), then show counts, lengths and one example with its trained tokens marked.",
        options={
            "example": "N            the example to show (default 0)",
            "format": "table|json   a report (default), or one JSON object on stdout",
        },
        machine_output=own["format"] == "json",
    )


if __name__ == "__main__":
    main()
