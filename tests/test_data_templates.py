"""Assistant-only masks on real chat templates (tests/data/templates, sources in SOURCES.md): the trained
tokens are exactly each reply, as the template renders it, and the marker that ends its turn — whatever
the template does to earlier turns or the system prompt. Plus tool calls, and the check that catches a
template that mis-marks replies."""

from __future__ import annotations

import pytest
from conftest import TEMPLATE_MODELS as MODELS
from conftest import tokenizer_for

from finetune import UserError
from finetune.data import masks, templates, tokenization

# What each template writes between the assistant header and the reply text, and after it, for
# the last reply and for earlier ones: the model writes these, so they are trained.
LAST = {"qwen3-release": "<think>\n\n</think>\n\n", "qwen3-current": "<think>\n\n</think>\n\n", "gpt-oss": "<|channel|>final<|message|>"}  # fmt: skip
EARLIER = {"gpt-oss": "<|channel|>final<|message|>"}
END = {
    "llama-3.1": "<|eot_id|>", "qwen2.5": "<|im_end|>", "qwen3-release": "<|im_end|>", "qwen3-current": "<|im_end|>",
    "mistral-v0.3": "</s>", "mistral-nemo": "</s>", "gemma-2": "<end_of_turn>", "phi-3": "<|end|>", "phi-4": "<|im_end|>",
    "phi-4-release": "<|im_end|>", "deepseek-r1-distill": "<｜end▁of▁sentence｜>", "gpt-oss": "<|end|>",
    "smollm2": "<|im_end|>", "zephyr": "</s>",
}  # fmt: skip
LAST_END = {
    "gpt-oss": "<|return|>"
}  # harmony closes the final reply with <|return|>, earlier ones with <|end|>

SYSTEM = {"role": "system", "content": "Answer with the date only."}
Q1, Q2 = (
    {"role": "user", "content": "Convert to ISO date: May 1, 2001"},
    {"role": "user", "content": "And July 4, 1988 please?"},
)
A1, A2 = {"role": "assistant", "content": "2001-05-01"}, {"role": "assistant", "content": "1988-07-04"}
R2 = {**A2, "reasoning": "July is the seventh month."}
CASES = {
    "single-turn": [Q1, A1],
    "multi-turn": [Q1, A1, Q2, A2],
    "system": [SYSTEM, Q1, A1, Q2, A2],
    "reasoning": [Q1, {**A1, "reasoning": "May is the fifth month."}, Q2, R2],
}


def trained(tokenizer, row: dict) -> tuple[list[str], str]:
    out = tokenization.encode(row, tokenizer)
    return masks.trained_runs(out["text"], out["offsets"], out["labels"]), out["problem"]


def expected(name: str, messages: list[dict]) -> list[str]:
    replies = [m for m in messages if m["role"] == "assistant"]
    out = []
    for i, reply in enumerate(replies):
        last = i == len(replies) - 1
        before = (LAST if last else EARLIER).get(name, "")
        if (
            last and reply.get("reasoning") and name.startswith("qwen3")
        ):  # only the last turn keeps its thinking
            before = f"<think>\n{reply['reasoning']}\n</think>\n\n"
        if last and reply.get("reasoning") and name == "gpt-oss":
            before = f"<|channel|>analysis<|message|>{reply['reasoning']}<|end|><|start|>assistant{before}"
        out.append(before + reply["content"] + (LAST_END.get(name, END[name]) if last else END[name]))
    return out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", MODELS)
def test_real_templates_train_exactly_the_replies_and_their_end_of_turn(name, case):
    tokenizer = tokenizer_for(name)
    messages = CASES[case]
    if name == "gemma-2" and case == "system":  # Gemma-2's template refuses system messages: one clear line
        with pytest.raises(UserError, match="the chat template failed on it: System role not supported"):
            tokenization.tokenize(_dataset([{"messages": messages}]), tokenizer, None)
        return
    runs, problem = trained(tokenizer, {"messages": messages})
    # Mistral v0.3 writes a space before the reply; the reply's first token carries it.
    assert [r.lstrip(" ") for r in runs] == expected(name, messages) and problem == ""


def _dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list([{**r, "origin": f"chats.jsonl:{i + 1}"} for i, r in enumerate(rows)])


def test_the_system_prompt_moved_into_the_last_user_turn_stays_untrained():
    # Mistral v0.3 writes the system prompt into the last user turn, so only while the conversation
    # ends with a question: a prefix of the conversation renders differently from the whole.
    tokenizer = tokenizer_for("mistral-v0.3")
    prompt = templates.render(tokenizer, CASES["system"][:-1], generation=True)
    assert f"{SYSTEM['content']}\n\n{Q2['content']}[/INST]" in prompt
    for name in ("mistral-v0.3", "mistral-nemo"):
        out = tokenization.encode({"prompt": CASES["system"][:-1], "completion": [A2]}, tokenizer_for(name))
        runs = masks.trained_runs(out["text"], out["offsets"], out["labels"])
        assert [r.lstrip() for r in runs] == ["1988-07-04</s>"] and out["problem"] == "", name


