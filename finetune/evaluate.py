"""Held-out exact-match accuracy with batched greedy generation."""

from __future__ import annotations


def generate(
    model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    import torch

    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = tokenizer.apply_chat_template(
                prompts[start : start + batch_size], add_generation_prompt=True, tokenize=False
            )
            batch = tokenizer(
                texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
            ).to(model.device)
            with torch.no_grad():
                out = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            answers += [a.strip() for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return answers


def exact_match(model, tokenizer, pairs: list[tuple[list[dict], str]]) -> tuple[float | None, list[dict]]:
    """(accuracy, samples) on (prompt, reference) pairs; (None, []) when there is nothing to score."""
    if not pairs:
        return None, []
    longest = max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for _, ref in pairs)
    answers = generate(model, tokenizer, [p for p, _ in pairs], max_new_tokens=longest + 8)
    samples = [
        {"prompt": p[-1]["content"], "reference": ref, "answer": ans, "correct": ans == ref.strip()}
        for (p, ref), ans in zip(pairs, answers)
    ]
    return sum(s["correct"] for s in samples) / len(samples), samples
