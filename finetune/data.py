"""Training data: the built-in demo task (generated, offline) or the user's own file.

Both end up as Hugging Face `datasets` in a format TRL's SFTTrainer understands natively:
conversational prompt/completion (loss on the completion only), `messages`, or plain `text`.
"""

from __future__ import annotations

import calendar
import datetime as dt
import random
from pathlib import Path
from typing import Any

from finetune import UserError

DEMO_INSTRUCTION = "Convert to ISO date: "
_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _date_text(day: dt.date, rng: random.Random) -> str:
    """One of several ways people write a date, so the model must learn the mapping, not one pattern."""
    month, short = calendar.month_name[day.month], calendar.month_abbr[day.month]
    return rng.choice([f"{month} {day.day}, {day.year}", f"{day.day} {month} {day.year}", f"{short} {day.day}, {day.year}"])


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


def load(data_cfg: Any, eval_samples: int, seed: int):
    """(train, eval) datasets; eval may be None when nothing is held out."""
    from datasets import Dataset, load_dataset

    if data_cfg.name == "demo":
        train, held_out = demo_examples(data_cfg.num_train, max(eval_samples, 1), seed)
        return Dataset.from_list(train), Dataset.from_list(held_out)

    path = Path(data_cfg.path).expanduser()
    if not path.is_file():
        raise UserError(f"data.path={data_cfg.path}: no such file. Give a .jsonl/.json/.csv/.parquet file.")
    loader = _LOADERS.get(path.suffix.lower())
    if loader is None:
        raise UserError(f"data.path={data_cfg.path}: unsupported file type '{path.suffix}'. Use {', '.join(_LOADERS)}.")
    try:
        dataset = load_dataset(loader, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps parse errors in several types; all mean a bad file
        raise UserError(f"could not read {path}: {str(err).splitlines()[0]}") from err
    columns = set(dataset.column_names)
    if not ({"messages"} <= columns or {"prompt", "completion"} <= columns or {"text"} <= columns):
        raise UserError(
            f"{path} has columns {sorted(columns)}; expected 'messages', or 'prompt' and 'completion', or 'text'."
        )
    if len(dataset) == 0:
        raise UserError(f"{path} holds no examples.")
    if data_cfg.eval_fraction <= 0 or len(dataset) < 2:
        return dataset, None
    split = dataset.train_test_split(test_size=data_cfg.eval_fraction, seed=seed)
    return split["train"], split["test"]


def scoring_pairs(dataset, limit: int) -> list[tuple[list[dict], str]]:
    """(chat prompt, reference answer) pairs for exact-match scoring; empty for plain-text data."""
    if dataset is None or limit <= 0:
        return []
    pairs = []
    for row in dataset.select(range(min(limit, len(dataset)))):
        if "prompt" in row and "completion" in row:
            prompt, completion = row["prompt"], row["completion"]
            if isinstance(prompt, str):
                prompt, completion = [{"role": "user", "content": prompt}], [{"role": "assistant", "content": completion}]
            pairs.append((prompt, completion[-1]["content"]))
        elif "messages" in row and row["messages"] and row["messages"][-1]["role"] == "assistant":
            pairs.append((row["messages"][:-1], row["messages"][-1]["content"]))
    return pairs
