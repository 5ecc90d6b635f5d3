"""The data pipeline: every format and source, chat templates and response-only masks, lengths, batching,
and one clear message (no traceback) for each kind of bad data. Small files are generated per test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import compose, tiny_overrides

from finetune import UserError, data, schema
from finetune.data import cli as _cli  # noqa: F401 - data.cli, the command tested in-process

MESSAGES = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Convert to ISO date: May {i}, 2001"}, {"role": "assistant", "content": f"2001-05-{i:02d}"}]}
    for i in range(1, 9)
]  # fmt: skip
SHAREGPT = [{"conversations": [{"from": "human", "value": f"Convert to ISO date: June {i}, 1999"}, {"from": "gpt", "value": f"1999-06-{i:02d}"}]} for i in range(1, 7)]  # fmt: skip
ALPACA = [
    {"instruction": "Convert to ISO date", "input": f"July {i}, 1988", "output": f"1988-07-{i:02d}"}
    for i in range(1, 7)
]
PROMPT_COMPLETION = [
    {"prompt": f"Convert to ISO date: March {i}, 2021", "completion": f"2021-03-{i:02d}"} for i in range(1, 9)
]
TEXT = [{"text": f"On March {i}, 2021 the date was written 2021-03-{i:02d}."} for i in range(1, 9)]
FORMATS = {
    "messages": MESSAGES,
    "sharegpt": SHAREGPT,
    "alpaca": ALPACA,
    "prompt_completion": PROMPT_COMPLETION,
    "text": TEXT,
}
NESTED = ("messages", "sharegpt")  # CSV cells hold no lists

LLAMA3_SPECIALS = ["<|pad|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def write(path: Path, rows: list[dict]) -> Path:
    """rows as .jsonl, .json (an array), .csv or .parquet, by the file's suffix."""
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


def build_tokenizer(folder: Path, specials: list[str], template: str | None, bos: str, eos: str):
    """A byte-level BPE tokenizer trained in milliseconds, with the chat template given (or none: a base model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [json.dumps(r) for rows in FORMATS.values() for r in rows] * 5
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="<|pad|>"
    )
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture(scope="module")
def chatml(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    template = data.templates.named_template("llama-3")
    return build_tokenizer(
        tmp_path_factory.mktemp("llama3"), LLAMA3_SPECIALS, template, "<|begin_of_text|>", "<|eot_id|>"
    )


def data_cfg(*overrides: str):
    return compose(["data=file", "data.path=unused", *overrides]).data


def trained_pieces(tokenizer, row: dict, train_on_prompt: bool = False) -> list[str]:
    out = data.encode(row, tokenizer, train_on_prompt)
    return [
        text for text, trained in data.render_segments(out["text"], out["offsets"], out["labels"]) if trained
    ]


# ---------------------------------------------------------------------------------------------
# Formats and sources


@pytest.fixture(autouse=True, scope="module")
def datasets_cache(tmp_path_factory):
    """Arrow caches of the generated files go to a temporary folder, not the user's HF cache."""
    import datasets

    folder = tmp_path_factory.mktemp("hf-datasets")
    patch = pytest.MonkeyPatch()
    patch.setattr(datasets.config, "HF_DATASETS_CACHE", folder)
    patch.setenv("HF_DATASETS_CACHE", str(folder))  # for the `python -m finetune.data` subprocesses
    yield folder
    patch.undo()


