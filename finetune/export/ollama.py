"""An Ollama Modelfile for an exported GGUF: FROM the file, the chat template as a Go TEMPLATE, stops.

Ollama's templates are Go templates, not Jinja, so no template can be translated in general. Most
chat templates, though, wrap each message in fixed text per role (ChatML, Llama 3, Gemma, Phi-3,
...). `turn_format` recovers that text by rendering the Jinja template around marker strings, and
only accepts it when the recovered format reproduces the template's renders exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_S, _U1, _A1, _U2, _A2 = "SYS_9f1c", "USR_4a7e", "AST_2b8d", "USR_7c3f", "AST_5e6a"


@dataclass
class TurnFormat:
    start: str  # text before the first message (often the BOS token)
    prefix: dict[str, str]  # role -> text before its content
    suffix: dict[str, str]  # role -> text after its content
    default_system: str | None  # the system prompt the template adds when the conversation has none

    def render(self, messages: list[dict], generation: bool) -> str:
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        text = self.start + "".join(
            self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]] for m in messages
        )
        return text + (self.prefix["assistant"] if generation else "")


def _render(tokenizer: Any, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _cut(text: str, *markers: str) -> list[str] | None:
    """The pieces of `text` between the markers, in order; None when they are not all there."""
    pieces = []
    for marker in markers:
        head, found, text = text.partition(marker)
        if not found:
            return None
        pieces.append(head)
    return [*pieces, text]


def _strip(text: str, prefix: str = "", suffix: str = "") -> str | None:
    if not (text.startswith(prefix) and text.endswith(suffix)) or len(prefix) + len(suffix) > len(text):
        return None
    return text[len(prefix) : len(text) - len(suffix)]


def turn_format(tokenizer: Any) -> TurnFormat | None:
    """The fixed per-role text around messages that this tokenizer's chat template writes, or None
    when the template does something else (dates, tool calls, dropped turns, ...)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        full = [
            {"role": "system", "content": _S},
            {"role": "user", "content": _U1},
            {"role": "assistant", "content": _A1},
            {"role": "user", "content": _U2},
            {"role": "assistant", "content": _A2},
        ]
        pieces = _cut(_render(tokenizer, full, False), _S, _U1, _A1, _U2, _A2)
        no_system = _cut(_render(tokenizer, full[1:2], False), _U1)
        generation = _strip(_render(tokenizer, full[1:2], True), _render(tokenizer, full[1:2], False))
    except Exception:  # a template that raises on these conversations (roles it rejects) is not expressible
        return None
    if pieces is None or no_system is None or generation is None:
        return None
    p0, p1, p2, p3, p4, p5 = pieces
    assistant_suffix = p5
    user_suffix = _strip(p2, "", generation)
    user_prefix = _strip(p3, assistant_suffix)
    system_suffix = _strip(p1, "", user_prefix or "")
    if None in (user_suffix, user_prefix, system_suffix) or p4 != p2:
        return None
    bos = getattr(tokenizer, "bos_token", None) or ""
    candidates = []
    start = _strip(no_system[0], "", user_prefix)
    if start is not None and p0.startswith(start):  # no system prompt unless the conversation has one
        candidates.append((start, p0[len(start) :], None))
    default = _strip(no_system[0], p0, system_suffix + user_prefix)
    if default is not None:  # the template adds its own system prompt to a conversation without one
        # Text before the system turn is the BOS token only when it does not open every turn (ChatML's
        # <|im_start|> can be both BOS and the turn marker).
        lead = bos and p0.startswith(bos) and not user_prefix.startswith(bos)
        start = bos if lead else ""
        candidates.append((start, p0[len(start) :], default))
    checks = [full[1:2], full[1:4], full[:2], full, full[1:]]
    for start, system_prefix, default_system in candidates:
        found = TurnFormat(
            start,
            {"system": system_prefix, "user": user_prefix, "assistant": generation},
            {"system": system_suffix, "user": user_suffix, "assistant": assistant_suffix},
            default_system,
        )
        if all(found.render(c, g) == _render(tokenizer, c, g) for c in checks for g in (False, True)):
            return found
    return None


def _go(text: str) -> str:
    return text.replace("{{", '{{ "{{" }}')  # literal braces, not an action


def adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def go_template(fmt: TurnFormat, bos_added: str | None) -> str:
    """The turn format as an Ollama (Go text/template) TEMPLATE over .Messages. `bos_added`: the BOS
    token llama.cpp puts in front by itself (tokenizer.ggml.add_bos_token), which must not come twice."""
    start = "" if bos_added and fmt.start == bos_added else fmt.start
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}'
        f"{_go(fmt.prefix[role])}{{{{ .Content }}}}{_go(fmt.suffix[role])}"
        for i, role in enumerate(("system", "user", "assistant"))
    )
    return f"{_go(start)}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{_go(fmt.prefix['assistant'])}"


def stop_strings(tokenizer: Any, fmt: TurnFormat | None) -> list[str]:
    """What ends the assistant's turn: the end-of-turn text, the EOS token, a new turn's marker."""
    stops = []
    if fmt is not None:
        stops.append(fmt.suffix["assistant"].strip())
        specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
        stops += [t for t in specials if t in fmt.prefix["user"]]
    if tokenizer.eos_token:
        stops.append(tokenizer.eos_token)
    return list(dict.fromkeys(s for s in stops if s))


def _quoted(text: str) -> str:
    return f'"""{text}"""'


def modelfile(gguf_name: str, tokenizer: Any) -> tuple[str, bool]:
    """(the Modelfile's text, whether it carries a TEMPLATE)."""
    fmt = turn_format(tokenizer)
    lines = [
        "# ollama create <name> -f Modelfile  (then: ollama run <name>)",
        f"FROM ./{gguf_name}",
    ]
    bos_added = tokenizer.bos_token if adds_bos(tokenizer) else None
    template = go_template(fmt, bos_added) if fmt is not None else None
    if template is not None and '"""' not in template:
        lines.append(f"TEMPLATE {_quoted(template)}")
        if fmt.default_system and '"""' not in fmt.default_system:
            lines.append(f"SYSTEM {_quoted(fmt.default_system)}")
    else:
        template = None
        lines.append(
            "# No TEMPLATE: this chat template is not fixed text around each message, so it has no exact Go"
            " form here; Ollama falls back to the chat template stored in the GGUF file."
        )
    for stop in stop_strings(tokenizer, fmt):
        lines.append(f'PARAMETER stop "{stop}"' if '"' not in stop else f"PARAMETER stop {_quoted(stop)}")
    return "\n".join(lines) + "\n", template is not None
