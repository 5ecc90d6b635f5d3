"""`python -m finetune.export run=<run folder> format=gguf quant=q8_0`: the trained model as one GGUF
file for llama.cpp, Ollama and LM Studio (with an Ollama Modelfile), or `format=safetensors`: the
merged model as a transformers folder. Everything goes into <run>/export/, written aside and renamed.

The GGUF converter is our own (gguf_file, vocab) on the `gguf` package's writer, tensor-name maps
and quantizers: nothing downloads or builds llama.cpp.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from finetune import UserError

FORMATS = ("gguf", "safetensors")
OPTIONS = {
    "run": "<run folder>   the run to export (its adapter is merged first), or <run>/merged, or latest",
    "format": "gguf          gguf (llama.cpp, Ollama, LM Studio) or safetensors (transformers, vLLM, TGI)",
    "quant": "q8_0          gguf weights: f16, q8_0 (8-bit, half of f16's size), bf16 or f32",
}


def _size_mib(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 2**20


def export_gguf(run, quant: str) -> Path:
    from finetune import runfolder
    from finetune.export import gguf_file, ollama

    folder = run.home / "export"
    target = folder / f"{run.name}-{quant}.gguf"
    if target.exists():
        raise UserError(f"{target} already exists. Delete it to export again.")
    merged = run.home / "merged"
    if run.kind == "adapter" and (merged / "config.json").is_file():
        run = runfolder.open_run(str(merged))  # merged once already: the same model, loaded faster
    from transformers import AutoConfig

    # Refused from config.json alone, before minutes of loading a model that cannot be written.
    gguf_file.check_config(AutoConfig.from_pretrained(runfolder.model_source(run)).get_text_config())
    print(f"Exporting {run.weights} to GGUF ({quant}) ...", flush=True)
    # Loaded in float32: f16 and q8_0 are then rounded once, from the most exact weights.
    model, tokenizer = runfolder.load_model(run, dtype="float32", merge=True)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{target.name}.partial"
    try:
        counts = gguf_file.write(model, tokenizer, partial, quant, run.name)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    text, templated = ollama.modelfile(target.name, tokenizer)
    (folder / "Modelfile").write_text(text)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    print(f"Wrote {target} ({_size_mib(target):.1f} MiB; tensors: {kinds}).")
    print(
        f"Wrote {folder / 'Modelfile'} (FROM ./{target.name}"
        + ("; TEMPLATE from the chat template" if templated else "; no TEMPLATE: Ollama uses the GGUF's")
        + f"). Try it: cd {folder} && ollama create {run.name.lower()} -f Modelfile && ollama run {run.name.lower()}"
    )
    return target


def export_safetensors(run) -> Path:
    from finetune import merge, runfolder

    target = run.home / "export" / "safetensors"
    if target.exists():
        raise UserError(f"{target} already exists. Delete it to export again.")
    target.parent.mkdir(parents=True, exist_ok=True)
    merged = run.home / "merged"
    if run.kind == "adapter" and (merged / "config.json").is_file():
        run = runfolder.open_run(str(merged))
    if run.kind == "adapter":
        model, tokenizer = runfolder.load_model(run, dtype="auto", merge=True)
        merge.write_atomically(target, lambda folder: merge.save_merged(model, tokenizer, folder))
    else:  # already one model (merged/, a full fine-tune's model/): copy it, links followed
        merge.write_atomically(
            target, lambda folder: shutil.copytree(run.weights, folder, dirs_exist_ok=True)
        )
    print(f"Wrote {target} ({_size_mib(target):.1f} MiB): AutoModelForCausalLM.from_pretrained('{target}').")
    return target


def export(spec: str, fmt: str = "gguf", quant: str = "q8_0") -> Path:
    from finetune import runfolder
    from finetune.export import gguf_file
    from finetune.schema import did_you_mean

    if fmt not in FORMATS:
        raise UserError(f"format={fmt}: use gguf or safetensors.{did_you_mean(fmt, list(FORMATS))}")
    if fmt == "gguf" and quant not in gguf_file.QUANTS:
        raise UserError(
            f"quant={quant}: GGUF export writes {', '.join(gguf_file.QUANTS)}.{did_you_mean(quant, list(gguf_file.QUANTS))}"
        )
    run = runfolder.open_run(spec)
    return export_gguf(run, quant) if fmt == "gguf" else export_safetensors(run)


def main() -> None:
    from finetune import runfolder

    def command() -> None:
        args = runfolder.parse(
            "finetune.export",
            "Export a run's trained model into <run>/export/: a GGUF file and an Ollama Modelfile, or safetensors.",
            OPTIONS,
            {"run": None, "format": "gguf", "quant": "q8_0"},
        )
        export(args["run"], args["format"], args["quant"])

    runfolder.main(command)
