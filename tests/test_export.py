"""finetune.export: GGUF files read back by an independent reader (transformers' GGUF loader) give the
merged model's answers; the Modelfile's template is the chat template; what cannot be exported says so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CHATML, build_tiny_model, compose, run_cli, tiny_overrides

from finetune import UserError, pipeline, runfolder
from finetune.export import export, ollama

ODD_TEXT = "Hello, world!  It's 2021-03-05 :)\n\tünïcödé — 12345 <|im_start|> x"


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def trained(request, tmp_path_factory, tiny_model) -> Path:
    """A 2-step LoRA run on a tiny model of each supported architecture."""
    arch = request.param
    model = (
        tiny_model if arch == "qwen2" else build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")
    )
    out = tmp_path_factory.mktemp(f"export-{arch}")
    return pipeline.run(compose(tiny_overrides(model, out, f"run_name={arch}"))).run_dir


def _prompts(n: int) -> list[list[dict]]:
    from finetune.data import demo_examples

    _, held_out = demo_examples(8, n, seed=1)
    return [ex["prompt"] for ex in held_out]


def _read_back(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _ids(tokenizer, prompt) -> torch.Tensor:
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def _greedy(model, ids, n=12) -> list[int]:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)[
            0, ids.shape[1] :
        ].tolist()


def _teacher_forced_agreement(reference, other, ids, n: int, margin: float) -> tuple[bool, int]:
    """Does `other` pick the reference's greedy token at every step where the reference's own choice
    is clear (top-2 gap above `margin`)? Near-ties flip under any rounding, so they are excused."""
    with torch.no_grad():
        out = reference.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
        positions = slice(ids.shape[1] - 1, out.shape[1] - 1)
        ref, oth = reference(out).logits[0, positions], other(out).logits[0, positions]
    top = ref.topk(2).values
    clear = (top[:, 0] - top[:, 1]) > margin
    return bool((oth.argmax(-1) == out[0, ids.shape[1] :])[clear].all()), int(clear.sum())


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_round_trip_gives_the_merged_models_answers(trained, quant):
    gguf = export(str(trained), "gguf", quant)
    assert gguf == trained / "export" / f"{trained.name}-{quant}.gguf" and gguf.stat().st_size > 0
    merged, tokenizer = runfolder.load_model(runfolder.open_run(str(trained)), dtype="float32", merge=True)
    model, gguf_tokenizer = _read_back(gguf)
    assert type(model).__name__ == type(merged).__name__
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    assert gguf_tokenizer.eos_token == tokenizer.eos_token
    assert gguf_tokenizer(ODD_TEXT)["input_ids"] == tokenizer(ODD_TEXT)["input_ids"]
    clear_steps = 0
    for prompt in _prompts(6):
        ids = _ids(tokenizer, prompt)
        assert torch.equal(ids, _ids(gguf_tokenizer, prompt))
        with torch.no_grad():  # q8_0 rounds each weight to 1/254 of its block's largest
            torch.testing.assert_close(
                model(ids).logits, merged(ids).logits, atol=2e-3 if quant == "f16" else 0.05, rtol=0
            )
        if quant == "f16":
            assert _greedy(model, ids) == _greedy(merged, ids)
        else:
            agree, clear = _teacher_forced_agreement(merged, model, ids, 12, margin=0.05)
            assert agree
            clear_steps += clear
    assert quant == "f16" or clear_steps >= 10  # enough decisive steps that the agreement means something


def test_modelfile_uses_the_gguf_and_the_chat_template(trained, tmp_path):
    import shutil

    run = shutil.copytree(
        trained, tmp_path / trained.name, ignore=shutil.ignore_patterns("export", "checkpoints")
    )
    gguf = export(str(run), "gguf", "f16")
    text = (run / "export" / "Modelfile").read_text()
    assert f"FROM ./{gguf.name}\n" in text
    assert 'TEMPLATE """' in text and "<|im_start|>assistant\n" in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_safetensors_export_is_the_merged_model(trained):
    from transformers import AutoModelForCausalLM

    target = export(str(trained), "safetensors")
    assert target == trained / "export" / "safetensors"
    merged, tokenizer = runfolder.load_model(runfolder.open_run(str(trained)), dtype="float32", merge=True)
    loaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    ids = _ids(tokenizer, _prompts(1)[0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)


def test_turn_format_matches_the_jinja_template(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)

    def with_template(template: str):
        tokenizer.chat_template = template
        return tokenizer

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    plain = ollama.turn_format(with_template(CHATML))
    assert plain is not None and plain.default_system is None
    assert plain.render(chat, True) == tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=False
    )
    smol = (  # SmolLM2's shape: its own system prompt when the conversation brings none
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    found = ollama.turn_format(with_template(smol))
    assert found is not None and found.default_system == "You are helpful."
    text, templated = ollama.modelfile("m.gguf", tokenizer)
    assert templated and 'SYSTEM """You are helpful."""' in text
    # Not fixed text around each message: no Go form, and the Modelfile says so instead.
    numbered = CHATML.replace(
        "'<|im_start|>' + message['role']", "'<|im_start|>' + loop.index|string + message['role']"
    )
    assert ollama.turn_format(with_template(numbered)) is None
    assert (
        ollama.turn_format(with_template(CHATML.replace("message['content']", "message['content'] | upper")))
        is None
    )
    text, templated = ollama.modelfile("m.gguf", tokenizer)
    assert not templated and "No TEMPLATE" in text and "FROM ./m.gguf" in text


def _bare_model_folder(folder: Path, arch: str, tokenizer_from: Path, **kwargs) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.for_model(
        arch,
        vocab_size=400,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **kwargs,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
    return folder


def test_what_cannot_be_exported_is_one_clear_line(tiny_model, tmp_path):
    phi3 = _bare_model_folder(tmp_path / "phi3", "phi3", tiny_model)
    with pytest.raises(UserError, match=r"cannot export a phi3 model \(supported: llama, qwen2\)"):
        export(str(phi3), "gguf", "f16")
    scaled = _bare_model_folder(
        tmp_path / "scaled", "llama", tiny_model, rope_scaling={"rope_type": "linear", "factor": 2.0}
    )
    with pytest.raises(UserError, match="rope scaling"):
        export(str(scaled), "gguf", "f16")
    # A SentencePiece-style vocabulary (Metaspace, no byte-level decoding) has no GPT-2-style export.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer, sp.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    sp.train_from_iterator(
        ["a b c date 2021"] * 10, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"])
    )
    folder = _bare_model_folder(tmp_path / "sp", "llama", tiny_model)
    PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>").save_pretrained(folder)
    with pytest.raises(UserError, match="byte-level BPE"):
        export(str(folder), "gguf", "f16")
    done = run_cli(f"run={phi3}", "format=gguf", module="finetune.export", cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("finetune: error: format=gguf: cannot export a phi3 model")


def test_option_mistakes_are_one_line(tmp_path):
    for args, message in [
        (["run=x", "format=onnx"], "format=onnx: use gguf or safetensors"),
        (["run=x", "quant=q4_k"], "quant=q4_k"),
        (["run=x", "qaunt=f16"], "Did you mean 'quant'"),
        ([f"run={tmp_path / 'missing'}"], "no such folder"),
    ]:
        done = run_cli(*args, module="finetune.export", cwd=tmp_path, timeout=120)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "quant=" in run_cli("--help", module="finetune.export").stdout


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_default_model_gguf_answers_held_out_dates_like_the_merged_model(default_run, tmp_path, quant):  # noqa: F811
    import shutil

    from finetune import data
    from finetune.evaluate import generate

    run = tmp_path / "default"
    shutil.copytree(default_run, run, ignore=shutil.ignore_patterns("merged", "export", "checkpoints"))
    gguf = export(str(run), "gguf", quant)
    merged, tokenizer = runfolder.load_model(runfolder.open_run(str(run)), dtype="float32", merge=True)
    model, gguf_tokenizer = _read_back(gguf)
    cfg = compose([])  # the default job's held-out split
    _, eval_set = data.load(cfg.data, cfg.train.eval_samples, cfg.seed)
    pairs = data.scoring_pairs(eval_set, cfg.train.eval_samples)
    prompts = [p for p, _ in pairs]
    expected = generate(merged, tokenizer, prompts, max_new_tokens=16)
    got = generate(model, gguf_tokenizer, prompts, max_new_tokens=16)
    correct = sum(a == ref for a, (_, ref) in zip(got, pairs))
    print(
        f"{quant}: {gguf.stat().st_size / 2**20:.0f} MiB, {correct}/{len(pairs)} held-out dates right, "
        f"{sum(a == b for a, b in zip(got, expected))}/{len(pairs)} answers equal to the merged model's"
    )
    assert got == expected
    assert correct >= 0.8 * len(pairs), (correct, len(pairs))
    modelfile = (run / "export" / "Modelfile").read_text()
    assert '{{ if eq .Role "system" }}<|im_start|>system\n' in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile
