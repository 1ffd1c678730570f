"""Prompt templates: how a conversation becomes the text a model reads, and which of that text it learns.

A conversation is a list of messages {"role": "system" | "user" | "assistant", "content": text}. An
Alpaca entry {instruction, input, output} is the conversation of one user message (the instruction, with
the entry's input kept beside it as "input") and one assistant reply (the output): `conversation_of`.
Three templates (`--prompt-style`) turn conversations into text:

    alpaca  one exchange    Below is an instruction that describes a task. Write a response that
                            appropriately completes the request.\\n\\n### Instruction:\\n{instruction}
                            [\\n\\n### Input:\\n{input}]\\n\\n### Response:\\n{reply}<|endoftext|>
    phi3    one exchange    <|user|>\\n{instruction}[\\n{input}]\\n<|assistant|>:\\n{reply}<|endoftext|>
    chat    any turns       [<|system|>\\n{system}<|end|>\\n]<|user|>\\n{message}<|end|>\\n
                            <|assistant|>\\n{reply}<|end|>\\n<|user|>\\n{message}<|end|>\\n ...

alpaca is rasbt's chapter 7 format (`format_input`), phi3 the Phi-3 style of his exercise solutions, and
chat Phi-3's own chat format, whose turns end with an end marker so that a conversation can go on.

`render` cuts a rendered conversation into segments, each marked learned or not: the model learns
the assistant's replies and what ends them (the end marker with chat; the <|endoftext|> the collate
appends with alpaca and phi3), and nothing else: no system or user text, no role header. Each segment
is tokenized on its own, so the tokens of a prompt are exactly those the model is given when it answers.
`reply_prompt` is that prompt: the conversation so far and the assistant's header, which training, the
test responses and generate.py give the model (`build_prompt` for an Alpaca entry).
"""
from typing import NamedTuple

ROLES = ("system", "user", "assistant")
END = "<|end|>"            # the chat template's end of a turn: a reply is learned up to and with it


class PromptStyle(NamedTuple):
    """A one-exchange template: an instruction (and input) and the response header before the reply."""
    instruction: str  # template of the prompt's start, with {instruction}
    input: str        # appended only when the entry's input is non-empty, with {input}
    response: str     # the response header; the output follows it directly


class ChatTemplate(NamedTuple):
    """A template of any number of turns: each is a role header, the content and the end marker."""
    system: str       # the headers of each role, then the content
    user: str
    assistant: str
    end: str          # closes every turn; learned at the end of each reply
    separator: str    # after the end marker, before the next header


INSTRUCTION_STYLES = {
    "alpaca": PromptStyle(
        instruction=("Below is an instruction that describes a task. Write a response that "
                     "appropriately completes the request.\n\n### Instruction:\n{instruction}"),
        input="\n\n### Input:\n{input}",
        response="\n\n### Response:\n"),
    "phi3": PromptStyle(instruction="<|user|>\n{instruction}", input="\n{input}",
                        response="\n<|assistant|>:\n"),
}
CHAT_TEMPLATES = {
    "chat": ChatTemplate(system="<|system|>\n", user="<|user|>\n", assistant="<|assistant|>\n", end=END,
                         separator="\n"),
}
PROMPT_STYLES = (*INSTRUCTION_STYLES, *CHAT_TEMPLATES)  # every --prompt-style


class Segment(NamedTuple):
    text: str
    learned: bool     # the loss takes these tokens as targets


def check_style(style):
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; choose one of: {', '.join(PROMPT_STYLES)}")
    return style


# ---------------------------------------------------------------------------------------------
# One exchange: an Alpaca entry

def conversation_of(entry):
    """An entry as a conversation: a conversation entry {"messages": [...]} is its messages; an Alpaca entry
    {instruction, input, output} is a user message that keeps the input beside the instruction (alpaca and
    phi3 show them apart) and the assistant's reply. An entry without an output (a prompt to answer) is
    the user's message alone."""
    if "messages" in entry:
        return entry["messages"]
    user = {"role": "user", "content": entry["instruction"], "input": entry.get("input", "")}
    return [user, {"role": "assistant", "content": entry["output"]}] if "output" in entry else [user]