@pytest.mark.parametrize(
    "fmt,suffix",
    [
        (f, s)
        for f in FORMATS
        for s in (".jsonl", ".json", ".parquet", ".csv")
        if not (s == ".csv" and f in NESTED)
    ],
)
def test_every_format_and_file_type_checks_shows_and_trains(tmp_path, tiny_model, capsys, fmt, suffix):
    path = write(tmp_path / f"train{suffix}", FORMATS[fmt])
    train, held_out = data.load(data_cfg(f"data.path={path}", "data.eval_fraction=0"), 0, seed=0)
    assert held_out is None and len(train) == len(FORMATS[fmt])
    form = {
        "messages": "messages",
        "sharegpt": "messages",
        "alpaca": "messages",
        "prompt_completion": "prompt",
        "text": "text",
    }[fmt]
    assert form in train.column_names and "origin" in train.column_names
    where = f"{path}:1" if suffix == ".jsonl" else f"{path}, {'record' if suffix == '.json' else 'row'} 1"
    assert train[0]["origin"] == where
    if form == "messages":
        assert [m["role"] for m in train[0]["messages"]][-2:] == ["user", "assistant"]

    # What `python -m finetune.data` runs (in-process here; the CLI tests below run the command itself).
    model = [f"model.name_or_path={tiny_model}", "model.gguf_file=null"]
    data.cli._inspect(
        compose([*model, "data=file", f"data.path={path}", "data.eval_fraction=0", "data.max_length=auto"]),
        "json",
        0,
    )
    info = json.loads(capsys.readouterr().out)
    assert (
        info["train_examples"] == info["report"]["kept"] == len(FORMATS[fmt])
        and info["example"]["origin"] == where
    )
    assert 0 < info["report"]["trained_tokens"] <= info["report"]["tokens"]
    trained = "".join(s["text"] for s in info["example"]["segments"] if s["trained"])
    answer = {
        "messages": "2001-05-01",
        "sharegpt": "1999-06-01",
        "alpaca": "1988-07-01",
        "prompt_completion": "2021-03-01",
    }
    assert trained.startswith(answer.get(fmt, "On March 1, 2021")), "dates stay text, exactly as written"

    _train(tiny_model, tmp_path / "runs", "data=file", f"data.path={path}", "data.max_length=64")


