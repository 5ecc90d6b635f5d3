"""Shared fixtures: a tiny chat model and tokenizer built locally (no hub), and ways to run finetune."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune import config_dir
from finetune.data import demo_examples

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Tests never reach a hub: fail fast instead of retrying a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# The tiny models' widths: big enough for real attention and MLP code paths, trains in seconds.
TINY_DIMS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def bpe_tokenizer(corpus: list[str], specials: list[str], vocab_size: int, **special_tokens):
    """A byte-level BPE tokenizer trained on `corpus` in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special_tokens)


def build_tiny_model(folder: Path, arch: str = "qwen2", **arch_kwargs) -> Path:
    """A 2-layer chat model with a byte-level BPE tokenizer trained on the demo task, saved to `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    train, held_out = demo_examples(200, 20, seed=0)
    corpus = [ex["prompt"][0]["content"] + " " + ex["completion"][0]["content"] for ex in train + held_out]
    tokenizer = bpe_tokenizer(
        corpus + ["user assistant system"] * 20,
        ["<|pad|>", "<|im_start|>", "<|im_end|>"],
        400,
        pad_token="<|pad|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    tokenizer.chat_template = CHATML
    config = AutoConfig.for_model(
        arch,
        vocab_size=len(tokenizer),
        **TINY_DIMS,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
        **arch_kwargs,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_vlm(folder: Path) -> Path:
    """A 2-layer Qwen2-VL (vision tower of one block) with its processor, saved to `folder`."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForImageTextToText,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    specials = [
        "<|pad|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    tokenizer = bpe_tokenizer(
        ["a red square", "a blue square", "what colour is this shape", "user assistant"] * 20,
        specials,
        300,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        additional_special_tokens=specials[3:],
    )
    template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
        "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer.chat_template = template
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56 * 4),
        video_processor=Qwen2VLVideoProcessor(),
        tokenizer=tokenizer,
        chat_template=template,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = AutoConfig.for_model(
        "qwen2_vl",
        vocab_size=len(tokenizer),
        **TINY_DIMS,
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]},
    )
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


def tiny_overrides(model_dir: Path, out: Path, *extra: str) -> list[str]:
    """Overrides that train the local tiny model on the demo task for two steps."""
    return [
        "model.name=test-tiny",
        f"model.name_or_path={model_dir}",
        f"output_dir={out}",
        "train.max_steps=2",
        "train.eval_samples=4",
        "batch.size=2",
        "batch.grad_accum=1",
        "batch.effective=null",
        "data.num_train=16",
        *extra,
    ]


def compose(overrides: list[str], config_name: str = "finetune", folder: Path | None = None):
    """The typed configuration `python -m finetune <overrides>` would run (composed, validated)."""
    from finetune import schema

    return schema.typed(compose_raw(overrides, config_name, folder))


def compose_raw(overrides: list[str], config_name: str = "finetune", folder: Path | None = None):
    """What Hydra's compose API makes of `overrides`, before finetune validates and types it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import finetune.schema  # noqa: F401 - registers the schema with Hydra

    with initialize_config_dir(config_dir=str(folder or config_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def run_cli(*args: str, module: str = "finetune", cwd: Path | None = None, timeout: int = 600):
    """Run `python -m <module> <args>` in a fresh process; returns the CompletedProcess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> Path:
    """The trained default job (python -m finetune), once per session for the merge, export and chat
    slow tests; FINETUNE_DEFAULT_RUN=<its run folder> reuses one trained earlier."""
    given = os.environ.get("FINETUNE_DEFAULT_RUN")
    if given:
        return Path(given)
    from finetune import pipeline

    out = tmp_path_factory.mktemp("default")
    return pipeline.run(compose([f"output_dir={out}", "run_name=default"])).run_dir


# ---- tokenizers with real chat templates (tests/test_data_templates.py, tests/test_data.py)

TEMPLATES = Path(__file__).parent / "data" / "templates"  # real chat templates, sources in SOURCES.md
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_SPECIALS = [*CHATML_SPECIALS, "<tool_call>", "</tool_call>", "<think>", "</think>"]
MISTRAL_SPECIALS = ["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]  # fmt: skip
# name -> (special tokens, bos, eos): the tokens each model's tokenizer has for its template
TEMPLATE_MODELS = {
    "llama-3.1": (
        [
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|python_tag|>",
        ],
        "<|begin_of_text|>",
        "<|eot_id|>",
    ),  # fmt: skip
    "qwen2.5": (QWEN_SPECIALS[:5], None, "<|im_end|>"),
    "qwen3-release": (QWEN_SPECIALS, None, "<|im_end|>"),
    "qwen3-current": (QWEN_SPECIALS, None, "<|im_end|>"),
    "mistral-v0.3": (MISTRAL_SPECIALS, "<s>", "</s>"),
    "mistral-nemo": (MISTRAL_SPECIALS, "<s>", "</s>"),
    "gemma-2": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>"),
    "phi-3": (["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None, "<|endoftext|>"),
    "phi-4": (["<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"], None, "<|im_end|>"),
    "phi-4-release": (["<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"], None, "<|im_end|>"),
    "deepseek-r1-distill": (
        [
            "<｜begin▁of▁sentence｜>",
            "<｜end▁of▁sentence｜>",
            "<｜User｜>",
            "<｜Assistant｜>",
            "<think>",
            "</think>",
        ],
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
    ),  # fmt: skip
    "gpt-oss": (
        [
            "<|startoftext|>",
            "<|endoftext|>",
            "<|start|>",
            "<|end|>",
            "<|message|>",
            "<|channel|>",
            "<|return|>",
            "<|call|>",
            "<|constrain|>",
        ],
        "<|startoftext|>",
        "<|return|>",
    ),  # fmt: skip
    "smollm2": (CHATML_SPECIALS, None, "<|im_end|>"),
    "zephyr": (
        ["<unk>", "<s>", "</s>"],
        "<s>",
        "</s>",
    ),  # <|user|> etc. are plain text in zephyr's vocabulary
}


def tokenizer_for(name: str, template: str | None = None):
    """A small BPE tokenizer with the special tokens of model `name` and its real chat template."""
    specials, bos, eos = TEMPLATE_MODELS[name]
    words = [
        "Convert to ISO date: May 1, 2001 2001-05-01 Answer with the date only. user assistant system"
    ] * 5
    tokens = {"eos_token": eos, "pad_token": specials[0], **({"bos_token": bos} if bos else {})}
    tokenizer = bpe_tokenizer(words, specials, 300, **tokens)
    tokenizer.chat_template = template or (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    return tokenizer
