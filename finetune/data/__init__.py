"""Training data, one linear path from what the user has to what the model is trained on:

    sources (demo | file/folder, plain or compressed | saved dataset | hub)
    ─► formats: check and normalise every row (one function, every format)
    ─► templates + masks: render with the chat template; find each reply in the rendered text
    ─► tokenization: input_ids + labels (-100 = not trained), each example verified, truncated or
       dropped at max_length, with counts ─► SFTTrainer (it only batches or packs)

Bad data raises `UserError` naming the file, the line or row, and the fix.
`python -m finetune.data` (finetune.data.cli) shows what training will see.
"""

from finetune.data.formats import FORMAT_COLUMNS, ROLES, detect_format, normalise, scoring_pairs
from finetune.data.sources import DEMO_INSTRUCTION, demo_examples, load
from finetune.data.templates import CHATML, TEMPLATE_NAMES, load_tokenizer, tokenizer_only, use_chat_template
from finetune.data.tokenization import (
    PLANNING_MAX_LENGTH,
    Report,
    choose_max_length,
    encode,
    prepare,
    render_segments,
    resolve_max_length,
    sft_kwargs,
    tokenize,
)


def main() -> None:
    from finetune.data.cli import main as run

    run()


__all__ = [
    "CHATML", "DEMO_INSTRUCTION", "FORMAT_COLUMNS", "PLANNING_MAX_LENGTH", "ROLES", "TEMPLATE_NAMES", "Report",
    "choose_max_length", "demo_examples", "detect_format", "encode", "load", "load_tokenizer", "main", "normalise",
    "prepare", "render_segments", "resolve_max_length", "scoring_pairs", "sft_kwargs", "tokenize", "tokenizer_only",
    "use_chat_template",
]  # fmt: skip