def test_format_forced_and_columns_mapped(tmp_path):
    path = write(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4", "sys": "Math."}] * 3)
    cfg = data_cfg(f"data.path={path}", "data.eval_fraction=0", "data.columns.instruction=question", "data.columns.output=answer", "data.columns.system=sys")  # fmt: skip
    train, _ = data.load(cfg, 0, seed=0)
    assert train[0]["messages"] == [
        {"role": "system", "content": "Math."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
    ]  # fmt: skip
    with pytest.raises(
        UserError, match=r"data.columns.output=reply: .* has no column 'reply'. Its columns: \['question'"
    ):
        data.load(data_cfg(f"data.path={path}", "data.columns.output=reply"), 0, seed=0)
    with pytest.raises(UserError, match="data.format=text needs the column"):
        data.load(data_cfg(f"data.path={path}", "data.format=text"), 0, seed=0)


def test_folder_saved_dataset_hub_id_and_eval_splits(tmp_path):
    from datasets import Dataset

    folder = tmp_path / "mixed"
    write(folder / "a.jsonl", MESSAGES)
    write(folder / "b.json", SHAREGPT)
    write(folder / "c.csv", ALPACA)
    write(folder / "nested" / "d.parquet", MESSAGES)
    train, _ = data.load(data_cfg(f"data.path={folder}", "data.eval_fraction=0"), 0, seed=0)
    assert len(train) == 8 + 6 + 6 + 8
    assert {o.split(":")[0].split(",")[0] for o in train["origin"]} == {str(p) for p in folder.rglob("*.*")}

    split = data.load(data_cfg(f"data.path={folder}", "data.eval_fraction=0.25"), 0, seed=0)
    assert [len(s) for s in split] == [21, 7]
    by_file = data.load(
        data_cfg(f"data.path={folder / 'a.jsonl'}", f"data.eval_path={folder / 'b.json'}"), 0, seed=0
    )
    assert [len(s) for s in by_file] == [8, 6]

    Dataset.from_list(PROMPT_COMPLETION).save_to_disk(str(tmp_path / "saved"))
    saved, _ = data.load(data_cfg(f"data.path={tmp_path / 'saved'}", "data.eval_fraction=0"), 0, seed=0)
    assert len(saved) == 8 and "prompt" in saved.column_names

    # A hub id goes through datasets.load_dataset, which reads a local dataset folder the same way.
    write(tmp_path / "hub" / "train.jsonl", TEXT)
    write(tmp_path / "hub" / "test.jsonl", TEXT[:3])
    cfg = compose(["data=hub", f"data.path={tmp_path / 'hub'}", "data.eval_split=test"]).data
    hub_train, hub_test = data.load(cfg, 0, seed=0)
    assert (len(hub_train), len(hub_test)) == (8, 3) and hub_train[0][
        "origin"
    ] == f"{tmp_path / 'hub'} [train], row 1"


def test_json_files_point_to_the_line_and_accept_json_lines(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"text": "a"},\n  {"text": "b"\n]\n')
    with pytest.raises(
        UserError, match=r"broken.json:4: not valid JSON \(Expecting ',' delimiter at column 1\)"
    ):
        data.load(data_cfg(f"data.path={broken}"), 0, seed=0)
    lines = write(tmp_path / "lines.jsonl", TEXT).rename(tmp_path / "lines.json")  # JSON Lines named .json
    train, _ = data.load(data_cfg(f"data.path={lines}", "data.eval_fraction=0"), 0, seed=0)
    assert len(train) == len(TEXT) and train[2]["origin"] == f"{lines}:3"


def test_files_as_users_have_them_bom_compressed_and_strict_utf8(tmp_path):
    import bz2
    import gzip
    import lzma

    import zstandard

    bom = b"\xef\xbb\xbf"
    for name, rows in (("excel.csv", ALPACA), ("bom.jsonl", MESSAGES), ("bom.json", SHAREGPT)):
        plain = write(tmp_path / "plain" / name, rows)
        (tmp_path / name).write_bytes(bom + plain.read_bytes())  # what Excel and Notepad save
        train, _ = data.load(data_cfg(f"data.path={tmp_path / name}", "data.eval_fraction=0"), 0, seed=0)
        assert len(train) == len(rows) and train[0]["messages"][-1]["role"] == "assistant", name
    raw = write(tmp_path / "plain" / "chats.jsonl", MESSAGES).read_bytes()
    csv = write(tmp_path / "plain" / "rows.csv", ALPACA).read_bytes()
    for name, packed in (
        ("chats.jsonl.gz", gzip.compress(raw)), ("chats.jsonl.zst", zstandard.ZstdCompressor().compress(raw)),
        ("chats.jsonl.bz2", bz2.compress(raw)), ("chats.jsonl.xz", lzma.compress(raw)), ("rows.csv.gz", gzip.compress(csv)),
    ):  # fmt: skip
        (tmp_path / "packed" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "packed" / name).write_bytes(packed)
        train, _ = data.load(
            data_cfg(f"data.path={tmp_path / 'packed' / name}", "data.eval_fraction=0"), 0, seed=0
        )
        assert len(train) == (len(ALPACA) if "csv" in name else len(MESSAGES)), name
        assert "csv" in name or train[1]["origin"] == f"{tmp_path / 'packed' / name}:2"
    latin = raw.split(b"\n")
    latin[2] = latin[2].replace(b"Be brief.", "Sois bref, très.".encode("latin-1"))
    for name in ("latin.jsonl", "latin.csv"):
        body = (
            b"\n".join(latin)
            if name.endswith("jsonl")
            else csv.replace(b"July 3", "Juillet 3 é".encode("latin-1"))
        )
        (tmp_path / name).write_bytes(body)
        line = 3 if name.endswith("jsonl") else 4
        with pytest.raises(UserError, match=rf"{name}:{line}: not valid UTF-8 \(byte 0xe8|0xe9\)"):
            data.load(data_cfg(f"data.path={tmp_path / name}"), 0, seed=0)


def test_rows_with_nothing_to_train_on_are_dropped_and_counted(tmp_path, capsys):
    empty = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
    ]
    path = write(tmp_path / "some.jsonl", [*MESSAGES[:3], *empty, MESSAGES[3]])
    train, _ = data.load(data_cfg(f"data.path={path}", "data.eval_fraction=0"), 0, seed=0)
    assert len(train) == 4 and [o.rsplit(":", 1)[1] for o in train["origin"]] == ["1", "2", "3", "6"]
    assert (
        f"2 examples with nothing to train on dropped (first: {path}:4: no assistant message"
        in capsys.readouterr().err
    )
    cfg = data_cfg(f"data.path={path}")
    cfg.empty_rows = "error"
    with pytest.raises(UserError, match=f"{path}:4: no assistant message with content: nothing to train on"):
        data.load(cfg, 0, seed=0)
    texts = write(tmp_path / "texts.csv", [*TEXT[:2], {"text": ""}])
    assert len(data.load(data_cfg(f"data.path={texts}", "data.eval_fraction=0"), 0, seed=0)[0]) == 2


def test_tool_calling_files_openai_and_sharegpt(tmp_path, tiny_model):
    from conftest import tokenizer_for

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
    openai = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 degrees"},
            {"role": "assistant", "content": "It is sunny."},
        ],
        "tools": tools,
    }  # fmt: skip
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "Weather in Rome?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Rome"}}'},
            {"from": "observation", "value": "Rainy, 12 degrees"},
            {"from": "gpt", "value": "It rains in Rome."},
        ],
        "tools": json.dumps(tools),
    }  # fmt: skip
    for name, row in (("openai.jsonl", openai), ("sharegpt.jsonl", sharegpt)):
        train, _ = data.load(
            data_cfg(f"data.path={write(tmp_path / name, [row] * 3)}", "data.eval_fraction=0"), 0, 0
        )
        call = train[0]["messages"][1]
        assert call["role"] == "assistant" and call["tool_calls"][0]["function"]["arguments"]["city"] in (
            "Paris",
            "Rome",
        )
        assert (
            train[0]["tools"][0]["function"]["name"] == "get_weather"
            and train[0]["messages"][2]["role"] == "tool"
        )
        tokens, report = data.prepare(train, tokenizer_for("qwen2.5"), data_cfg("data.max_length=4096"))
        assert report.kept == 3 and report.dropped_mask == 0
        labels, ids = tokens[0]["labels"], tokens[0]["input_ids"]
        text = tokenizer_for("qwen2.5").decode([t for t, label in zip(ids, labels) if label != -100])
        assert '"get_weather"' in text and "degrees" not in text and "?" not in text
    # The tiny model's plain ChatML has no tool support: one clear line, never a silent drop.
    tiny = data.load_tokenizer(
        str(tiny_model), compose([f"model.name_or_path={tiny_model}", "model.gguf_file=null"])
    )
    with pytest.raises(
        UserError, match="this data has tool calls, but the chat template of .* does not render them"
    ):
        data.prepare(train, tiny, data_cfg("data.max_length=4096"))


