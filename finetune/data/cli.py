"""`python -m finetune.data <the same overrides as training> [example=N] [format=table|json]`: load,
check and tokenize the data with the model's tokenizer (no weights) and print what was found, with
one example exactly as training sees it (after truncation), trained tokens marked."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

from finetune import UserError
from finetune.data.formats import FORMAT_COLUMNS
from finetune.data.sources import load
from finetune.data.templates import tokenizer_only
from finetune.data.tokenization import (
    Report,
    encode,
    prepare,
    render_segments,
    resolve_max_length,
    sft_kwargs,
)
from finetune.schema import Config

TRAINED, MASKED = "[[", "]]"  # how `python -m finetune.data` marks trained tokens without colour


def _inspect(cfg: Config, output: str, example: int) -> None:
    train, held_out = load(cfg.data, cfg.train.eval_samples, cfg.seed)  # bad data fails before the tokenizer
    tokenizer = tokenizer_only(cfg)
    length, why = resolve_max_length(cfg, tokenizer, train)
    prepared, report = prepare(train, tokenizer, cfg.data)
    if not 0 <= example < len(train):
        raise UserError(
            f"example={example}: the training set has {len(train)} examples (0 to {len(train) - 1})."
        )
    row = train[example]
    shown = encode(row, tokenizer, cfg.data.train_on_prompt)
    fate = "kept"
    if (
        len(shown["input_ids"]) > length
    ):  # shown as training sees it: cut at max_length, or not trained at all
        fate = "dropped: longer than data.max_length (data.overlong=drop)"
        if cfg.data.overlong != "drop":
            cut = shown["offsets"][length - 1][1]
            shown = {
                **shown,
                "text": shown["text"][:cut],
                **{k: shown[k][:length] for k in ("input_ids", "labels", "offsets")},
            }
            fate = f"truncated to data.max_length={length}"
            if all(label == -100 for label in shown["labels"]):
                fate = "dropped: truncation leaves nothing to train on"
    if shown["problem"]:
        fate = f"dropped: {shown['problem']}"
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
            "fate": fate,
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
    if report.dropped_mask:
        print(
            f"mask check: {report.dropped_mask} examples dropped, their trained tokens were not the replies"
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
        f"\nexample {ex['index']} ({ex['origin']}): {ex['tokens']} tokens, {ex['trained_tokens']} trained, {ex['fate']}; {legend}"
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
            "example": "N            the example to show, as training sees it (default 0)",
            "format": "table|json   a report (default), or one JSON object on stdout",
        },
        machine_output=own["format"] == "json",
    )


if __name__ == "__main__":
    main()