@pytest.mark.parametrize("name", ["mistral-v0.3", "mistral-nemo", "llama-3.1"])
def test_a_template_that_leaves_the_system_message_out_of_training_says_so(name):
    # Mistral's templates render the system message before a final user turn only: a training
    # example ends with a reply, so it would silently train without its instructions.
    rows = [{"messages": CASES["system"]}, {"messages": CASES["system"]}, {"messages": [Q1, A1]}]
    if name == "llama-3.1":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tokenization.tokenize(_dataset(rows), tokenizer_for(name), None)
        return
    with pytest.warns(UserWarning, match="leaves the system message out of 2 of 3 examples"):
        tokenization.tokenize(_dataset(rows), tokenizer_for(name), None)


def test_a_conversation_that_opens_with_the_assistant_trains_only_replies():
    greeting = {"role": "assistant", "content": "Hello! Which date shall I convert?"}
    for name in ("qwen2.5", "llama-3.1", "smollm2"):
        runs, problem = trained(tokenizer_for(name), {"messages": [SYSTEM, greeting, Q1, A1]})
        assert runs == [greeting["content"] + END[name], A1["content"] + END[name]] and problem == "", name


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip
CALL = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "id": "call00001", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}  # fmt: skip
RESULT = {"role": "tool", "content": "Sunny, 24 degrees", "tool_call_id": "call00001", "name": "get_weather"}
ASK = {"role": "user", "content": "What is the weather in Paris today?"}
ANSWER = {"role": "assistant", "content": "It is sunny in Paris."}


@pytest.mark.parametrize("name", ["qwen2.5", "qwen3-current", "llama-3.1"])
def test_tool_calls_are_rendered_by_the_template_and_trained(name):
    runs, problem = trained(tokenizer_for(name), {"messages": [ASK, CALL, RESULT, ANSWER], "tools": TOOLS})
    assert problem == "" and len(runs) == 2
    assert '"get_weather"' in runs[0] and "Paris" in runs[0] and runs[0].endswith(END[name])
    assert runs[1].endswith(ANSWER["content"] + END[name])
    assert not any(RESULT["content"] in r or ASK["content"] in r for r in runs), (
        "tool results and questions stay untrained"
    )


def test_a_template_without_tool_support_is_a_clear_error():
    from datasets import Dataset

    rows = [{"messages": [ASK, CALL, RESULT, ANSWER], "tools": TOOLS, "origin": "tools.jsonl:1"}]
    with pytest.raises(
        UserError, match="tools.jsonl:1: this data has tool calls, but .* does not render them"
    ):
        tokenization.tokenize(Dataset.from_list(rows), tokenizer_for("smollm2"), None)


def test_the_mask_check_catches_a_broken_template():
    # Drops every reply: nothing of the assistant is rendered, so no reply can be trained.
    dropping = CHATML_BROKEN = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n<|im_end|>\\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    # Echoes the question inside the assistant turn: the user's text would be trained.
    echoing = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' + messages[loop.index0 - 1]['content'] + ' -> ' + m['content'] + '<|im_end|>\\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    rows = [{"messages": [Q1, A1]}, {"messages": [Q2, A2]}]
    for template, problem in ((dropping, "reply 1 is not trained"), (echoing, "prompt text is trained")):
        tokenizer = tokenizer_for("smollm2", CHATML_BROKEN if template is dropping else template)
        assert problem in trained(tokenizer, rows[0])[1]
        with pytest.raises(UserError) as err:
            tokenization.tokenize(_dataset(rows), tokenizer, None)
        message = str(err.value)
        assert "does not mark the assistant replies" in message and "2 of 2 examples" in message
        assert "chats.jsonl:1: " + problem in message and "data.chat_template=" in message


def test_a_template_from_another_model_warns_and_trains_its_marker_whole():
    from finetune.schema import DataConfig

    tokenizer = tokenizer_for("llama-3.1")  # no <|im_start|>/<|im_end|> tokens
    with pytest.warns(UserWarning, match=r"<\|im_end\|>, <\|im_start\|> are not tokens of this tokenizer"):
        templates.use_chat_template(tokenizer, DataConfig(chat_template="chatml"))
    out = tokenization.encode({"messages": [Q1, A1]}, tokenizer)
    assert len(tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]) > 1, "spelled in pieces"
    runs = masks.trained_runs(out["text"], out["offsets"], out["labels"])
    assert len(runs) == 1 and runs[0].startswith("2001-05-01<|im_end|>") and out["problem"] == ""
    with pytest.warns(
        UserWarning, match="writes no end-of-turn marker after a reply, so the model will not learn to stop"
    ):
        templates.use_chat_template(
            tokenizer,
            DataConfig(
                chat_template="{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
            ),
        )
