"""What the rows say: detect the format from the columns, check every row, and convert it to the
normal form the rest of the package reads. One function per row handles every format, so every
format gets the same checks and the same messages.

Normal form: `messages` (a conversation), or `prompt` + `completion` (message lists; loss on the
completion), or `text` (loss on everything); plus `origin` (file:line), `images` for VLM data and
`tools` (the function schemas) for tool-calling data. A message is {role, content}; tool-calling
and reasoning data add `tool_calls`, `reasoning`, `name` and `tool_call_id`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from finetune import UserError
from finetune.schema import DataConfig

# The columns each format reads (our names; data.columns.<name>=<yours> maps a different one).
FORMAT_COLUMNS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
# Role names in the wild -> the four roles chat templates know. ShareGPT writes human/gpt, and
# function_call (an assistant's tool call) / observation (the tool's answer).
ROLES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "function_call": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool",
}  # fmt: skip
# Message keys of reasoning models' data, all meaning the same: the reply's thinking.
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
EMPTY_ROWS = ("drop", "error")
PARALLEL_ROWS = 50_000  # from this many examples, checking and tokenizing run in several processes
CHAT_COLUMNS = ("messages", "conversations", "prompt", "completion")
# Any of these in a file: its messages keep tool calls and reasoning (else the plain two-key form).
_RICH = r'"(tool_calls|function_call|observation|reasoning_content|reasoning|thinking|tools)"\s*:?'


def processes(rows: int) -> int | None:
    return min(os.cpu_count() or 1, 8) if rows >= PARALLEL_ROWS and (os.cpu_count() or 1) > 1 else None


def detect_format(columns: list[str], data_cfg: DataConfig, source: str) -> str:
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


def normalise(raw, data_cfg: DataConfig, source: str, base: Path):
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
        rich = pc.any(pc.match_substring_regex(lines, _RICH)).as_py()
    else:
        clashing = [ours for ours in renamed.values() if ours in raw.column_names and ours not in renamed]
        raw = raw.remove_columns(clashing).rename_columns(renamed) if renamed else raw
        renamed, columns = {}, raw.column_names
        contents = [_content_feature(raw.features[c]) for c in CHAT_COLUMNS if c in raw.column_names]
        multimodal = "images" in raw.column_names or any(not _is_text(c) for c in contents)
        rich = "conversations" in columns or any(
            key in str(raw.features) for key in ("tool_calls", "tools", *REASONING_KEYS)
        )
    fmt = detect_format(columns, data_cfg, source)
    print(f"data: {source}: {len(raw)} example{'s' * (len(raw) != 1)}, {fmt} format", file=sys.stderr)
    message = {"role": Value("string"), "content": Json() if multimodal else Value("string")}
    if rich:
        message |= {
            "reasoning": Value("string"),
            "tool_calls": Json(),
            "name": Value("string"),
            "tool_call_id": Value("string"),
        }
    chat = List(message)
    features = {"messages": chat} if fmt in ("messages", "sharegpt", "alpaca") else {}
    if fmt == "prompt_completion":
        features = {"prompt": chat, "completion": chat}
    if fmt == "text":
        features = {"text": Value("string")}
    features["origin"] = Value("string")
    features["_empty"] = Value(
        "string"
    )  # why a row has nothing to train on; such rows are dropped or stop the run
    if rich and fmt != "text":
        features["tools"] = Json()
    # Decoded images (a hub Image column) stay as they are; paths are checked and kept as a list.
    decoded = "images" in raw.column_names and not _is_text(
        getattr(raw.features["images"], "feature", raw.features["images"])
    )
    if decoded:
        features["images"] = raw.features["images"]
    elif "images" in columns:
        features["images"] = List(Value("string"))
    try:
        normal = raw.map(
            _normal_row,
            with_indices=True,
            fn_kwargs={
                "fmt": fmt,
                "source": source,
                "base": str(base),
                "renamed": renamed,
                "image_paths": "images" in columns and not decoded,
                "rich": rich,
            },
            remove_columns=[c for c in raw.column_names if not (decoded and c == "images")],
            features=Features(features),
            num_proc=processes(len(raw)),
            desc=f"Checking {Path(source).name}",
        )
    except _BadRow as bad:
        raise UserError(f"{bad.origin}: {bad.problem}") from None
    return _drop_empty(normal, data_cfg, source)


def _drop_empty(normal, data_cfg: DataConfig, source: str):
    """Rows with nothing to train on (no reply, an empty completion or text) are dropped and counted;
    data.empty_rows=error stops at the first instead."""
    import pyarrow.compute as pc

    reasons = normal.data.column("_empty")
    empty = len(normal) - pc.sum(pc.equal(reasons, "")).as_py() if len(normal) else 0
    if empty:
        first = pc.index(pc.not_equal(reasons, ""), True).as_py()
        where, why = normal[first]["origin"], normal[first]["_empty"]
        if data_cfg.empty_rows == "error":
            raise UserError(
                f"{where}: {why}: nothing to train on. Fix or remove the example, or data.empty_rows=drop to skip such rows."
            )
        print(
            f"data: {source}: {empty} example{'s' * (empty != 1)} with nothing to train on dropped "
            f"(first: {where}: {why}); data.empty_rows=error stops instead",
            file=sys.stderr,
        )
        normal = normal.filter(lambda r: r == "", input_columns="_empty", desc="Dropping empty rows")
    return normal.remove_columns("_empty")


def _columns(data_cfg: DataConfig) -> dict[str, str | None]:
    return dataclasses.asdict(data_cfg.columns)


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
    row: dict, index: int, fmt: str, source: str, base: str, renamed: dict, image_paths: bool, rich: bool
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
    out: dict[str, Any] = {"origin": origin, "_empty": ""}
    if fmt in ("messages", "sharegpt"):
        out["messages"] = _messages(
            row.get("messages" if fmt == "messages" else "conversations"), fmt, bad, rich
        )
        if not any(_has_reply(m) for m in out["messages"]):
            out["_empty"] = "no assistant message with content"
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
        user = "\n\n".join(s for s in (instruction, extra) if s and s.strip())
        if not user:
            bad("'instruction' and 'input' are both empty: there is no prompt to answer.")
        if not (output or "").strip():
            out["_empty"] = "'output' is empty"
        system_turn = [{"role": "system", "content": system}] if system and system.strip() else []
        out["messages"] = [
            *system_turn,
            {"role": "user", "content": user},
            {"role": "assistant", "content": output or ""},
        ]
    elif fmt == "prompt_completion":
        prompt, completion = row.get("prompt") or "", row.get("completion") or ""  # an empty CSV cell: None
        out["prompt"] = (
            [{"role": "user", "content": prompt}]
            if isinstance(prompt, str)
            else _messages(prompt, "prompt", bad, rich)
        )
        out["completion"] = (
            [{"role": "assistant", "content": completion}]
            if isinstance(completion, str)
            else _messages(completion, "completion", bad, rich)
        )
        if not any(_has_reply(m) for m in out["completion"]):
            out["_empty"] = "the completion is empty"
    else:
        text = row.get("text") or ""
        if not isinstance(text, str):
            bad(f"'text' is a {type(text).__name__} ({_short(text)}); it must be a string.")
        if not text.strip():
            out["_empty"] = "'text' is empty"
        out["text"] = text
    if rich and fmt != "text":
        out["tools"] = _tools(row.get("tools"), bad)
    if image_paths:  # every row gets the column: [] for none
        out["images"] = _check_images(row.get("images"), base, bad)
    for column in ("messages", "prompt", "completion"):
        for message in out.get(column) or []:
            if not isinstance(message["content"], str):
                message["content"] = [_image_part(part, base, bad) for part in message["content"]]
            if rich:
                for key in ("reasoning", "tool_calls", "name", "tool_call_id"):
                    message.setdefault(key, None)
    return out


def _has_reply(message: dict) -> bool:
    return message["role"] == "assistant" and bool(
        _text_of(message["content"]).strip() or message.get("tool_calls")
    )


def _messages(value: Any, column: str, bad, rich: bool = False) -> list[dict]:
    """A conversation as [{role, content, ...}], from OpenAI-style role/content (with tool_calls and
    reasoning) or ShareGPT from/value (with function_call/observation turns)."""
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
                "assistant or tool (ShareGPT: human, gpt, system, function_call, observation)."
            )
        out: dict[str, Any] = {"role": ROLES[role.lower()]}
        calls = message.get("tool_calls")
        if role.lower() == "function_call":  # ShareGPT: the call is the turn's value, as JSON
            calls, content = _sharegpt_calls(content, number, bad), ""
        if content is None and (calls or out["role"] == "assistant"):
            content = ""  # OpenAI writes null content beside tool calls
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
        out["content"] = content
        reasoning = next((message[k] for k in REASONING_KEYS if message.get(k) is not None), None)
        if reasoning is not None and not isinstance(reasoning, str):
            bad(f"message {number} ({role}) has reasoning that is not a string: {_short(reasoning)}.")
        extra = {
            "reasoning": reasoning or None,
            "tool_calls": _tool_calls(calls, number, bad) if calls else None,
            "name": message.get("name"),
            "tool_call_id": message.get("tool_call_id"),
        }
        if any(v is not None for v in extra.values()):
            if not rich:  # typed sources whose schema hides these keys are the only way here
                bad(
                    f"message {number} has {', '.join(k for k, v in extra.items() if v is not None)}, which this source's columns do not declare."
                )
            out |= extra
        messages.append(out)
    return messages


def _sharegpt_calls(value: Any, number: int, bad) -> list:
    """ShareGPT's function_call value: one {"name", "arguments"} object (or a list), as a JSON string."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            bad(
                f'message {number} (function_call) is not JSON: {_short(value)}. Write {{"name": ..., "arguments": {{...}}}}.'
            )
    calls = value if isinstance(value, list) else [value]
    return [{"type": "function", "function": call} for call in calls]


