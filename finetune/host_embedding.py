"""model.offload_embedding=true: the frozen input embedding kept in host RAM.

A LoRA run never trains the input embedding, and a forward reads only the rows of its token ids: a
table of vocab x hidden (1.1 GiB for gpt-oss-20b, 1.0 GiB for Llama-3-8B) can stay in host memory
while each step sends tokens x hidden to the GPU (6 MB for 1,024 gpt-oss tokens). Unsloth offers the
same (``offload_embedding``). The table is held outside the module tree, as a plain attribute rather
than a submodule, parameter or buffer, so moving the model (``.to``, accelerate, FSDP), casting it
or saving its state leaves it where it is. finetune.autofit allows this only where the embedding is
frozen and not tied to the LM head (memory.tensors.embedding_stays).
"""

from __future__ import annotations

import torch
from torch import nn


class HostEmbedding(nn.Module):
    def __init__(self, embedding: nn.Module):
        super().__init__()
        embedding.requires_grad_(False)
        self.__dict__["table"] = embedding.to("cpu")  # a plain attribute: invisible to .to() and state_dict

    @property
    def weight(self) -> torch.Tensor:
        """The table, for code that reads the embedding matrix (its vocabulary size, its dtype)."""
        return self.table.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            rows = self.table(input_ids.to("cpu"))  # the module's own lookup: scaled embeddings stay scaled
        return rows.to(input_ids.device)

    def extra_repr(self) -> str:
        return f"in host memory: {tuple(self.weight.shape)}, {self.weight.dtype}"
