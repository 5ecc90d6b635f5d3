"""Chat templates: which one a run uses (the tokenizer's own, or data.chat_template), and what the
masks need to know about it — the text it writes to open an assistant turn (its generation prompt)
and the control markers it writes, one of which closes each reply.

The named templates TRL ships are imported from TRL; chatml and alpaca, which it does not ship,
are written here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import UserError, cache_dir, warn
from finetune.schema import Config, DataConfig

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Plain text markers: for base models without chat tokens; the reply ends with the EOS token.
ALPACA = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% else %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)
# data.chat_template=<name>: templates for base models that ship none. The value names TRL's copy.
TEMPLATE_NAMES = {"chatml": None, "llama-3": "llama3_chat_template", "gemma": "gemma_chat_template",
                  "phi-3": "phi3_chat_template", "alpaca": None}  # fmt: skip
# What control markers look like in template text: <|im_end|>, <｜end▁of▁sentence｜>, </s>,
# <end_of_turn>, [/INST]. A template's markers that the tokenizer lacks are spelled out in pieces.
MARKER = re.compile(r"<\|[^|<>\s]+\|>|<｜[^｜<>]+｜>|</?[A-Za-z_][\w.-]*>|\[/?[A-Z][A-Z_]+\]")
PROBE_QUESTION, PROBE_REPLY = "\ue000probe question\ue001", "\ue000probe reply\ue001"


def named_template(choice: str) -> str:
    name = TEMPLATE_NAMES[choice]
    if name is None:
        return CHATML if choice == "chatml" else ALPACA
    from trl import chat_template_utils

    return getattr(chat_template_utils, name)


def load_tokenizer(path: str, cfg: Config, local_only: bool = False, **kwargs: Any):
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


def tokenizer_only(cfg: Config, local_only: bool = False):
    """The tokenizer for `cfg.model` without loading weights (a GGUF model: from the GGUF's metadata)."""
    from finetune import models, source

    m = cfg.model
    if m.gguf_file and source.is_catalog(m):  # the GGUF is the catalog model's copy, not another's
        converted = cache_dir() / "models" / m.name
        if (converted / "tokenizer_config.json").is_file():
            return load_tokenizer(str(converted), cfg, local_only)
        gguf = models._gguf_source(m.gguf_file)
        return load_tokenizer(str(gguf.parent), cfg, local_only, gguf_file=gguf.name)
    return load_tokenizer(m.name_or_path, cfg, local_only)


def use_chat_template(tokenizer, data_cfg: DataConfig) -> None:
    """data.chat_template, when set, replaces the tokenizer's own template (it is saved with the adapter).
    A template from elsewhere is checked against this tokenizer: its markers should be tokens, and
    something must close a reply, or the model never learns to stop."""
    choice = data_cfg.chat_template
    if not choice:
        return
    tokenizer.chat_template = _template_text(choice)
    shape = probe(tokenizer)
    if shape.missing:
        warn(
            f"data.chat_template={choice}: {', '.join(shape.missing)} are not tokens of this tokenizer, so they are "
            "spelled out in ordinary tokens and learned from scratch (each reply's end-of-turn marker is trained "
            "whole). Prefer the template of the model's family, or data.chat_template=alpaca (plain-text markers)."
        )
    if shape.closes is None:
        warn(
            f"data.chat_template={choice} writes no end-of-turn marker after a reply, so the model will not learn "
            "to stop: end each assistant turn with a marker, e.g. {{ message['content'] + eos_token }}."
        )


def _template_text(choice: str) -> str:
    if choice in TEMPLATE_NAMES:
        return named_template(choice)
    if choice.endswith(".jinja"):
        path = Path(choice).expanduser()
        if not path.is_file():
            raise UserError(f"data.chat_template={choice}: no such file.")
        return path.read_text(encoding="utf-8")
    if "{%" in choice or "{{" in choice:
        return choice  # a template written inline
    from finetune.schema import did_you_mean

    raise UserError(
        f"data.chat_template={choice} is not a known template.{did_you_mean(choice, list(TEMPLATE_NAMES))} "
        f"Known: {', '.join(TEMPLATE_NAMES)}; or a .jinja file."
    )


def describe(data_cfg: DataConfig, tokenizer) -> str:
    """How messages name the template in use: data.chat_template=<x>, or the tokenizer's own."""
    if data_cfg is not None and getattr(data_cfg, "chat_template", None):
        return f"data.chat_template={data_cfg.chat_template}"
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    return f"the chat template of {name}"


@dataclass(frozen=True)
class Shape:
    """What the masks need to know about a template (plain data: it travels to worker processes)."""

    opens: str  # the generation prompt: what the template writes to open an assistant turn
    markers: tuple[
        str, ...
    ]  # control markers, longest first: the tokenizer's special tokens and the template's own
    closes: str | None  # the marker closing a reply in a probe conversation; None: the template writes none
    missing: tuple[str, ...]  # the template's markers that are not single tokens of this tokenizer


def render(tokenizer, messages: list[dict], tools=None, generation: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools or None, tokenize=False, add_generation_prompt=generation
    )


def probe(tokenizer) -> Shape:
    """Render a one-question conversation to learn the template's generation prompt and end-of-turn."""
    from finetune.data.masks import common_prefix, turn_end

    template = tokenizer.chat_template
    template = (
        template.get("default", next(iter(template.values())))
        if isinstance(template, dict)
        else template or ""
    )
    question = [{"role": "user", "content": PROBE_QUESTION}]
    specials = {str(t) for t in tokenizer.all_special_tokens} | set(tokenizer.get_added_vocab())
    literal = set(MARKER.findall(template))
    markers = tuple(sorted((specials | literal | {tokenizer.eos_token or ""}) - {""}, key=len, reverse=True))
    try:
        asked, bare = render(tokenizer, question, generation=True), render(tokenizer, question)
        opens = asked[_marker_start(asked, common_prefix(asked, bare), markers) :]
    except Exception:  # a template that cannot render a lone question: no generation prompt to learn
        opens = ""
    closes = None
    try:
        text = render(tokenizer, [*question, {"role": "assistant", "content": PROBE_REPLY}])
        end = text.find(PROBE_REPLY)
        if end >= 0:
            closes = turn_end(text, end + len(PROBE_REPLY), markers)[1]
    except Exception:
        pass
    used = set(MARKER.findall(opens)) | ({closes} if closes else set())
    vocab = tokenizer.get_vocab()
    missing = tuple(sorted(m for m in used if m not in vocab and m not in specials))
    return Shape(opens=opens, markers=markers, closes=closes, missing=missing)


def _marker_start(text: str, at: int, markers: tuple[str, ...]) -> int:
    """`at`, moved back to the start of a marker it falls inside (<|end|> and <|assistant|> share '<|')."""
    for marker in markers:
        for start in range(max(0, at - len(marker) + 1), at):
            if text.startswith(marker, start):
                return start
    return at