def test_image_examples_are_checked_and_kept_for_the_vision_path(tmp_path, chatml):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"not really a png")
    parts = [{"type": "image", "image": "photos/cat.png"}, {"type": "text", "text": "What is this?"}]
    rows = [
        {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "A cat."}]}
    ] * 2
    rows += [{"messages": MESSAGES[0]["messages"], "images": ["photos/cat.png"]}]
    train, _ = data.load(
        data_cfg(f"data.path={write(tmp_path / 'vlm.jsonl', rows)}", "data.eval_fraction=0"), 0, 0
    )
    cat = str((tmp_path / "photos" / "cat.png").resolve())  # relative to the data file, made absolute
    assert train[0]["messages"][0]["content"] == [
        {"type": "image", "image": cat},
        {"type": "text", "text": "What is this?"},
    ]
    assert train[2]["images"] == [cat] and train[0]["images"] == []
    kept, report = data.prepare(train, chatml, data_cfg("data.max_length=64"))
    assert kept is train and report.notes and report.kept == 3  # conversations go on to TRL's vision collator


# ---------------------------------------------------------------------------------------------
# Chat templates and response-only loss


CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Answer with a date."},
        {"role": "user", "content": "Convert to ISO date: May 1, 2001"},
        {"role": "assistant", "content": "2001-05-01"},
        {"role": "user", "content": "And July 4, 1988?"},
        {"role": "assistant", "content": "1988-07-04"},
    ]
}


