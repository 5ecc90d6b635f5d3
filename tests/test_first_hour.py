"""A new user's first hour, through the real entry points (subprocesses): every setting is honoured
or named, and every mistake ends in one line and exit 2, with no traceback and nothing loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(result, *needles: str) -> str:
    """The run failed as a user mistake should: exit 2, one `finetune: error:` line, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("finetune: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def warnings_of(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("finetune: warning: ")]


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> Path:
    """config.json folders with the mistakes users make."""
    base = tmp_path_factory.mktemp("configs")
    cases = {
        "broken": '{"model_type": "llama", "hidden_size": 64,\n',
        "no_type": '{"hidden_size": 64}',
        "wrong_type": '{"model_type": "llama", "hidden_size": "big", "num_hidden_layers": 2}',
        "a_list": "[1, 2]",
    }
    for name, text in cases.items():
        (base / name).mkdir()
        (base / name / "config.json").write_text(text)
    (base / "empty").mkdir()
    return base


# ------------------------------------------------------------------------------------------
# Item 2: nothing a user sets is silently ignored


@pytest.mark.parametrize(
    "args,needles",
    [
        (["model.name_or_path=/no/such/folder"], ["model.name_or_path=/no/such/folder: no such folder"]),
        (["model.name_or_path=./relative/missing"], ["no such folder"]),
        (["model.name_or_path=someone/not-cached-anywhere"], ["someone/not-cached-anywhere", "cannot read"]),
        (["data.path=my.jsonl"], ["data.path=my.jsonl", "data=file"]),
        (["data.eval_path=held.jsonl"], ["data.eval_path=held.jsonl", "data=file"]),
        (["+lora.rank=8"], ["unknown key 'lora.rank'", "Did you mean 'lora.r'?"]),
        (["++optim.learning_rate=1e-4"], ["unknown key 'optim.learning_rate'", "Did you mean 'optim.lr'?"]),
        (["+newkey=1"], ["unknown key 'newkey'"]),
        (["++foo.bar=1"], ["unknown key 'foo'"]),
        (["~model"], ["~model removes the model group"]),
        (["~hw"], ["~hw removes the hw group"]),
        (["~lora.r"], ["~lora.r removes a key", "lora.r=<value>"]),
    ],
)
def test_settings_are_honoured_or_refused(args, needles):
    one_line_error(run_cli(*args, module="finetune.plan"), *needles)


def test_name_or_path_folder_without_config(configs):
    one_line_error(
        run_cli(f"model.name_or_path={configs / 'empty'}", module="finetune.plan"), "holds no config.json"
    )


def test_name_or_path_plans_that_model_not_the_catalog_one(tiny_model):
    result = run_cli(f"model.name_or_path={tiny_model}", "format=json", module="finetune.plan")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["model"]["name_or_path"] == str(tiny_model)
    assert out["model"]["params"] < 1_000_000  # the 2-layer test model, not SmolLM2's 135M
    assert out["model"]["name"] == tiny_model.name  # run folders are named after it


@pytest.mark.parametrize(
    "args,warning",
    [
        (["lora=none", "lora.r=64"], "lora.r=64 has no effect: lora=none"),
        (["optim=adamw", "optim.galore_rank=64"], "optim.galore_rank=64 has no effect"),
        (["quant=8bit", "quant.bnb_4bit_quant_type=fp4"], "quant.bnb_4bit_quant_type=fp4 has no effect"),
        (["quant=none", "quant.double_quant=false"], "quant.double_quant=false has no effect"),
        (["data.num_train=50", "data=file", "data.path=x.jsonl"], "data.num_train=50 has no effect"),
        (["data.format=alpaca"], "data.format=alpaca has no effect"),
        (["train.max_steps=10", "train.epochs=3"], "train.epochs=3 has no effect"),
        (["hw=cpu", "hw.gpu_memory_gb=24"], "hw.gpu_memory_gb=24 has no effect"),
        (["hw=t4", "hw.bf16=true", "lora=r16"], "hw.bf16=true is ignored: t4"),
    ],
)
def test_unused_settings_warn(args, warning):
    result = run_cli(*args, "format=json", module="finetune.plan")
    assert result.returncode == 0, result.stderr
    assert any(warning in line for line in warnings_of(result)), result.stderr
    json.loads(result.stdout)  # warnings go to stderr: the JSON stays parseable


def test_plan_of_a_9b_on_a_t4_fits_on_auto_settings():
    result = run_cli("model=gemma-2-9b", "hw=t4", "format=json", module="finetune.plan")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["fits"], out["estimate"]
    assert out["settings"]["optim"]["lr"] == 2e-4 and out["settings"]["train"]["max_steps"] == -1
    assert out["settings"]["batch"]["effective"] == 16


def test_batch_preset_is_honoured():
    result = run_cli("model=llama-3-8b", "hw=a100-80gb", "batch=1x4", "format=json", module="finetune.plan")
    assert result.returncode == 0, result.stderr
    batch = json.loads(result.stdout)["settings"]["batch"]
    assert (batch["size"], batch["grad_accum"]) == (1, 4)


def test_cpu_budget_is_the_same_every_time():
    import psutil

    from finetune import autofit

    budgets = set()
    for _ in range(2):
        result = run_cli("hw=cpu", "format=json", module="finetune.plan")
        budgets.add(json.loads(result.stdout)["budget_gib"])
    total = psutil.virtual_memory().total / 2**30
    expected = max(total - autofit.CPU_RESERVE_GIB, total / 2) * (1 - autofit.SAFETY_MARGIN)
    assert budgets == {round(expected, 3)}


# ------------------------------------------------------------------------------------------
# Item 3: every mistake, one line


@pytest.mark.parametrize(
    "args,needles",
    [
        (["lora=16"], ["lora=16: a lora option is a name", "Did you mean 'r16'?"]),
        (["quant=4"], ["quant=4: a quant option is a name", "4bit"]),
        (["batch=8"], ["batch=8: a batch option is a name"]),
        (["model=qwen"], ["model=qwen is not a known option"]),
        (["optim.lr_scheduler=cosin"], ["optim.lr_scheduler='cosin'", "Did you mean 'cosine'?"]),
        (["optim.lr_scheduler=reduce_lr_on_plateau"], ["optim.lr_scheduler='reduce_lr_on_plateau'"]),
        (["seed=-1"], ["seed=-1 must be between 0 and"]),
        (["seed=99999999999"], ["seed=99999999999"]),
        (["hw=t4", "model.attn_implementation=flash_attention_2"], ["flash_attention_2", "hw=t4"]),
        (["hw=cpu", "model.attn_implementation=flash_attention_2"], ["flash_attention_2"]),
        (["hw.gpu_memory_gb=-3"], ["hw.gpu_memory_gb=-3.0 must not be negative"]),
        (["hw.tflops=-1"], ["hw.tflops=-1.0 must not be negative"]),
        (["hw.num_gpus=-1"], ["hw.num_gpus=-1 must not be negative"]),
        (["optim.lr=fast"], ["optim.lr=fast must be a positive number"]),
        (["lora.target_modules=[]"], ["lora.target_modules is empty"]),
    ],
)
def test_bad_values_get_one_line(args, needles):
    one_line_error(run_cli(*args, "dry_run=true"), *needles)


@pytest.mark.parametrize(
    "case,needles",
    [
        ("broken", ["config.json:2: not valid JSON"]),
        ("no_type", ['has no "model_type"']),
        ("wrong_type", ["\"hidden_size\" is 'big'", "whole number"]),
        ("a_list", ["config.json must hold an object"]),
    ],
)
def test_bad_config_json_gets_one_line(configs, case, needles):
    one_line_error(run_cli(f"model.name_or_path={configs / case}", module="finetune.plan"), *needles)


def test_bad_recipes_get_one_line(tmp_path):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "tabs.yaml").write_text("defaults:\n  - finetune\n  - _self_\noptim:\n\tlr: 1e-4\n")
    (recipes / "syntax.yaml").write_text("defaults:\n  - finetune\n  - _self_\noptim: {lr: [1e-4\n")
    (recipes / "bare.yaml").write_text("optim:\n  lr: 1.0e-4\n")
    one_line_error(run_cli("-cd", str(recipes), "-cn", "tabs"), "tabs.yaml:5: not valid YAML", "a tab")
    one_line_error(run_cli("-cd", str(recipes), "-cn", "syntax"), "syntax.yaml:5: not valid YAML")
    one_line_error(run_cli("-cd", str(recipes), "-cn", "bare"), "does not build on finetune's defaults")
    one_line_error(run_cli("-cd", str(recipes), "-cn", "tab"), "no recipe tab.yaml", "Did you mean 'tabs'?")
    one_line_error(run_cli("-cd", str(tmp_path / "nope"), "-cn", "x"), "-cd", "no such folder")


