"""finetune.chat: one answer with prompt=, a multi-turn session with /reset and /quit, clean exits."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose, run_cli, tiny_overrides

from finetune import pipeline, runfolder

PROMPT = "Convert to ISO date: March 5, 2021"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model) -> Path:
    out = tmp_path_factory.mktemp("chat-runs")
    return pipeline.run(compose(tiny_overrides(tiny_model, out, "run_name=chat"))).run_dir


def _greedy_reply(run: Path, prompt: str, max_new_tokens: int) -> str:
    model, tokenizer = runfolder.load_model(runfolder.open_run(str(run)), dtype="float32", merge=False)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_one_shot_prompt_prints_the_greedy_answer(lora_run, tmp_path):
    done = run_cli(
        f"run={lora_run}",
        f"prompt={PROMPT}",
        "max_new_tokens=8",
        module="finetune.chat",
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    # stdout is the answer alone (loading notes go to stderr), the adapter's over its base
    assert done.stdout.strip() == _greedy_reply(lora_run, PROMPT, 8)


def test_merged_folder_chats_too(lora_run, tmp_path):
    from finetune.merge import merge

    run = tmp_path / "run"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("merged", "export", "checkpoints"))
    merge(str(run))
    done = run_cli(
        f"run={run / 'merged'}",
        f"prompt={PROMPT}",
        "max_new_tokens=8",
        module="finetune.chat",
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == _greedy_reply(lora_run, PROMPT, 8)


def test_interactive_session_resets_and_quits(lora_run, tmp_path):
    import os
    import subprocess
    import sys

    session = "hello\n/reset\n/what\nagain\n/quit\nnever read\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    args = [
        sys.executable,
        "-m",
        "finetune.chat",
        f"run={lora_run}",
        "max_new_tokens=4",
        "system=Answer briefly.",
    ]
    done = subprocess.run(
        args, input=session, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("model> ") == 2  # two messages answered, then /quit
    assert "(new conversation)" in done.stderr and "unknown command /what" in done.stderr
    # Ctrl-D (end of input) leaves cleanly too
    done = subprocess.run(
        args, input="hi\n", capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr


def test_mistakes_are_one_line(lora_run, tmp_path):
    for args, message in [
        ([f"run={tmp_path / 'nope'}", "prompt=hi"], "no such folder"),
        ([f"run={lora_run}", "max_new_tokens=lots"], "max_new_tokens=lots: give a number"),
        ([f"run={lora_run}", "temprature=0.7"], "Did you mean 'temperature'"),
    ]:
        done = run_cli(*args, module="finetune.chat", cwd=tmp_path, timeout=120)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.slow
def test_default_model_answers_a_held_out_date(default_run, tmp_path):  # noqa: F811
    done = run_cli(
        f"run={default_run}",
        "prompt=Convert to ISO date: 14 April 2006",
        module="finetune.chat",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "2006-04-14"