def test_assistant_only_loss_trains_exactly_the_assistant_spans_chatml(chatml):
    # Real templates of released models: tests/test_data_templates.py.
    assert trained_pieces(chatml, CONVERSATION) == ["2001-05-01<|im_end|>", "1988-07-04<|im_end|>"]
    out = data.encode(CONVERSATION, chatml)
    trained_ids = [t for t, label in zip(out["input_ids"], out["labels"]) if label != -100]
    expected = chatml("2001-05-01<|im_end|>1988-07-04<|im_end|>", add_special_tokens=False)["input_ids"]
    assert trained_ids == expected, "exactly the reply tokens and their end-of-turn, nothing of the prompt"


def test_assistant_only_loss_trains_exactly_the_assistant_spans_llama3(llama3):
    # data.chat_template=llama-3 is TRL's copy of Meta's template, imported from TRL.
    from trl.chat_template_utils import llama3_chat_template

    assert llama3.chat_template == llama3_chat_template
    assert trained_pieces(llama3, CONVERSATION) == ["2001-05-01<|eot_id|>", "1988-07-04<|eot_id|>"]
    out = data.encode(CONVERSATION, llama3)
    assert (
        out["input_ids"][0] == llama3.convert_tokens_to_ids("<|begin_of_text|>") and out["labels"][0] == -100
    )


def test_completion_only_prompt_training_and_plain_text(chatml, llama3):
    row = {"prompt": CONVERSATION["messages"][:2], "completion": CONVERSATION["messages"][2:3]}
    assert trained_pieces(chatml, row) == ["2001-05-01<|im_end|>"]
    assert trained_pieces(llama3, row) == ["2001-05-01<|eot_id|>"]
    everything = data.encode(CONVERSATION, chatml, True)
    assert all(label != -100 for label in everything["labels"])
    text = data.encode({"text": "plain words"}, chatml)
    assert text["text"] == "plain words<|im_end|>" and text["labels"] == text["input_ids"]


def test_base_model_gets_a_named_template(tmp_path):
    folder = tmp_path / "base"
    build_tokenizer(folder, LLAMA3_SPECIALS, None, "<|begin_of_text|>", "<|eot_id|>")
    cfg = compose([f"model.name_or_path={folder}", "model.gguf_file=null"])
    with pytest.raises(UserError, match="no chat template.*data.chat_template=<chatml|llama-3"):
        data.encode(CONVERSATION, data.tokenizer_only(cfg))
    tokenizer = data.tokenizer_only(
        compose([f"model.name_or_path={folder}", "model.gguf_file=null", "data.chat_template=llama-3"])
    )
    assert trained_pieces(tokenizer, CONVERSATION) == ["2001-05-01<|eot_id|>", "1988-07-04<|eot_id|>"]
    with pytest.warns(UserWarning, match=r"<\|im_end\|>, <\|im_start\|> are not tokens of this tokenizer"):
        data.use_chat_template(tokenizer, compose(["data.chat_template=chatml"]).data)
    with pytest.raises(
        UserError, match="data.chat_template=lama-3 is not a known template. Did you mean 'llama-3'"
    ):
        data.use_chat_template(tokenizer, compose(["data.chat_template=lama-3"]).data)


# ---------------------------------------------------------------------------------------------
# Lengths: truncation, dropping, max_length=auto


