"""Prompt templates: how an entry {instruction, input, output} becomes the text a model reads.

    alpaca   Below is an instruction that describes a task. Write a response that appropriately
             completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}
             \n\n### Response:\n{output}
    phi3     <|user|>\n{instruction}\n{input}\n<|assistant|>:\n{output}

The input part is left out when an entry's input is empty. `build_prompt` (prompt + response header)
is the one text that training, the test responses and generate.py give the model; training appends
the output (rasbt ch. 7: `format_input`, and the Phi-3 style of the exercise solutions).
"""
from typing import NamedTuple


class PromptStyle(NamedTuple):
    instruction: str  # template of the prompt's start, with {instruction}
    input: str        # appended only when the entry's input is non-empty, with {input}
    response: str     # the response header; the output follows it directly


PROMPT_STYLES = {
    "alpaca": PromptStyle(
        instruction=("Below is an instruction that describes a task. Write a response that "
                     "appropriately completes the request.\n\n### Instruction:\n{instruction}"),
        input="\n\n### Input:\n{input}",
        response="\n\n### Response:\n"),
    "phi3": PromptStyle(instruction="<|user|>\n{instruction}", input="\n{input}",
                        response="\n<|assistant|>:\n"),
}


def _prompt_style(style):
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; choose one of: {', '.join(PROMPT_STYLES)}")
    return PROMPT_STYLES[style]


def format_input(entry, style="alpaca"):
    """The prompt: instruction, plus the input when there is one (a missing "input" counts as empty)."""
    template = _prompt_style(style)
    prompt = template.instruction.format(instruction=entry["instruction"])
    if entry.get("input"):
        prompt += template.input.format(input=entry["input"])
    return prompt


def response_header(style="alpaca"):
    """The text between the prompt and the output, e.g. "\\n\\n### Response:\\n" for alpaca."""
    return _prompt_style(style).response


def build_prompt(entry, style="alpaca"):
    """What the model is given: prompt + response header. Training appends the output; generation,
    the test responses and generate.py let the model continue it."""
    return format_input(entry, style) + response_header(style)


def format_example(entry, style="alpaca"):
    """The full training text: prompt + response header + output."""
    return build_prompt(entry, style) + entry["output"]
