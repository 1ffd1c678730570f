"""Prompt templates: the exact text of each style, and what of a conversation the model learns."""
import pytest

from minigpt.prompts import (PROMPT_STYLES, Segment, build_prompt, conversation_of, end_of_text_learned,
                             format_example, format_input, render, reply_end, reply_prompt, response_header)

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.")
WITH_INPUT = {"instruction": "Edit the following sentence for grammar.",
              "input": "He go to the park every day.", "output": "He goes to the park every day."}
NO_INPUT = {"instruction": "Convert 45 kilometers to meters.", "input": "",
            "output": "45 kilometers is 45000 meters."}


def test_alpaca_prompt_exact_text():
    assert format_input(WITH_INPUT) == (f"{ALPACA_PREAMBLE}\n\n### Instruction:\nEdit the following "
                                        "sentence for grammar.\n\n### Input:\nHe go to the park every day.")
    assert format_input(NO_INPUT, "alpaca") == (f"{ALPACA_PREAMBLE}\n\n### Instruction:\n"
                                                "Convert 45 kilometers to meters.")
    assert response_header("alpaca") == "\n\n### Response:\n"
    assert format_example(NO_INPUT) == (format_input(NO_INPUT) + "\n\n### Response:\n"
                                        "45 kilometers is 45000 meters.")


def test_phi3_prompt_exact_text():
    assert format_input(WITH_INPUT, "phi3") == ("<|user|>\nEdit the following sentence for grammar.\n"
                                                "He go to the park every day.")
    assert format_input(NO_INPUT, "phi3") == "<|user|>\nConvert 45 kilometers to meters."
    assert build_prompt(NO_INPUT, "phi3") == "<|user|>\nConvert 45 kilometers to meters.\n<|assistant|>:\n"
    assert format_example(NO_INPUT, "phi3") == ("<|user|>\nConvert 45 kilometers to meters.\n<|assistant|>:\n"
                                                "45 kilometers is 45000 meters.")


def test_unknown_style_lists_choices():
    with pytest.raises(ValueError, match="unknown prompt style 'chatml'; choose one of: alpaca, phi3, chat"):
        format_input(NO_INPUT, "chatml")


CONVERSATION = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Reverse qxbf"}, {"role": "assistant", "content": "fbxq"},
                {"role": "user", "content": "Now uppercase it"}, {"role": "assistant", "content": "FBXQ"}]


def test_chat_template_exact_text_and_what_is_learned():
    assert render(CONVERSATION, "chat") == [
        Segment("<|system|>\nAnswer briefly.<|end|>\n<|user|>\nReverse qxbf<|end|>\n<|assistant|>\n", False),
        Segment("fbxq<|end|>", True),
        Segment("\n<|user|>\nNow uppercase it<|end|>\n<|assistant|>\n", False),
        Segment("FBXQ<|end|>", True)]
    assert reply_prompt(CONVERSATION[:2], "chat") == ("<|system|>\nAnswer briefly.<|end|>\n<|user|>\n"
                                                      "Reverse qxbf<|end|>\n<|assistant|>\n")
    assert not end_of_text_learned("chat") and end_of_text_learned("alpaca") and end_of_text_learned("phi3")


@pytest.mark.parametrize("style", PROMPT_STYLES)
def test_a_prompt_continued_with_its_reply_is_the_rendered_conversation(style):
    """What the model is given, followed by what it should write, is exactly the training text."""
    messages = CONVERSATION[1:3] if style != "chat" else CONVERSATION
    replies = [n for n, message in enumerate(messages) if message["role"] == "assistant"]
    assert len(replies) == (2 if style == "chat" else 1)
    for n in replies:                                           # before each reply
        reply = messages[n]["content"] + reply_end(style)
        rendered = "".join(segment.text for segment in render(messages[:n + 1], style))
        assert reply_prompt(messages[:n], style) + reply == rendered


@pytest.mark.parametrize("style", PROMPT_STYLES)
def test_an_alpaca_entry_is_a_conversation_of_one_exchange(style):
    learned = [segment.text for segment in render(conversation_of(WITH_INPUT), style) if segment.learned]
    assert learned == [WITH_INPUT["output"] + reply_end(style)]
    assert format_example(WITH_INPUT, style) == build_prompt(WITH_INPUT, style) + learned[0]
    assert build_prompt(WITH_INPUT, style) == reply_prompt(conversation_of(WITH_INPUT)[:1], style)
