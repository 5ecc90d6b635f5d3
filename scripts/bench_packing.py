"""What packing and padding-free batching buy: real-token throughput against padded batches.

    python scripts/bench_packing.py [--repeats 3] [--examples 192] [--batch 8] [--max-length 512]

A small Qwen2-style model (built locally, no hub) trains one epoch over a dataset with skewed
lengths (log-normal: most examples short, a few long, like real chat data), prepared by
finetune.data exactly as a run prepares it, in three modes: padded batches (the default),
padding-free batches (data.padding_free=true) and packed rows (data.packing=true). Real tokens
are the dataset's tokens, identical in every mode; padding is not counted. The modes alternate
within each repeat, so machine noise hits them alike; the table reports medians and the ratio to
padded batches measured in the same run. Results go to BENCHMARKS.md (## Data pipeline) by hand.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from finetune import data  # noqa: E402

WORDS = "the a model learns to answer questions about dates numbers places and people with short clear replies".split()
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_model(folder: Path, hidden: int, layers: int):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [" ".join(WORDS)] * 50,
        trainers.BpeTrainer(
            vocab_size=512, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    config = AutoConfig.for_model(
        "qwen2", vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 128, 1), max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def skewed_dataset(n: int, max_length: int, seed: int):
    """Chats whose lengths follow a log-normal: median ~1/8 of max_length, a tail up to max_length."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = min(int(rng.lognormvariate(0, 1.0) * max_length / 12), max_length - 24)
        question = " ".join(rng.choices(WORDS, k=max(2, words // 4)))
        answer = " ".join(rng.choices(WORDS, k=max(2, words - words // 4)))
        rows.append(
            {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        )
    return Dataset.from_list(rows)


def train_once(
    folder: Path, tokenizer, tokenized, mode: str, args, out: Path, rows: int
) -> tuple[float, int]:
    """Seconds for one epoch, and the optimizer steps it took. `rows`: packed rows per step."""
    import torch
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    cfg = SimpleNamespace(
        data=SimpleNamespace(
            max_length=args.max_length, packing=mode == "packed", padding_free=mode != "padded"
        ),
        model=SimpleNamespace(attn_implementation="sdpa"),
        batch=SimpleNamespace(size=args.batch),
    )
    config = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=rows if mode == "packed" else args.batch, num_train_epochs=1, learning_rate=1e-4,
        logging_steps=1000, save_strategy="no", report_to="none", use_cpu=True, dataloader_pin_memory=False,
        seed=0, disable_tqdm=True, **data.sft_kwargs(cfg),
    )  # fmt: skip
    trainer = SFTTrainer(model=model, args=config, train_dataset=tokenized, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, trainer.state.global_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--examples", type=int, default=192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    import datasets
    import numpy as np
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        tokenizer = build_model(folder, args.hidden, args.layers)
        data_cfg = SimpleNamespace(max_length=args.max_length, overlong="truncate", train_on_prompt=False)
        tokenized, report = data.prepare(
            skewed_dataset(args.examples, args.max_length, seed=0), tokenizer, data_cfg
        )
        lengths = np.array([len(ids) for ids in tokenized["input_ids"]])
        real = int(lengths.sum())
        batches = [lengths[i : i + args.batch] for i in range(0, len(lengths), args.batch)]
        padded_tokens = int(
            sum(len(b) * b.max() for b in batches)
        )  # what padded batches compute (order aside)
        # Packed rows per step: about the tokens of an average padded batch, so steps compare like for like.
        rows = max(1, round(padded_tokens / len(batches) / args.max_length))
        times: dict[str, list[float]] = {"padded": [], "padding-free": [], "packed": []}
        steps = {}
        for mode in times:  # warm-up: the first epochs of a process pay for allocator and kernel set-up
            train_once(
                folder,
                tokenizer,
                tokenized.select(range(2 * args.batch)),
                mode,
                args,
                Path(tmp) / "warm-up",
                rows,
            )
        for repeat in range(args.repeats):
            order = list(times) if repeat % 2 == 0 else list(times)[::-1]
            for mode in order:
                seconds, steps[mode] = train_once(
                    folder, tokenizer, tokenized, mode, args, Path(tmp) / f"{mode}-{repeat}", rows
                )
                times[mode].append(seconds)
                print(
                    f"repeat {repeat + 1}: {mode:<13} {seconds:6.1f}s  {real / seconds:8.0f} real tokens/s",
                    flush=True,
                )

    base = statistics.median(times["padded"])
    print(
        f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; qwen2 hidden {args.hidden} x {args.layers} layers, sdpa, float32"
    )
    print(
        f"{args.examples} chats, {real:,} real tokens: p50 {report.percentiles['p50']}, p90 {report.percentiles['p90']}, "
        f"max {report.percentiles['max']}; padded batches of {args.batch} would hold {padded_tokens / real:.2f}x the real tokens"
    )
    per_step = {
        "padded": f"{args.batch} examples",
        "padding-free": f"{args.batch} examples",
        "packed": f"{rows} rows of {args.max_length}",
    }
    print(
        f"\n| batching (max_length {args.max_length}) | per step | steps | median s/epoch | real tokens/s | vs padded |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, values in times.items():
        median = statistics.median(values)
        print(
            f"| {mode} | {per_step[mode]} | {steps[mode]} | {median:.1f} | {real / median:,.0f} | {base / median:.2f}x |"
        )
    print(f"\nruns (s): {times}")


if __name__ == "__main__":
    main()
