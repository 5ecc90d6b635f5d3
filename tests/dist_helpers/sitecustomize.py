"""Loaded by the torchrun test's processes (PYTHONPATH): records which examples each rank trains on."""

import json
import os

_trace = os.environ.get("FINETUNE_TEST_TRACE")
if _trace:
    import transformers

    _step = transformers.Trainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        rows = [[int(t) for t in row if int(t) >= 0] for row in inputs["input_ids"].tolist()]
        with open(os.path.join(_trace, f"rank{os.environ.get('RANK', '0')}.jsonl"), "a") as f:
            f.write(json.dumps(rows) + "\n")
        return _step(self, model, inputs, *args, **kwargs)

    transformers.Trainer.training_step = training_step
