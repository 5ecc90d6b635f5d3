"""`python -m finetune.chat run=<run folder> [prompt="..."] [system="..."]`: talk to the trained model.

The adapter is loaded over its base (or a merged / any model folder: run=<run>/merged), answers
stream as they are generated, and the conversation goes through the model's own chat template.
With `prompt=` it answers once on stdout and exits, for scripts; otherwise it is a multi-turn chat.
"""

from __future__ import annotations

import sys
from typing import Any

from finetune import UserError

OPTIONS = {
    "run": "<run folder>   the run to chat with, or <run>/merged (any model folder works), or latest",
    "prompt": "<text>        answer this one message on stdout and exit (no chat)",
    "system": "<text>        a system prompt for the conversation",
    "max_new_tokens": "256     the longest answer, in tokens",
    "temperature": "0          0: greedy (the same answer every time); above 0: sampled",
    "dtype": "auto          auto (float32 on CPU, the model's own on a GPU), bfloat16, float16, float32",
}
HELP = "/reset starts a new conversation, /quit (or Ctrl-D, Ctrl-C) leaves."


class Chat:
    def __init__(
        self, model: Any, tokenizer: Any, system: str | None, max_new_tokens: int, temperature: float
    ):
        from finetune.export.ollama import turn_format

        self.model, self.tokenizer = model, tokenizer
        self.system, self.max_new_tokens, self.temperature = system, max_new_tokens, temperature
        self.messages: list[dict] = []
        self.reset()
        # Stop at the end of the assistant's turn, which is not always the EOS token (ChatML's <|im_end|>).
        stops = {tokenizer.eos_token_id}
        configured = model.generation_config.eos_token_id
        stops |= set(configured if isinstance(configured, list) else [configured])
        fmt = turn_format(tokenizer)
        if fmt is not None:
            for token in getattr(tokenizer, "all_special_tokens", []):
                if token and token in fmt.suffix["assistant"]:
                    stops.add(tokenizer.convert_tokens_to_ids(token))
        self.stops = sorted(s for s in stops if s is not None)

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def answer(self, text: str) -> str:
        """Stream the model's reply to `text` onto stdout and keep both in the conversation."""
        import torch
        from transformers import TextStreamer

        self.messages.append({"role": "user", "content": text})
        inputs = self.tokenizer.apply_chat_template(
            self.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.model.device)
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = (
            {"do_sample": True, "temperature": self.temperature}
            if self.temperature > 0
            else {"do_sample": False}
        )
        with torch.no_grad():
            output = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                eos_token_id=self.stops,
                pad_token_id=self.tokenizer.pad_token_id,
                streamer=streamer,
                **sampling,
            )
        reply = self.tokenizer.decode(
            output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        ).strip()
        self.messages.append({"role": "assistant", "content": reply})
        return reply


def _number(name: str, value: str, kind: type) -> Any:
    try:
        number = kind(value)
    except ValueError:
        raise UserError(f"{name}={value}: give a number.") from None
    if number < 0 or (kind is int and number == 0):
        raise UserError(f"{name}={value}: must be {'at least 1' if kind is int else '0 or more'}.")
    return number


def open_chat(args: dict) -> Chat:
    from finetune import runfolder

    max_new_tokens = _number("max_new_tokens", args["max_new_tokens"], int)
    temperature = _number("temperature", args["temperature"], float)
    run = runfolder.open_run(args["run"])  # mistakes first: they need no torch
    import torch

    gpu = torch.cuda.is_available()
    dtype = args["dtype"]
    if dtype == "auto" and not gpu:
        dtype = "float32"  # 16-bit matrix products are slow on most CPUs
    print(f"Loading {run.weights} ...", file=sys.stderr, flush=True)
    model, tokenizer = runfolder.load_model(run, dtype=dtype, merge=True, device="cuda" if gpu else "cpu")
    if not tokenizer.chat_template:
        raise UserError(
            f"{run.weights} has no chat template, so there is no conversation format to talk in. "
            "Train with data.chat_template=chatml (or another template) to give it one."
        )
    return Chat(model, tokenizer, args["system"], max_new_tokens, temperature)


def _interactive(chat: Chat) -> None:
    print(f"Chatting with the trained model. {HELP}", file=sys.stderr, flush=True)
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:  # Ctrl-D
            print(file=sys.stderr)
            return
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            chat.reset()
            print("(new conversation)", file=sys.stderr, flush=True)
            continue
        if text.startswith("/"):
            print(f"unknown command {text}. {HELP}", file=sys.stderr, flush=True)
            continue
        if text:
            print("model> ", end="", flush=True)
            chat.answer(text)


def main() -> None:
    from finetune import runfolder

    def command() -> None:
        args = runfolder.parse(
            "finetune.chat",
            f"Chat with a run's trained model (streaming, multi-turn, its chat template). In the chat: {HELP}",
            OPTIONS,
            {
                "run": None,
                "prompt": None,
                "system": None,
                "max_new_tokens": "256",
                "temperature": "0",
                "dtype": "auto",
            },
        )
        chat = open_chat(args)
        try:
            if args["prompt"] is not None:
                chat.answer(args["prompt"])
            else:
                _interactive(chat)
        except KeyboardInterrupt:  # leaving the chat is not an error
            print(file=sys.stderr)

    runfolder.main(command)


if __name__ == "__main__":
    main()
