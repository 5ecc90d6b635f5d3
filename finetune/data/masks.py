"""Which characters of a rendered conversation are trained: each assistant reply, as the template
renders it, plus the marker that ends its turn — found in the rendered conversation itself.

Templates rewrite conversations freely: Qwen3 drops the reasoning of earlier turns, Mistral moves
the system prompt into the last user turn, gpt-oss closes the last reply differently from earlier
ones. So nothing here assumes that a conversation renders as a prefix of a longer one. For each
reply, the conversation is rendered a second time with only that reply replaced by a sentinel; the
two renders differ exactly where the template put that reply (its reasoning, text and tool calls).
The trained span widens that to the turn: back to the end of the template's generation prompt
(what inference writes before the model speaks, so never trained) and forward through the marker
that closes the turn (what the model must learn to write, so it stops).

Then every example is checked on its tokens: each reply's text is trained, and no system, user or
tool text is. An example that fails is reported; a template that fails on many stops the run.
"""

from __future__ import annotations

from dataclasses import dataclass

SENTINEL = "\ue000reply {}\ue001"  # private-use characters: neither data nor templates contain them
LEAK_MIN_CHARS = 6  # shorter prompt texts also occur inside markers and replies by chance


@dataclass
class Span:
    start: int  # after the assistant header: the first character the model writes
    reply: tuple[int, int]  # where the template put this message's content, reasoning and tool calls
    end: int  # after the end-of-turn marker (== reply end when the template writes none)


def common_prefix(a: str, b: str) -> int:
    """Length of the common prefix of two strings (binary search on C-speed slice compares)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


def common_suffix(a: str, b: str) -> int:
    return common_prefix(a[::-1], b[::-1])


def turn_end(text: str, at: int, markers: tuple[str, ...]) -> tuple[int, str | None]:
    """(end, marker): the control marker written right after a reply (whitespace between allowed)."""
    gap = len(text) - at - len(text[at:].lstrip(" \t\n"))
    for marker in markers:  # longest first: <|im_end|> before <|im
        if text.startswith(marker, at + gap):
            return at + gap + len(marker), marker
    return at, None


def reply_spans(
    render,
    messages: list[dict],
    trained: list[int],
    opens: str,
    markers: tuple[str, ...],
    closes: str | None = None,
):
    """(text, spans): the conversation rendered, and the trained span of each message in `trained`.

    `render(messages)` is the template; `opens` its generation prompt; `markers` the control markers
    that may close a turn, longest first; `closes` the one that closes a plain reply.
    """
    text = render(messages)
    spans, floor = [], 0
    for index in trained:
        probe = list(messages)
        probe[index] = {"role": "assistant", "content": SENTINEL.format(index)}
        kept_calls = False
        try:
            other = render(probe)
        except (
            Exception
        ):  # templates that check a tool message follows a tool call (gpt-oss) need the call kept
            if not messages[index].get("tool_calls"):
                raise
            probe[index] = {**messages[index], "content": SENTINEL.format(index)}
            probe[index].pop("reasoning_content", None), probe[index].pop("thinking", None)
            other, kept_calls = render(probe), True
        start = common_prefix(text, other)
        stop = len(text) - common_suffix(text[start:], other[start:])
        header = text.rfind(opens, floor, start) if opens else -1
        first = header + len(opens) if header >= 0 else start
        end = turn_end(text, stop, markers)[0]
        if kept_calls and closes:  # the calls render after the text, unchanged: the turn runs to its closer
            found = text.find(closes, stop)
            end = found + len(closes) if found >= 0 else end
        spans.append(Span(first, (start, stop), end))
        floor = end
    return text, spans


def labels_for(ids: list[int], offsets: list, spans: list[tuple[int, int]]) -> list[int]:
    """Token ids where a token overlaps a trained span, -100 elsewhere. Overlap, not containment:
    a marker spelled in several ordinary tokens is trained whole, and a token that straddles a
    reply's first character carries part of the reply."""
    labels = []
    for token, (begin, end) in zip(ids, offsets):
        hit = any(begin < e and end > s for s, e in spans) or (
            begin == end and any(s <= begin < e for s, e in spans)
        )
        labels.append(token if hit else -100)
    return labels


def trained_runs(text: str, offsets: list, labels: list) -> list[str]:
    """The trained text, as maximal runs of trained characters."""
    import re

    mask = bytearray(len(text))
    for (begin, end), label in zip(offsets, labels):
        if label != -100 and end > begin:
            mask[begin:end] = b"\x01" * (end - begin)
    return [text[m.start() : m.end()] for m in re.finditer(rb"\x01+", bytes(mask))]


def check(text: str, offsets: list, labels: list, replies: list[dict], prompts: list[str]) -> str:
    """'' when each reply is trained and no prompt text is; else what is wrong, in words."""
    runs = trained_runs(text, offsets, labels)
    own = [
        " ".join(filter(None, [visible(m["content"]), m.get("reasoning_content") or "", *call_texts(m)]))
        for m in replies
    ]
    for number, message in enumerate(replies, 1):
        for piece in (visible(message["content"]), *[c.split("\n")[0] for c in call_texts(message)]):
            if piece and not any(piece in run for run in runs):
                where = "a tool call of reply" if piece != visible(message["content"]) else "reply"
                return f"{where} {number} is not trained ({piece[:40]!r} is not in the trained tokens)"
    for prompt in prompts:
        prompt = prompt.strip()
        if (
            len(prompt) >= LEAK_MIN_CHARS
            and any(prompt in run for run in runs)
            and not any(prompt in o for o in own)
        ):
            return f"prompt text is trained ({prompt[:40]!r})"
    return ""


def visible(content) -> str:
    """A reply's final text: reasoning written inline (<think>...</think>) is not part of it."""
    text = (
        content
        if isinstance(content, str)
        else "".join(p.get("text") or "" for p in content if p.get("type", "text") == "text")
    )
    return text.split("</think>")[-1].strip()


def call_texts(message: dict) -> list[str]:
    return [c["function"]["name"] for c in message.get("tool_calls") or []]
