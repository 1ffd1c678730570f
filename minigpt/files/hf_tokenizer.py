"""The tokenizer files of a Hugging Face export, with its chat template: what transformers needs to talk
to a minigpt model as minigpt does.

    write_tokenizer_files(folder, tokenizer, prompt_style, context_length)

writes GPT-2's own tokenizer layout, which `AutoTokenizer.from_pretrained(folder)` reads (GPT2Tokenizer):

    vocab.json             each token's text -> its id; a token's bytes are written as GPT-2 writes them,
                           one printable character per byte (byte_characters)
    merges.txt             the BPE merges in the order they apply: merge k makes token 256 + k
    tokenizer_config.json  the class, <|endoftext|> as its bos, eos, unk and padding token, the context
                           length, and `chat_template`

Both tokenizers fit this layout: gpt2's 50,000 merges are read back from tiktoken's ranks (bpe_merges),
and the byte tokenizer is the 256 bytes with no merge at all, ids 0..255, and <|endoftext|> 256. So the
ids transformers gives a text are minigpt's (tests/test_hf_export.py checks them where it is installed).

`chat_template` is a Jinja template (jinja_chat_template) that renders a list of messages as
minigpt.prompts.render does, and with add_generation_prompt=True exactly prompts.reply_prompt: the text a
minigpt model answers. The chat template's replies end with <|end|>, several tokens that transformers
cannot take as eos_token_id: pass `stop_strings=["<|end|>"]` (and the tokenizer) to its generate().
"""
import json

from ..prompts import CHAT_TEMPLATES, INSTRUCTION_STYLES, response_header
from ..tokenizer import EOT
from .fileio import atomic_write, write_json

MERGES_HEADER = "#version: 0.2"  # GPT-2's merges.txt starts so


def write_tokenizer_files(folder, tokenizer, prompt_style, context_length):
    """Write vocab.json, merges.txt and tokenizer_config.json of `tokenizer` (a tiktoken Encoding: gpt2 or
    byte) into `folder`, the chat template that of `prompt_style`."""
    characters = byte_characters()
    token_bytes = [tokenizer.decode_single_token_bytes(i) for i in range(tokenizer.eot_token)]  # id: rank
    ranks = {piece: rank for rank, piece in enumerate(token_bytes)}
    vocab = {"".join(characters[b] for b in piece): rank for piece, rank in ranks.items()}
    vocab[EOT] = tokenizer.eot_token
    merges = [" ".join("".join(characters[b] for b in part) for part in pair) for pair in bpe_merges(ranks)]
    write_json(folder / "vocab.json", vocab)
    with atomic_write(folder / "merges.txt") as f:
        f.write(("\n".join([MERGES_HEADER, *merges]) + "\n").encode())
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "model_max_length": context_length,
        "bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT,
        "chat_template": jinja_chat_template(prompt_style)})


def byte_characters():
    """GPT-2's printable character for each byte (its encoder's bytes_to_unicode): the bytes that print
    stand for themselves, the others (controls, space, ...) take the characters from 256 up, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def bpe_merges(ranks):
    """The merge (left, right) that makes each token above the 256 bytes, in rank order, from tiktoken's
    `ranks` ({token bytes: rank}): BPE on the token's bytes with only the merges of lower rank leaves
    exactly two pieces, those (the way tiktoken's own BPE reaches the token)."""
    merges = []
    for piece, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(piece) == 1:
            continue
        parts = [bytes([b]) for b in piece]
        while len(parts) > 2:
            pair_ranks = [ranks.get(parts[i] + parts[i + 1], rank) for i in range(len(parts) - 1)]
            lowest = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[lowest] >= rank:
                break
            parts[lowest:lowest + 2] = [parts[lowest] + parts[lowest + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {rank} ({piece!r}) is not one merge of two tokens of lower rank")
        merges.append(tuple(parts))
    return merges


def jinja_chat_template(style):
    """A Jinja chat template (transformers' apply_chat_template) that renders messages in `style` exactly
    as prompts.render and prompts.reply_prompt do; a user message's "input" is shown as minigpt shows it."""
    if style in CHAT_TEMPLATES:
        template = CHAT_TEMPLATES[style]
        headers = {role: getattr(template, role) for role in ("system", "user", "assistant")}
        return ("{%- for message in messages -%}"
                f"{{%- if not loop.first %}}{{{{ {_literal(template.separator)} }}}}{{% endif -%}}"
                f"{{{{ {_literal(headers)}[message['role']] + message['content'] }}}}"
                "{%- if message.get('input') %}"
                f"{{{{ {_literal(chr(10))} + message['input'] }}}}"
                "{% endif -%}"
                f"{{{{ {_literal(template.end)} }}}}"
                "{%- endfor -%}"
                "{%- if add_generation_prompt %}"
                f"{{{{ {_literal(response_header(style))} }}}}"
                "{% endif -%}")
    template = INSTRUCTION_STYLES[style]
    before, after = template.instruction.split("{instruction}")
    input_before, input_after = template.input.split("{input}")
    one_exchange = (f"the {style} template holds one exchange, a user message and its reply; "
                    f"conversations need minigpt's chat template")
    return ("{%- if messages|length > 2 or messages[0]['role'] != 'user' or (messages|length == 2 and "
            "messages[1]['role'] != 'assistant') -%}"
            f"{{{{ raise_exception({_literal(one_exchange)}) }}}}"
            "{%- endif -%}"
            f"{{{{ {_literal(before)} + messages[0]['content'] + {_literal(after)} }}}}"
            "{%- if messages[0].get('input') %}"
            f"{{{{ {_literal(input_before)} + messages[0]['input'] + {_literal(input_after)} }}}}"
            "{% endif -%}"
            "{%- if messages|length == 2 %}"
            f"{{{{ {_literal(template.response)} + messages[1]['content'] }}}}"
            f"{{%- elif add_generation_prompt %}}{{{{ {_literal(template.response)} }}}}"
            "{% endif -%}")


def _literal(value):
    """A string or a dict of strings as a Jinja literal: JSON's escapes (\\n, \\") are Jinja's too."""
    return json.dumps(value)