def format_input(entry, style="alpaca"):
    """The prompt of an Alpaca entry: the instruction, plus the input when there is one (a missing
    "input" counts as empty); with the chat template, the user's whole turn."""
    return "".join(segment.text for segment in render(conversation_of(entry)[:1], style))


def response_header(style="alpaca"):
    """The text between a prompt and its reply, e.g. "\n\n### Response:\n" for alpaca."""
    check_style(style)
    if style in INSTRUCTION_STYLES:
        return INSTRUCTION_STYLES[style].response
    template = CHAT_TEMPLATES[style]
    return template.separator + template.assistant


def build_prompt(entry, style="alpaca"):
    """What the model is given for an Alpaca entry: prompt + response header. Training appends the output;
    generation, the test responses and generate.py let the model continue it."""
    return format_input(entry, style) + response_header(style)


def format_example(entry, style="alpaca"):
    """The full training text of an Alpaca entry: prompt + response header + output (+ the end marker)."""
    return "".join(segment.text for segment in render(conversation_of(entry), style))


# ---------------------------------------------------------------------------------------------
# Any conversation

def render(messages, style):
    """The conversation as segments of text, each learned or not (see the module docstring): every reply
    and what ends it is learned, the rest is not; neighbouring segments alike are joined. The collate
    appends <|endoftext|>, learned or not as end_of_text_learned says. The messages are taken as they
    are (data.check_conversation says what a conversation must be), but one alpaca or phi3 cannot hold
    is refused (check_template_holds)."""
    check_template_holds(messages, style)
    segments = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            segments += [Segment(response_header(style), False),
                         Segment(message["content"] + reply_end(style), True)]
        else:
            segments.append(Segment(_turn(message, style, first=i == 0), False))
    return _joined(segments)


def reply_prompt(messages, style):
    """The text a model continues to write the next reply: the conversation so far (its last message a
    user's) and the assistant's header. Continued with a reply, it is render's text of the longer
    conversation."""
    return "".join(segment.text for segment in render(messages, style)) + response_header(style)


def reply_end(style):
    """What ends a reply and is learned with it: the chat template's end marker; "" for alpaca and phi3,
    whose replies end with the <|endoftext|> the collate appends."""
    return CHAT_TEMPLATES[style].end if check_style(style) in CHAT_TEMPLATES else ""


def end_of_text_learned(style):
    """Whether the <|endoftext|> after the last reply is a target: it ends alpaca's and phi3's replies;
    the chat template's replies end with its end marker, so there it is not learned."""
    return check_style(style) in INSTRUCTION_STYLES


def check_template_holds(messages, style):
    """Raise ValueError when `style`'s template cannot hold the conversation: alpaca and phi3 hold one
    exchange, a user message and its reply, and no system message; chat holds any."""
    check_style(style)
    if style in CHAT_TEMPLATES:
        return
    roles = [message["role"] for message in messages]
    if "system" in roles or roles.count("user") > 1:
        what = "a system message" if "system" in roles else f"{roles.count('user')} user messages"
        raise ValueError(f"the {style} template holds one exchange (a user message and its reply) and this "
                         f"conversation has {what}; train and talk with --prompt-style chat")


def _turn(message, style, first):
    """The text of a system or user message, with what separates it from the turn before."""
    if style in INSTRUCTION_STYLES:
        template = INSTRUCTION_STYLES[style]
        text = template.instruction.format(instruction=message["content"])
        return text + (template.input.format(input=message["input"]) if message.get("input") else "")
    template = CHAT_TEMPLATES[style]
    content = message["content"] + (f"\n{message['input']}" if message.get("input") else "")
    before = "" if first else template.separator
    return before + getattr(template, message["role"]) + content + template.end


def _joined(segments):
    """Neighbouring segments that are both learned or both not, as one: fewer pieces to tokenize."""
    joined = []
    for segment in segments:
        if joined and joined[-1].learned == segment.learned:
            joined[-1] = Segment(joined[-1].text + segment.text, segment.learned)
        elif segment.text:
            joined.append(segment)
    return joined
