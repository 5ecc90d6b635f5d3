"""torchrun --nproc_per_node 2 tests/dist_helpers/signal_agreement.py <out.json> <run folder>:
a signal that reaches rank 1 alone, as StopOnSignal sees it at the step ends of two gloo processes.

1. SIGTERM to rank 1 during step 2: both ranks save and stop at step 2 with signum 15, rank 0 alone
   says so and prints the resume line, both exit 143.
2. SIGINT to rank 1 after the last step's end: both ranks stop at once (Interrupted) at the end.
3. train.save_steps=auto, 10 minutes up by rank 1's clock only: both ranks save.
"""

import contextlib
import io
import json
import os
import signal
import sys
import types
from pathlib import Path

import torch.distributed as dist
from transformers import TrainerControl, TrainerState

from finetune import lifecycle

dist.init_process_group("gloo")
rank = dist.get_rank()
cfg = types.SimpleNamespace(train=types.SimpleNamespace(save_steps=1, eval_steps="auto"))
record = {"rank": rank, "steps": []}
err = io.StringIO()
with contextlib.redirect_stderr(err):
    with lifecycle.Signals() as signals:
        signals.run_dir = Path(sys.argv[2])
        stop = lifecycle.callbacks(signals, cfg, signals.run_dir, has_eval=False)[0]
        state = TrainerState(max_steps=4)
        stop.on_train_begin(None, state, TrainerControl())
        for step in (1, 2):
            if step == 2 and rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # this process only
            state.global_step, control = step, TrainerControl()
            stop.on_step_end(None, state, control)
            record["steps"].append([control.should_save, control.should_training_stop])
            if control.should_training_stop:
                break
        stop.on_train_end(None, state, TrainerControl())
        record["signum"] = signals.signum
        try:
            signals.stopped(state)
        except SystemExit as stopped:
            record["exit"] = stopped.code

    with lifecycle.Signals() as late:
        stop = lifecycle.callbacks(late, cfg, Path(sys.argv[2]), has_eval=False)[0]
        state = TrainerState(max_steps=4, global_step=4)
        stop.on_train_begin(None, state, TrainerControl())
        stop.on_step_end(None, state, TrainerControl())  # the last step, no signal yet
        if rank == 1:
            os.kill(os.getpid(), signal.SIGINT)
        try:
            stop.on_train_end(None, state, TrainerControl())
            record["late"] = None
        except lifecycle.Interrupted as interrupted:
            record["late"] = interrupted.signum
record["stderr"] = err.getvalue()

timed = types.SimpleNamespace(train=types.SimpleNamespace(save_steps="auto", eval_steps="auto"))
schedule = lifecycle.callbacks(lifecycle.Signals(), timed, Path(sys.argv[2]), has_eval=False)[1]
schedule.on_train_begin(None, TrainerState(), TrainerControl())
if rank == 1:
    schedule.last_save -= lifecycle.SAVE_EVERY_SECONDS
control = TrainerControl()
schedule.on_step_end(None, TrainerState(global_step=1), control)
record["timed_save"] = control.should_save

out = [None] * dist.get_world_size()
dist.all_gather_object(out, record)
if rank == 0:
    Path(sys.argv[1]).write_text(json.dumps(out))
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # as fully_shard_check.py: gloo's threads can abort interpreter teardown
