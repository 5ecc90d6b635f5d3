"""torchrun --nproc_per_node 2 tests/dist_helpers/fully_shard_check.py <out.json> [reshard]:
shard the tiny model the way our dist=fsdp settings ask accelerate to (its own unit selection, our
mixed precision), run one step with torch's fully_shard on CPU/gloo and record what happened."""

import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from omegaconf import OmegaConf
from torch.distributed.fsdp import FSDPModule, fully_shard
from transformers import AutoConfig, AutoModelForCausalLM

from finetune import launch

dist.init_process_group("gloo")
cfg = OmegaConf.create(
    {
        "dist": {
            "strategy": "fsdp",
            "reshard_after_forward": sys.argv[2] == "true",
            "cpu_offload": False,
            "activation_checkpointing": "auto",
        },
        "train": {"gradient_checkpointing": True},
    }
)
torch.manual_seed(0)
config = AutoConfig.for_model(
    "qwen2",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
model = AutoModelForCausalLM.from_config(config)
layer_classes = list(model._no_split_modules)
ours = launch.fsdp_settings(cfg, layer_classes)
plugin = FullyShardedDataParallelPlugin(
    fsdp_version=ours["fsdp_version"],
    auto_wrap_policy=ours["fsdp_auto_wrap_policy"].lower(),
    transformer_cls_names_to_wrap=ours["fsdp_transformer_layer_cls_to_wrap"].split(","),
    reshard_after_forward=ours["fsdp_reshard_after_forward"],
    mixed_precision_policy=launch.fsdp_mixed_precision("bf16"),
)
policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
kwargs = {"reshard_after_forward": plugin.reshard_after_forward, "mp_policy": plugin.mixed_precision_policy}
units = [name for name, m in model.named_modules() if m is not model and policy(m)]
for name in units:
    fully_shard(model.get_submodule(name), **kwargs)
fully_shard(model, mp_policy=plugin.mixed_precision_policy)
seen = []
model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.append(str(args[0].dtype)))
ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
loss = model(input_ids=ids, labels=ids).loss
loss.backward()
layer = model.model.layers[0]
p = layer.mlp.down_proj.weight
result = {
    "rank": dist.get_rank(),
    "units": units,
    "layers_are_units": all(isinstance(m, FSDPModule) for m in model.model.layers),
    "local_rows": p.to_local().shape[0],
    "full_rows": p.shape[0],
    "param_dtype": str(p.dtype),
    "compute_dtype": seen[0],
    "grad_dtype": str(p.grad.dtype),
    "loss": loss.item(),
}
out = [None] * dist.get_world_size()
dist.all_gather_object(out, result)
if dist.get_rank() == 0:
    json.dump(out, open(sys.argv[1], "w"))
dist.destroy_process_group()
sys.stdout.flush()
# gloo's worker threads can abort interpreter teardown ("terminate called without an active
# exception"); the result is written, so leave without it.
os._exit(0)
