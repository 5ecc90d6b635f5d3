"""From normal-form rows to what the trainer reads: render with the chat template, tokenize, label
(-100 = not trained, the masks of finetune.data.masks), verify, then fit data.max_length
(truncate or drop, counted) and report. Also the lengths (data.max_length=auto) and the SFTConfig
keys the data decides (packing, padding-free batching).

We tokenize ourselves, so that `python -m finetune.data` shows exactly the tokens, and the trained
ones, that training sees; TRL only batches or packs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from finetune import UserError, warn
from finetune.data import masks, templates
from finetune.data.formats import _BadRow, _text_of, chat_message, processes
from finetune.schema import Config, DataConfig

AUTO_MAX_LENGTH_QUANTILE = 0.99  # data.max_length=auto covers this share of examples untruncated
AUTO_MAX_LENGTH_SAMPLE = 2000  # examples tokenized to measure the length distribution
PLANNING_MAX_LENGTH = 2048
"""data.max_length=auto when planning without the tokenizer or the data on this machine: a common
length for chat SFT. A real run always measures the data."""
SYSTEMATIC = 0.1  # this share of examples failing the mask check means the template is at fault
SHOWN_FAILURES = 3  # origins listed when a few examples fail


def encode(row: dict, tokenizer, train_on_prompt: bool = False, shape: templates.Shape | None = None) -> dict:
    """Render one normal-form row and tokenize it.

    Returns the rendered `text`, `input_ids`, `labels` (-100 where not trained), `offsets`,
    `problem` ('' or why the trained tokens are not what they should be) and `system_lost` (the
    row's system message is not in the rendered text: the template left it out). Chat rows are trained
    on the assistant replies (of the completion, for prompt/completion rows), each with the
    marker that ends its turn; see finetune.data.masks.
    """
    if row.get("text") is not None:
        eos = tokenizer.eos_token or ""
        text = row["text"] if row["text"].endswith(eos) else row["text"] + eos
        encoded = tokenizer(text, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        return {
            "text": text,
            "input_ids": ids,
            "labels": list(ids),
            "offsets": encoded["offset_mapping"],
            "problem": "",
            "system_lost": False,
        }
    if tokenizer.chat_template is None:
        raise UserError(
            "the tokenizer has no chat template, and this data is chat-shaped. For a base model set "
            f"data.chat_template=<{'|'.join(templates.TEMPLATE_NAMES)}> (or a .jinja file), or train on plain text with data.format=text."
        )
    shape = shape or templates.probe(tokenizer)
    context = row["prompt"] if row.get("prompt") is not None else []
    convo = [_text_message(m) for m in (context + row["completion"] if context else row["messages"])]
    tools = row.get("tools") or None

    def render(messages: list[dict]) -> str:
        return templates.render(tokenizer, messages, tools)

    trained = [i for i, m in enumerate(convo) if m["role"] == "assistant" and i >= len(context)]
    if train_on_prompt:
        text = render(convo)
        spans = [(0, len(text))]
    else:
        text, found = masks.reply_spans(render, convo, trained, shape.opens, shape.markers, shape.closes)
        spans = [(s.start, s.end) for s in found]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    labels = masks.labels_for(ids, offsets, spans)
    problem = ""
    if not train_on_prompt:
        prompts = [m["content"] for m in convo if m["role"] in ("system", "user", "tool")]
        problem = masks.check(text, offsets, labels, [convo[i] for i in trained], prompts)
    # Mistral's templates place the system message before the *last* user turn only, and a training
    # example ends with a reply: the model would train without the instructions it is given.
    lost = any(m["role"] == "system" and m["content"].strip() and m["content"] not in text for m in convo)
    return {
        "text": text,
        "input_ids": ids,
        "labels": labels,
        "offsets": offsets,
        "problem": problem,
        "system_lost": lost,
    }


def _text_message(message: dict) -> dict:
    """Templates of text models need string contents: a multimodal message keeps its text parts here."""
    message = chat_message(message)
    if not isinstance(message["content"], str):
        message["content"] = _text_of(message["content"])
    return message


def _encode_row(row: dict, index: int, tokenizer, train_on_prompt: bool, shape) -> dict:
    origin = row.get("origin") or f"example {index + 1}"
    try:
        out = encode(row, tokenizer, train_on_prompt, shape)
    except UserError:
        raise
    except Exception as err:  # the template rejected this conversation (raise_exception, missing keys, ...)
        raise _BadRow(origin, f"the chat template failed on it: {err}") from None
    trained = sum(label != -100 for label in out["labels"])
    problem = out["problem"] or ("" if trained else "no token is trained")
    return {
        "input_ids": out["input_ids"],
        "labels": out["labels"],
        "n_tokens": len(out["input_ids"]),
        "n_trained": trained,
        "problem": problem,
        "origin": origin,
        "system_lost": out["system_lost"],
    }


def tokenize(dataset, tokenizer, data_cfg: DataConfig):
    """input_ids and labels (full length, untruncated) plus n_tokens and n_trained for every example
    that passes the mask check. Examples that fail it are dropped and named; when many fail, the
    template is at fault and the run stops with what to do."""
    chat = "text" not in dataset.column_names
    train_on_prompt = bool(getattr(data_cfg, "train_on_prompt", False))
    shape = templates.probe(tokenizer) if chat and tokenizer.chat_template is not None else None
    if chat:
        _check_tool_support(dataset, tokenizer, data_cfg)
    try:
        tokens = dataset.map(
            _encode_row,
            with_indices=True,
            fn_kwargs={"tokenizer": tokenizer, "train_on_prompt": train_on_prompt, "shape": shape},
            remove_columns=dataset.column_names,
            num_proc=processes(len(dataset)),
            desc="Tokenizing",
        )
    except _BadRow as bad:
        raise UserError(f"{bad.origin}: {bad.problem}") from None
    lost = sum(tokens["system_lost"])
    if lost:
        warn(
            f"data: {templates.describe(data_cfg, tokenizer)} leaves the system message out of {lost} of "
            f"{len(tokens)} examples (it renders it only before a final user turn), so they train without it. "
            "To keep it, move it into the first user message, or set data.chat_template=chatml (or a .jinja file)."
        )
    tokens = tokens.remove_columns("system_lost")
    failed = tokens.filter(lambda p: p != "", input_columns="problem", desc="Checking masks")
    if len(failed):
        where = templates.describe(data_cfg, tokenizer)
        first = "; ".join(
            f"{r['origin']}: {r['problem']}" for r in failed.select(range(min(SHOWN_FAILURES, len(failed))))
        )
        if len(failed) >= max(1, SYSTEMATIC * len(tokens)):
            raise UserError(
                f"{where} does not mark the assistant replies of this data correctly: {len(failed)} of {len(tokens)} "
                f"examples fail the mask check ({first}). Use the template the model was trained with, or set one "
                "that renders every message: data.chat_template=<chatml|llama-3|...|file.jinja>."
            )
        warn(
            f"data: {len(failed)} of {len(tokens)} examples dropped, their trained tokens are not the replies ({first})."
        )
        tokens = tokens.filter(lambda p: p == "", input_columns="problem", desc="Dropping")
    return tokens.remove_columns(["problem", "origin"])


def _check_tool_support(dataset, tokenizer, data_cfg: DataConfig) -> None:
    """Tool calls need a template that renders them; one that drops them would train empty turns."""
    columns = [c for c in ("messages", "prompt", "completion") if c in dataset.column_names]
    if not any("tool_calls" in str(dataset.features[c]) for c in columns):
        return
    origin = None
    for column in columns:
        hit = dataset.filter(
            lambda ms: any(m.get("tool_calls") for m in ms), input_columns=column, desc="Finding tool calls"
        )
        if len(hit):
            origin = hit[0].get("origin") or "an example"
            break
    if origin is None:
        return
    from trl.chat_template_utils import supports_tool_calling

    if not supports_tool_calling(tokenizer):
        raise UserError(
            f"{origin}: this data has tool calls, but {templates.describe(data_cfg, tokenizer)} does not render them "
            "(they would be dropped and the assistant trained on empty turns). Use a model whose template supports "
            "tools, or data.chat_template=<a .jinja that renders tool_calls and tool messages>."
        )


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
    dropped_mask: int = 0  # failed the mask check (the template mis-marks them): removed

    def summary(self) -> str:
        dropped = self.dropped_long + self.dropped_empty + self.dropped_mask
        share = self.trained_tokens / self.tokens if self.tokens else 0
        return (
            f"data: {self.kept} examples to train on, {self.tokens:,} tokens ({share:.0%} trained); "
            f"max_length {self.max_length}: {self.over_max_length} longer, {self.truncated} truncated, "
            f"{dropped} dropped. Lengths p50 {self.percentiles['p50']}, p99 {self.percentiles['p99']}, "
            f"max {self.percentiles['max']}."
        )


def prepare(dataset, tokenizer, data_cfg: DataConfig):
    """(tokenized train set for SFTTrainer, Report): every example tokenized with its labels, cut or
    dropped at data.max_length, and checked to keep at least one trained token."""
    import numpy as np

    max_length = data_cfg.max_length
    assert isinstance(max_length, int), "resolve_max_length(cfg) must run before prepare()"
    vision = _multimodal(dataset)
    tokens = tokenize(dataset, tokenizer, data_cfg)
    lengths = np.asarray(tokens.with_format("numpy")["n_tokens"])
    status = tokens.map(
        fit,
        fn_kwargs={"max_length": max_length, "drop": data_cfg.overlong == "drop"},
        desc="Fitting max_length",
    )
    codes = np.asarray(status.with_format("numpy")["status"])
    kept = status.filter(lambda s: s < 2, input_columns="status", desc="Dropping")
    trained = int(np.asarray(kept.with_format("numpy")["n_trained"]).sum()) if len(kept) else 0
    report = Report(
        examples=len(dataset),
        kept=len(kept),
        max_length=max_length,
        truncated=int((codes == 1).sum()),
        dropped_long=int((codes == 2).sum()),
        dropped_empty=int((codes == 3).sum()),
        over_max_length=int((lengths > max_length).sum()),
        percentiles=_percentiles(lengths),
        tokens=int(np.minimum(lengths, max_length)[codes < 2].sum()),
        trained_tokens=trained,
        dropped_mask=len(dataset) - len(tokens),
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

    from finetune.data.formats import _content_feature

    contents = [_content_feature(dataset.features.get(c)) for c in ("messages", "prompt", "completion")]
    return "images" in dataset.column_names or any(isinstance(c, Json) for c in contents)


def fit(row: dict, max_length: int, drop: bool) -> dict:
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


def resolve_max_length(
    cfg: Config, tokenizer=None, train=None, planning: bool | None = None
) -> tuple[int, str]:
    """Fill data.max_length when it is `auto` (in place) and say why; a fixed value passes through.

    Measures the training data with the model's tokenizer (no weights; a sample of at most
    AUTO_MAX_LENGTH_SAMPLE examples). When only planning (`planning`, default: cfg.dry_run), a
    tokenizer or data file that is not on this machine gives PLANNING_MAX_LENGTH instead, with the
    reason; a real run raises. `tokenizer` and `train` (the normal-form training set) save loading
    them again.
    """
    from finetune.data.sources import load
    from finetune.schema import AUTO

    d = cfg.data
    if d.max_length != AUTO:
        return d.max_length, "set by you or a config file"
    planning = cfg.dry_run if planning is None else planning

    def fallback(reason: str) -> tuple[int, str]:
        d.max_length = PLANNING_MAX_LENGTH
        return (
            PLANNING_MAX_LENGTH,
            f"auto: {reason}; planning with {PLANNING_MAX_LENGTH} (a real run measures the data)",
        )

    try:
        tokenizer = tokenizer or templates.tokenizer_only(cfg, local_only=planning)
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


def _model_limit(cfg: Config, tokenizer) -> int | None:
    """The longest sequence the model takes: its config's max_position_embeddings, else the tokenizer's."""
    from finetune import source

    arch = source.architecture(cfg.model) or {}
    limit = (arch.get("text_config") or arch).get("max_position_embeddings")
    if not limit and tokenizer.model_max_length and tokenizer.model_max_length < 1_000_000:
        limit = tokenizer.model_max_length
    return int(limit) if limit else None


# ---------------------------------------------------------------------------------------------
# Batching


def sft_kwargs(cfg: Config) -> dict:
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
