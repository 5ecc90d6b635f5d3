"""`python -m finetune.merge run=<run folder> [dtype=auto]`: the LoRA adapter merged into its base,
written to <run>/merged/ as one model that transformers (vLLM, TGI, ...) loads with no peft."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from finetune import UserError

OPTIONS = {
    "run": "<run folder>   the run to merge (or latest: the newest folder under runs/)",
    "dtype": "auto          the merged weights' dtype: auto (the base model's own), bfloat16, float16, float32",
}


def write_atomically(target: Path, write) -> None:
    """`write(folder)` into a hidden folder next to `target`, then rename: never a half-written target."""
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        write(partial)
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def save_merged(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # with its chat template


def merge(spec: str, dtype: str = "auto") -> Path:
    from finetune import runfolder

    run = runfolder.open_run(spec)
    if run.kind == "model":
        raise UserError(
            f"run={spec} is already a merged model folder; give its run folder to merge an adapter."
        )
    target = run.folder / "merged"
    if target.exists() or target.is_symlink():
        raise UserError(f"{target} already exists: it is the merged model. Delete it to merge again.")
    if run.kind == "full":
        # A full fine-tune has no adapter: model/ already is the merged model. A link keeps one copy.
        target.symlink_to("model", target_is_directory=True)
        print(
            f"{run.folder} is a full fine-tune: model/ already holds the merged weights; {target} links to it."
        )
        return target
    old = runfolder.point_adapter_at_user_base(run.weights, run.cfg)
    if old:
        print(
            f"adapter_config.json now names the base {runfolder.user_base(run.cfg)} (it named the cache copy {old})."
        )
    quant = run.cfg.quant.load_in
    if quant != "none":
        print(
            f"This run trained a {quant} (QLoRA) adapter: merging it into the un-quantized base, "
            "since quantized weights cannot take the adapter exactly."
        )
    print(f"Merging {run.weights} into {runfolder.user_base(run.cfg)} ...", flush=True)
    model, tokenizer = runfolder.load_model(run, dtype=dtype, merge=True)
    write_atomically(target, lambda folder: save_merged(model, tokenizer, folder))
    size = sum(f.stat().st_size for f in target.iterdir() if f.is_file()) / 2**20
    print(
        f"Merged model ({model.dtype}, {size:.1f} MiB) written to {target}: load it with "
        f"AutoModelForCausalLM.from_pretrained('{target}')."
    )
    return target


def main() -> None:
    from finetune import runfolder

    def command() -> None:
        args = runfolder.parse(
            "finetune.merge",
            "Merge a run's LoRA adapter into its base model: <run>/merged/, loadable by transformers alone.",
            OPTIONS,
            {"run": None, "dtype": "auto"},
        )
        if args["dtype"] not in runfolder.DTYPES:
            raise UserError(f"dtype={args['dtype']}: use one of {', '.join(runfolder.DTYPES)}.")
        merge(args["run"], args["dtype"])

    runfolder.main(command)


if __name__ == "__main__":
    main()