def test_overlong_examples_are_truncated_or_dropped_with_counts(tmp_path, chatml):
    long_answer = " ".join(["2001-05-01"] * 40)
    rows = MESSAGES[:4] + [
        {"messages": [{"role": "user", "content": "short"}, {"role": "assistant", "content": long_answer}]},
        {
            "messages": [
                {"role": "user", "content": "Convert " * 80},
                {"role": "assistant", "content": "late"},
            ]
        },
    ]
    train, _ = data.load(
        data_cfg(f"data.path={write(tmp_path / 'long.jsonl', rows)}", "data.eval_fraction=0"), 0, seed=0
    )
    tokens, report = data.prepare(train, chatml, data_cfg("data.max_length=64"))
    assert (report.over_max_length, report.truncated, report.dropped_empty, report.kept) == (2, 1, 1, 5)
    assert max(len(ids) for ids in tokens["input_ids"]) == 64
    assert all(any(label != -100 for label in labels) for labels in tokens["labels"])
    _, dropped = data.prepare(train, chatml, data_cfg("data.max_length=64", "data.overlong=drop"))
    assert (dropped.dropped_long, dropped.kept) == (2, 4)
    with pytest.raises(UserError, match="no example keeps a trained token within data.max_length=8"):
        data.prepare(train, chatml, data_cfg("data.max_length=8"))


def test_max_length_auto_measures_the_data_and_plans_without_it(tmp_path, tiny_model):
    value, why = data.choose_max_length([30] * 98 + [500, 900], limit=None)
    assert value == 512 and "p99 of 100 examples is 500 tokens" in why and "1 of them longer" in why
    assert data.choose_max_length([3000] * 10, limit=2048)[0] == 2048

    path = write(tmp_path / "chat.jsonl", MESSAGES)
    cfg = compose(
        [
            f"model.name_or_path={tiny_model}",
            "model.gguf_file=null",
            "data=file",
            f"data.path={path}",
            "data.max_length=auto",
        ]
    )
    schema.validate(cfg)
    value, why = data.resolve_max_length(cfg)
    assert value == 64 and cfg.data.max_length == 64 and "auto: p99" in why

    cfg = compose(
        ["model=llama-3-8b", "data=file", "data.path=missing.jsonl", "data.max_length=auto", "dry_run=true"]
    )
    value, why = data.resolve_max_length(cfg)
    assert value == data.PLANNING_MAX_LENGTH and "not on this machine" in why
    cfg.dry_run, cfg.data.max_length = False, "auto"  # a real run needs the tokenizer
    with pytest.raises(UserError, match="could not load 'meta-llama/Meta-Llama-3-8B-Instruct'"):
        data.resolve_max_length(cfg)


# ---------------------------------------------------------------------------------------------
# Batching


def test_padding_free_where_safe_and_packing_on_request():
    def kwargs(*overrides, hw="cpu"):
        cfg = compose([f"hw={hw}", "batch.size=4", "batch.grad_accum=2", *overrides])
        schema.validate(cfg)
        return data.sft_kwargs(cfg)

    assert kwargs() == {"max_length": 64, "packing": False, "padding_free": False}
    assert kwargs("model.attn_implementation=flash_attention_2", hw="a100-80gb") == {
        "max_length": None,
        "packing": False,
        "padding_free": True,
    }
    assert kwargs("data.packing=true") == {"max_length": 64, "packing": True, "padding_free": True}
    assert kwargs("data.padding_free=true")["padding_free"] is True
    with pytest.raises(UserError, match="data.packing=true packs examples into padding-free rows"):
        schema.validate(compose(["data.packing=true", "data.padding_free=false"]))


