"""Loaded by the torchrun tests' processes (PYTHONPATH); acts in the workers only, not in torchrun's own.

FINETUNE_TEST_TRACE=<folder>: which examples each rank trains on (rank<r>.jsonl, a line a step) and
    which files each rank loads its RNG state from on resume (rng<r>.json).
FINETUNE_TEST_SLOW_STEP=<seconds>: a sleep after every optimizer step (it changes no number), so a
    signal reliably lands mid-run.
FINETUNE_TEST_EXITS=<folder>: each rank's exit code (exit<r>), which torchrun does not report for
    workers it was told to stop.
"""

import json
import os
import time

_worker = "LOCAL_RANK" in os.environ
_rank = os.environ.get("RANK", "0")
_trace = os.environ.get("FINETUNE_TEST_TRACE") if _worker else None
_slow = float(os.environ.get("FINETUNE_TEST_SLOW_STEP") or 0) if _worker else 0.0
_exits = os.environ.get("FINETUNE_TEST_EXITS") if _worker else None

if _trace:
    import transformers

    _step = transformers.Trainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        rows = [[int(t) for t in row if int(t) >= 0] for row in inputs["input_ids"].tolist()]
        with open(os.path.join(_trace, f"rank{_rank}.jsonl"), "a") as f:
            f.write(json.dumps(rows) + "\n")
        return _step(self, model, inputs, *args, **kwargs)

    transformers.Trainer.training_step = training_step

    _load_rng = transformers.Trainer._load_rng_state

    def _load_rng_state(self, checkpoint):
        import torch

        opened, load = [], torch.load

        def spy(f, *args, **kwargs):
            opened.append(str(f))
            return load(f, *args, **kwargs)

        torch.load = spy
        try:
            return _load_rng(self, checkpoint)
        finally:
            torch.load = load
            if checkpoint is not None:
                with open(os.path.join(_trace, f"rng{_rank}.json"), "w") as f:
                    json.dump({"checkpoint": str(checkpoint), "loaded": opened}, f)

    transformers.Trainer._load_rng_state = _load_rng_state

if _slow:
    from transformers import trainer_callback

    _flow = trainer_callback.DefaultFlowCallback.on_step_end

    def slow_step(self, *args, **kwargs):
        time.sleep(_slow)
        return _flow(self, *args, **kwargs)

    trainer_callback.DefaultFlowCallback.on_step_end = slow_step

if _exits:
    from finetune import errors

    _cli = errors.run_cli  # finetune/__main__.py imports it by name after this ran

    def run_cli(*args, **kwargs):
        code = "exception"
        try:
            _cli(*args, **kwargs)
            code = 0
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else int(err.code is not None)
            raise
        finally:
            with open(os.path.join(_exits, f"exit{_rank}"), "w") as f:
                f.write(str(code))

    errors.run_cli = run_cli
