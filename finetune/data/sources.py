"""Where training examples come from: the built-in demo task, files and folders of files (plain or
compressed), folders written by `save_to_disk`, and hub datasets. Every source ends in
`formats.normalise`, so what leaves here is in normal form with each example's origin."""

from __future__ import annotations

import calendar
import datetime as dt
import json
import random
import sys
from pathlib import Path

from finetune import UserError
from finetune.data.formats import normalise
from finetune.schema import DataConfig

DEMO_INSTRUCTION = "Convert to ISO date: "
SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# What the datasets library (through fsspec) decompresses on its own; a file may carry one of them.
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".xz": "xz"}


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
# Reading


def load(data_cfg: DataConfig, eval_samples: int, seed: int):
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


def kind(path: Path) -> tuple[str | None, str | None]:
    """(format suffix, compression) of a file name: x.jsonl -> (.jsonl, None), x.csv.gz -> (.csv, gzip)."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    inner = suffixes[-2] if compression and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    return (inner if inner in SUFFIXES else None), compression


def _files(spec: str, key: str) -> list[Path]:
    path = Path(spec).expanduser()
    kinds = f"{'/'.join(SUFFIXES)} (optionally {'/'.join(COMPRESSIONS)}-compressed)"
    if path.is_file():
        suffix, compression = kind(path)
        if suffix is None:
            raise UserError(
                f"{key}={spec}: unsupported file type '{''.join(path.suffixes[-2:]) or path.name}'. Use {kinds}."
            )
        if suffix == ".parquet" and compression:
            raise UserError(f"{key}={spec}: Parquet files compress inside; give the .parquet file itself.")
        return [path]
    if path.is_dir():
        files = sorted(
            f
            for f in path.rglob("*")
            if f.is_file()
            and kind(f)[0] is not None
            and not any(p.startswith(".") for p in f.relative_to(path).parts)
        )
        if not files:
            seen = sorted(p.name for p in path.iterdir())[:8]
            raise UserError(
                f"{key}={spec}: the folder holds no {kinds} files (found: {', '.join(seen) or 'nothing'})."
            )
        return files
    hint = ""
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        hint = f" To load the hub dataset '{spec}', use data=hub data.path={spec}."
    raise UserError(f"{key}={spec}: no such file or folder. Give a {kinds} file or a folder of them.{hint}")


def _read_files(data_cfg: DataConfig, spec: str, key: str):
    """Every file of `spec` (a file, a folder of files, or a folder written by save_to_disk), normalised."""
    from datasets import concatenate_datasets, load_from_disk

    path = Path(spec).expanduser()
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        saved = load_from_disk(str(path))
        if hasattr(saved, "keys"):  # a DatasetDict: take the training split
            saved = saved[data_cfg.split if data_cfg.split in saved else next(iter(saved))]
        return _non_empty(normalise(saved, data_cfg, str(path), path), spec)
    parts = [normalise(_read_file(file), data_cfg, str(file), file.parent) for file in _files(spec, key)]
    parts = [p for p in parts if len(p)] or parts[:1]  # a file whose every row was dropped as empty
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
        raise UserError(f"{where} holds no examples with something to train on.")
    return dataset


def _open_binary(file: Path):
    """The file's bytes, decompressed the way the datasets library does it (fsspec, by suffix)."""
    import fsspec

    compression = kind(file)[1]
    if compression == "zstd":  # fsspec's zstd reader cannot read by lines: zstandard's own stream, buffered
        try:
            import zstandard
        except ImportError:
            raise UserError(
                f"{file}: reading .zst files needs the zstandard package (pip install zstandard)."
            ) from None
        import io

        return io.BufferedReader(
            zstandard.ZstdDecompressor().stream_reader(
                open(file, "rb"), read_across_frames=True, closefd=True
            )
        )
    return fsspec.open(str(file), "rb", compression=compression).open()


def _decode(raw: bytes, file: Path, line: int) -> str:
    """Strict UTF-8: a wrong byte is reported at its line, not silently replaced."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line += raw[: err.start].count(b"\n")
        raise UserError(
            f"{file}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x}). Save the file as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8), or fix that line."
        ) from None


def text_lines(file: Path):
    """(line number, text) for every line of a text file, decoded strictly, a UTF-8 BOM dropped."""
    with _open_binary(file) as handle:
        for number, raw in enumerate(handle, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # Excel and Notepad write a BOM
                raw = raw[3:]
            yield number, _decode(raw, file, number)


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
    suffix = kind(file)[0]
    raw_json = datasets.Features({"_json": datasets.Value("string"), "origin": datasets.Value("string")})
    try:
        if suffix in (".json", ".jsonl"):
            stat = file.stat()  # size and time in the cache key: a changed file is read again
            stamp = f"{stat.st_size}-{stat.st_mtime_ns}"
            raw = datasets.Dataset.from_generator(
                _json_records, gen_kwargs={"path": str(file), "stamp": stamp}, features=raw_json
            )
        elif suffix == ".csv":
            # One strict pass finds a bad byte by its line before pandas sees the file.
            header = None
            for _, line in text_lines(file):
                header = header if header is not None else next(csv.reader([line]), [])
            strings = datasets.Features({name: datasets.Value("string") for name in header or []})
            raw = datasets.load_dataset(
                "csv",
                data_files=str(file),
                split="train",
                features=strings,
                na_filter=False,
                encoding="utf-8-sig",
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
    if kind(file)[0] == ".json":
        with _open_binary(file) as handle:
            raw = handle.read()
        text = _decode(raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw, file, 1)
        try:
            # A JSON array has no record boundaries to stream by: .jsonl is the format for big data.
            records = json.loads(text)
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
    for number, line in text_lines(file):
        if line.strip():
            yield {"_json": line, "origin": f"{file}:{number}"}


def _read_hub(data_cfg: DataConfig, split: str):
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