def test_padding_free_batch_gives_the_padded_loss(tiny_model, chatml, tmp_path):
    """Flattened sequences with restarting position_ids attend only within themselves (sdpa, Qwen2), as
    SFTTrainer runs them: without a KV cache (compute_loss passes use_cache=False), transformers builds
    the block-diagonal mask from the position_ids."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    train, _ = data.load(
        data_cfg(f"data.path={write(tmp_path / 'c.jsonl', MESSAGES)}", "data.eval_fraction=0"), 0, 0
    )
    tokens, _ = data.prepare(train, chatml, data_cfg("data.max_length=64"))
    rows = [tokens[i] for i in range(4)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    losses = []
    for padding_free in (False, True):
        batch = DataCollatorForLanguageModeling(pad_token_id=chatml.pad_token_id, padding_free=padding_free)(
            rows
        )
        with torch.no_grad():
            inputs = {
                k: v
                for k, v in batch.items()
                if k in ("input_ids", "labels", "attention_mask", "position_ids")
            }
            losses.append(model(**inputs, use_cache=False).loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# python -m finetune.data


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "NO_COLOR": "1",
    }
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "finetune.data", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_cli_reports_counts_lengths_and_a_marked_example(tmp_path, tiny_model):
    folder = tmp_path / "chats"
    write(folder / "a.jsonl", MESSAGES)
    write(folder / "b.json", SHAREGPT)
    write(folder / "c.csv", ALPACA)
    model = [f"model.name_or_path={tiny_model}", "model.gguf_file=null"]
    result = cli(
        "data=file", f"data.path={folder}", "data.max_length=64", "data.eval_fraction=0", *model, "example=0"
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "20 train, 0 held out" in out and "loss on assistant turns" in out
    assert "tokens per example: p50" in out and "max_length: 64 (set by you" in out
    assert "over max_length:" in out and "truncated" in out
    assert f"example 0 ({folder / 'a.jsonl'}:1)" in out and "[[2001-05-01<|im_end|>" in out
    shown = out.split("trained tokens between [[ and ]]\n")[1]
    assert shown.startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nConvert to ISO date: May 1, 2001"
    )
    assert "[[" not in shown.split("<|im_start|>assistant")[0], "the prompt is never marked trained"
    long_first = [
        {"messages": [{"role": "user", "content": "Convert " * 40}, {"role": "assistant", "content": "x"}]},
        *MESSAGES,
    ]
    path = write(tmp_path / "long.jsonl", long_first)
    short = cli(
        "data=file", f"data.path={path}", "data.max_length=48", "data.eval_fraction=0", *model, "format=json"
    )
    assert short.returncode == 0, short.stderr
    shown = json.loads(short.stdout)["example"]  # as training sees it: cut at max_length, the reply gone
    assert shown["tokens"] == 48 and shown["fate"] == "dropped: truncation leaves nothing to train on"
    assert not any(s["trained"] for s in shown["segments"]) and "2001-05-01" not in "".join(
        s["text"] for s in shown["segments"]
    )
    for name, fmt in (("a.jsonl", "messages"), ("b.json", "sharegpt"), ("c.csv", "alpaca")):
        assert f"{name}: " in result.stderr and f"{fmt} format" in result.stderr

    hub = tmp_path / "hub"
    write(hub / "train.parquet", PROMPT_COMPLETION)
    result = cli(
        "data=hub", f"data.path={hub}", "data.max_length=auto", "data.eval_fraction=0", *model, "format=json"
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (
        info["form"] == "prompt_completion"
        and info["max_length"] == 64
        and "auto: p99" in info["max_length_why"]
    )
    assert info["report"]["kept"] == info["train_examples"] == 8 and info["example"]["trained_tokens"] > 0
    trained = "".join(s["text"] for s in info["example"]["segments"] if s["trained"])
    assert trained.startswith("2021-03-") and trained.endswith("<|im_end|>")


def _bad_files(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """case -> (arguments, what the message must say), with the files each case needs written under root."""
    good = MESSAGES[0]
    lines = [json.dumps(good)] * 2 + ["", '{"messages": [{"role": "user", "content": "hi"}', json.dumps(good)]
    (root / "malformed.jsonl").write_text("\n".join(lines) + "\n")
    write(root / "columns.jsonl", [{"question": "q", "answer": "a"}])
    (root / "empty.jsonl").write_text("")
    write(
        root / "nonstring.jsonl",
        [good, {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}],
    )
    write(
        root / "role.jsonl",
        [good, good, {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "x"}]}],
    )
    parts = [{"type": "image", "image": "photos/cat.png"}, {"type": "text", "text": "What is this?"}]
    write(root / "image.jsonl", [{"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]}])  # fmt: skip
    write(
        root / "nothing.jsonl",
        [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}],
    )
    f = lambda name: [f"data.path={root / name}"]  # noqa: E731
    return {
        "malformed JSONL line": (f("malformed.jsonl"), [f"{root / 'malformed.jsonl'}:4: not valid JSON", "fix or delete this line"]),
        "missing columns": (f("columns.jsonl"), ["has the columns ['question', 'answer']", "alpaca: instruction + output", "data.columns."]),
        "empty dataset": (f("empty.jsonl"), [f"{root / 'empty.jsonl'} holds no examples"]),
        "non-string message": (f("nonstring.jsonl"), [f"{root / 'nonstring.jsonl'}:2: message 1 (user) has content of type int (5)"]),
        "unknown role": (f("role.jsonl"), [f"{root / 'role.jsonl'}:3: message 2 has the role 'bot'", "Use system, user, assistant or tool"]),
        "missing image": (f("image.jsonl"), [f"{root / 'image.jsonl'}:1: image file 'photos/cat.png' not found", str(root / "photos" / "cat.png")]),
        "nothing to train on": (f("nothing.jsonl"), [f"{root / 'nothing.jsonl'} holds no examples with something to train on"]),
        "hub without network": (["data=hub", "data.path=nobody/no-such-dataset"], ["cannot reach the Hugging Face Hub", "data=file data.path=<folder>"]),
    }  # fmt: skip


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every bad-data case through `python -m finetune.data`, two processes at a time."""
    root = tmp_path_factory.mktemp("bad")
    cases = _bad_files(root)
    assert list(cases) == BAD_CASES
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = dict(zip(cases, pool.map(lambda c: cli("data=file", *cases[c][0]), cases)))
    return cases, runs