def test_output_dir_problems_stop_before_loading(tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("")
    one_line_error(run_cli(f"output_dir={afile}"), f"output_dir={afile} is a file")
    one_line_error(
        run_cli("output_dir=/proc/finetune-runs"), "output_dir=/proc/finetune-runs is not writable"
    )


# ------------------------------------------------------------------------------------------
# Item 4: the commands people look at


@pytest.mark.parametrize(
    "module,own",
    [("finetune", []), ("finetune.plan", ["format=", "chart="]), ("finetune.data", ["example=", "format="])],
)
def test_help_lists_own_options_and_groups(module, own):
    result = run_cli("--help", module=module)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m {module} ")
    assert "Hydra" not in result.stdout.splitlines()[0] and "== Configuration groups ==" not in result.stdout
    for option in own:
        assert f"  {option}" in result.stdout, option
    for group in ("model", "quant", "lora", "batch", "optim", "hw", "data"):
        assert f"\n  {group} " in result.stdout, group
    assert "  lora   auto, none, " in result.stdout  # the default first


def test_version():
    from finetune import __version__

    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"finetune {__version__}"


def test_sweep_heads_each_job_writes_nothing_here_and_json_lines_parse(tmp_path):
    result = run_cli("-m", "lora=r8,r16", "format=json", module="finetune.plan", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ranks = [json.loads(line)["settings"]["lora"]["r"] for line in result.stdout.splitlines() if line.strip()]
    assert ranks == [8, 16]
    assert "=== job 0: lora=r8" in result.stderr and "=== job 1: lora=r16" in result.stderr
    assert list(tmp_path.iterdir()) == []
    table = run_cli("-m", "lora=r8,r16", module="finetune.plan", cwd=tmp_path)
    assert table.stdout.count("=== job ") == 2 and list(tmp_path.iterdir()) == []


def test_name_or_path_folder_trains_that_model_not_the_default(tiny_model, tmp_path):
    """The default model group's GGUF copy of SmolLM2 must not win over the user's folder."""
    import re

    import yaml

    result = run_cli(
        f"model.name_or_path={tiny_model}",
        f"output_dir={tmp_path}",
        "train.max_steps=2",
        "train.eval_samples=2",
        "data.num_train=16",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "SmolLM2" not in result.stdout + result.stderr
    (run_dir,) = list(tmp_path.iterdir())
    assert run_dir.name.startswith(f"{tiny_model.name}-")
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["name_or_path"] == str(tiny_model)
    loss = re.search(r"final loss (\S+),", result.stdout).group(1)
    assert len(loss.split(".")[-1]) <= 4, loss  # rounded for people
    assert "DeprecationWarning" not in result.stderr and "FutureWarning" not in result.stderr


@pytest.mark.parametrize(
    "args,needles",
    [
        (["lora.target_modules=[q_prj]"], ["q_prj names no module", "Did you mean 'q_proj'?", "gate_proj"]),
        (["model=phi-3-mini", "lora.target_modules=[q_proj,v_proj]"], ["names no module", "qkv_proj"]),
    ],
)
def test_lora_targets_name_real_modules(args, needles):
    one_line_error(run_cli(*args, module="finetune.plan"), *needles)


def test_all_linear_as_a_plain_string():
    result = run_cli("lora.target_modules=all-linear", "format=json", module="finetune.plan")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["settings"]["lora"]["target_modules"] == "all-linear"


def test_unknown_and_encoder_decoder_model_types(tmp_path):
    for name, config in (
        ("weird", {"model_type": "frobnicator"}),
        ("t5", {"model_type": "t5", "d_model": 64}),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    one_line_error(run_cli(f"model.name_or_path={tmp_path / 'weird'}", module="finetune.plan"), "frobnicator")
    one_line_error(
        run_cli(f"model.name_or_path={tmp_path / 't5'}", module="finetune.plan"), "'t5' is an encoder-decoder"
    )
