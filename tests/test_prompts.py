"""Prompt templates: the exact text of each style."""
import pytest

from minigpt.prompts import build_prompt, format_example, format_input, response_header

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
    with pytest.raises(ValueError, match="unknown prompt style 'chatml'; choose one of: alpaca, phi3"):
        format_input(NO_INPUT, "chatml")