BAD_CASES = [
    "malformed JSONL line", "missing columns", "empty dataset", "non-string message", "unknown role",
    "missing image", "nothing to train on", "hub without network",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_data_gets_one_clear_message(bad_runs, case):
    cases, runs = bad_runs
    result = runs[case]
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("finetune: error: ")
    for expected in cases[case][1]:
        assert expected in message, message


def test_validation_of_data_keys():
    for overrides, message in [
        (["data.format=sharegtp"], "Did you mean 'sharegpt'?"),
        (["data.max_length=long"], "data.max_length=long must be a whole number of tokens, or auto"),
        (["data.overlong=cut"], "data.overlong='cut' is not one of truncate, drop"),
        (["data.padding_free=maybe"], "data.padding_free=maybe must be true, false or auto"),
    ]:
        with pytest.raises(UserError) as err:
            schema.validate(compose(overrides))
        assert message in str(err.value)


# ---------------------------------------------------------------------------------------------
# Tiny training runs: formats and sources end to end


def _train(tiny_model, tmp_path, *extra):
    from finetune import pipeline

    cfg = compose(
        tiny_overrides(tiny_model, tmp_path, "batch.grad_accum=1", "data.eval_fraction=0.2", *extra)
    )
    result = pipeline.run(cfg)
    assert result is not None and result.summary["steps"] == 2 and result.summary["final_loss"] is not None
    return result


def test_training_on_a_folder_of_chat_formats(tiny_model, tmp_path, capsys):
    folder = tmp_path / "chats"
    write(folder / "a.jsonl", MESSAGES)
    write(folder / "b.json", SHAREGPT)
    write(folder / "c.csv", ALPACA)
    _train(tiny_model, tmp_path / "runs", "data=file", f"data.path={folder}", "data.max_length=48")
    assert "data: 16 examples to train on" in capsys.readouterr().out


def test_training_on_a_hub_dataset_packed(tiny_model, tmp_path):
    write(tmp_path / "hub" / "train.parquet", PROMPT_COMPLETION * 2)
    _train(
        tiny_model,
        tmp_path / "runs",
        "data=hub",
        f"data.path={tmp_path / 'hub'}",
        "data.packing=true",
        "data.max_length=64",
    )


def test_training_on_a_saved_text_dataset_padding_free(tiny_model, tmp_path):
    from datasets import Dataset

    Dataset.from_list(TEXT).save_to_disk(str(tmp_path / "saved"))
    _train(
        tiny_model,
        tmp_path / "runs",
        "data=file",
        f"data.path={tmp_path / 'saved'}",
        "data.padding_free=true",
    )