def _tool_calls(calls: Any, number: int, bad) -> list[dict]:
    """OpenAI tool calls with their arguments as objects, the form chat templates render."""
    if not isinstance(calls, list):
        bad(f"message {number}: 'tool_calls' must be a list, got {_short(calls)}.")
    out = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            bad(
                f'message {number}: a tool call needs a function name, got {_short(call)} (OpenAI form: {{"type": "function", "function": {{"name": ..., "arguments": {{...}}}}}}).'
            )
        arguments = function.get("arguments", function.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                bad(
                    f"message {number}: the arguments of tool call '{function['name']}' are not valid JSON: {_short(arguments)}."
                )
        entry = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call, dict) and call.get("id") is not None:
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _tools(value: Any, bad) -> list[dict] | None:
    """The `tools` column: function schemas as a list (ShareGPT data stores them as a JSON string)."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            bad(f"'tools' is not valid JSON: {_short(value)}.")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        bad(f"'tools' must be a list of function schemas, got {_short(value)}.")
    return [t if "function" in t else {"type": "function", "function": t} for t in value]


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
        ([chat_message(m) for m in p], ref)
        for p, ref in pairs
        if isinstance(ref, str) and all(isinstance(m["content"], str) for m in p)
    ]


def chat_message(message: dict) -> dict:
    """A normal-form message as chat templates read it: absent keys left out (a template tests
    `is defined`), reasoning under both names templates use."""
    out = {"role": message["role"], "content": message["content"]}
    if message.get("reasoning"):
        out["reasoning_content"] = out["thinking"] = message["reasoning"]
    for key in ("tool_calls", "name", "tool_call_id"):
        if message.get(key) is not None:
            out[key] = message[key]
    return out


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
