"""Composition and validation: every shipped option composes; every class of bad input gets one clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose, run_cli

from finetune import UserError, config_dir, pipeline, schema

GROUPS = ["model", "quant", "lora", "batch", "optim", "hw", "data"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def test_contract_groups_and_options_exist():
    for group in GROUPS:
        assert options(group), group
    assert {"none", "8bit", "4bit"} <= set(options("quant"))
    assert {"none", "r8", "r16", "r32", "r64"} <= set(options("lora"))
    assert set(schema.OPTIMIZERS) <= set(options("optim"))
    assert {
        "cpu",
        "t4",
        "v100-16gb",
        "v100-32gb",
        "rtx4090",
        "a6000",
        "a100-40gb",
        "a100-80gb",
        "h100",
    } <= set(options("hw"))
    seed_models = {
        "tiny",
        "phi-3-mini",
        "llama-3-8b",
        "qwen2.5-7b",
        "qwen2-vl-7b",
        "gpt-oss-20b",
        "llama-3-70b",
    }
    assert seed_models <= set(options("model"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option):
    # The combinations an option needs to be valid: GaLore trains full weights, quantization needs adapters.
    needs = {
        ("optim", "galore"): ["lora=none"],
        ("optim", "galore_8bit"): ["lora=none"],
        ("lora", "none"): [],
    }
    extra = needs.get((group, option), [])
    if group == "data" and option == "file":
        extra = ["data.path=train.jsonl"]
    cfg = compose([f"{group}={option}", *extra])
    schema.validate(cfg)
    assert getattr(cfg, group) is not None


def test_every_shipped_file_opens_with_its_command():
    for path in config_dir().rglob("*.yaml"):
        head = [line for line in path.read_text().splitlines()[:3] if "python -m finetune" in line]
        assert head, f"{path} must open with the command that uses it"


def test_model_configs_carry_hub_id_and_architecture():
    for name in options("model"):
        cfg = compose([f"model={name}"])
        assert "/" in cfg.model.name_or_path, name
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "model_type"):
            assert key in cfg.model.arch, (name, key)


def test_tuned_settings_belong_to_the_default_model_and_data():
    cfg = compose([])  # the embedded default: tiny on demo gets its tuned schedule
    assert cfg.train.max_steps == 30 and cfg.optim.lr == 2e-3 and cfg.batch.effective == 8
    assert cfg.batch.size == "auto" and cfg.train.gradient_checkpointing == "auto"
    cfg = compose(["train.max_steps=7", "optim.lr=1e-4"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 1e-4
    cfg = compose(["batch=1x4"])  # a batch preset wins over the tuned effective batch
    assert (cfg.batch.size, cfg.batch.grad_accum, cfg.batch.effective) == (1, 4, None)
    for other in (["model=gemma-2-9b"], ["data=file", "data.path=x.jsonl"]):
        cfg = compose(other)  # any other model or data: every knob stays auto
        assert cfg.optim.lr == "auto" and cfg.train.max_steps == -1 and cfg.batch.effective == 16
        assert cfg.batch.size == cfg.batch.grad_accum == cfg.train.gradient_checkpointing == "auto"


def test_learning_rate_auto_suits_the_method():
    from finetune import autofit

    for overrides, lr in ((["lora=r16"], schema.LORA_LR), (["lora=none"], schema.FULL_LR)):
        cfg = compose(["model=qwen2.5-0.5b", "hw=a100-80gb", *overrides])
        schema.validate(cfg)
        assert autofit.resolve(cfg).cfg.optim.lr == lr


def test_effective_batch_derives_accumulation():
    from finetune import autofit

    cfg = compose(
        ["data=file", "data.path=x.jsonl", "hw=cpu", "batch=auto", "batch.size=2", "batch.effective=16"]
    )
    schema.validate(cfg)
    assert autofit.resolve(cfg).cfg.batch.grad_accum == 8


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.lr=-1"], "optim.lr=-1 must be a positive number"),
        (["lora.r=0"], "lora.r=0 must be a whole number of at least 1"),
        (["batch.size=0"], "batch.size=0 must be a whole number of at least 1"),
        (["quant=4bit", "lora=none"], "quantized weights cannot be trained"),
        (["optim=galore"], "use it with lora=none"),
        (["batch=8x1", "batch.effective=16"], "disagrees with batch.size x batch.grad_accum"),
        (
            ["data=file", "data.path=x.jsonl", "batch.grad_accum=4", "batch.effective=10"],
            "batch.effective=10 must be a positive multiple of batch.grad_accum x GPUs = 4",
        ),
        (
            ["data=file", "data.path=x.jsonl", "hw=h100", "hw.num_gpus=4", "batch.effective=6"],
            "batch.effective=6 must be a positive multiple of GPUs = 4",
        ),
        (["data=file", "data.path=x.jsonl", "batch.effective=null"], "set batch.effective"),
        (["batch.size=3", "batch.effective=16"], "batch.effective=16 must be a positive multiple"),
        (["quant.load_in=4bits"], "Did you mean '4bit'?"),
        (["optim.name=adam"], "Did you mean 'adamw'?"),
        (["data=file"], "data=file needs data.path"),
    ],
)
def test_validation_messages(overrides, message):
    with pytest.raises(UserError, match=None) as err:
        schema.validate(compose(overrides))
    assert message in str(err.value)


@pytest.mark.parametrize(
    "args,message",
    [
        (["optim.learning_rate=1e-4"], "unknown key 'optim.learning_rate'. Did you mean 'optim.lr'?"),
        (["batch.batch_size=4"], "Did you mean 'batch.size'?"),
        (["model=qwen2.5-7"], "model=qwen2.5-7 is not a known option. Did you mean 'qwen2.5-7b'?"),
        (["lora=r12"], "lora=r12 is not a known option"),
        (["optim.lr=fast"], "optim.lr=fast must be a positive number"),
        (["batch.size=1.5"], "batch.size=1.5 must be a whole number"),
        (["train.gradient_checkpointing=maybe"], "must be true, false or auto"),
        (["optim.lr=-0.1"], "optim.lr=-0.1 must be a positive number"),
        (["lora.r=0"], "lora.r=0 must be a whole number of at least 1"),
        (["batch.size=0"], "batch.size=0 must be a whole number of at least 1"),
        (["quant=4bit", "lora=none"], "quantized weights cannot be trained"),
        (["lora.r=[1"], "could not parse the command line"),
    ],
)
def test_bad_command_line_gives_one_clear_message(args, message):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.startswith("finetune: error:")


def test_bad_recipe_names_key_and_file(tmp_path: Path):
    (tmp_path / "my-recipe.yaml").write_text(
        "defaults:\n  - finetune\n  - override model: llama-3-8b\n  - _self_\noptim:\n  learning_rate: 1e-4\n"
    )
    result = run_cli("-cd", str(tmp_path), "-cn", "my-recipe")
    assert result.returncode == 2
    assert "unknown key 'optim.learning_rate' in my-recipe.yaml. Did you mean 'optim.lr'?" in result.stderr
    assert "Traceback" not in result.stderr


def test_recipe_in_any_folder_extends_packaged_defaults(tmp_path: Path):
    (tmp_path / "qlora.yaml").write_text(
        "# python -m finetune -cd <this folder> -cn qlora\n"
        "defaults:\n  - finetune\n  - override model: llama-3-8b\n  - override quant: 4bit\n  - _self_\n"
        "optim:\n  lr: 1.0e-4\n"
    )
    cfg = compose([], config_name="qlora", folder=tmp_path)
    schema.validate(cfg)
    assert cfg.model.name == "llama-3-8b" and cfg.quant.load_in == "4bit" and cfg.optim.lr == 1e-4
    result = run_cli("-cd", str(tmp_path), "-cn", "qlora", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "name: llama-3-8b" in result.stdout


def test_every_recipe_composes_validates_and_dry_runs():
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    names = sorted(p.stem for p in recipes.glob("*.yaml"))
    assert names
    for name in names:
        assert "python -m finetune -cd recipes -cn " + name in (recipes / f"{name}.yaml").read_text()
        own_data = "override data: file" in (recipes / f"{name}.yaml").read_text()
        extra = ["data.path=chats.jsonl"] if own_data else []
        cfg = compose([*extra, "dry_run=true"], config_name=name, folder=recipes)
        schema.validate(cfg)
        assert pipeline.run(cfg) is None  # a dry run: plans, prints, loads nothing
    result = run_cli("-cd", str(recipes), "-cn", "chat-8b-rtx4090", "data.path=chats.jsonl", "dry_run=true")
    assert result.returncode == 0, result.stderr
    assert "finetune plan" in result.stdout
