"""How to talk to a model: the card every model file minigpt writes carries, its tokenizer and its template.

    card = make_card("byte", "chat")   # {"format", "tokenizer", "prompt_style", "template": {its texts}}
    card = make_card("byte", "chat", {"data": "tasks:chat", ...})     # and the data it was trained on
    save_npz(model, "model.npz", card) # a .npz keeps it in its __card__ entry (files.weights)
    read_card("model.npz")             # -> the card, or None for a file written before cards existed

A model is trained on token ids of one tokenizer, in the text of one prompt template; given another, it
reads nonsense without a word. So the card goes wherever the weights go: the run's model-*.npz files, its
checkpoint (whose run settings hold both), and a Hugging Face export (config.json's "minigpt" entry).
"template" holds the template's texts as they were when the model was trained, for tools other than
minigpt (minigpt itself goes by the name). A fine-tuning run's card also says what data it was trained on
("data": the run's --data and the settings that split it), so that `train.py --weights` can go on with
the same data and the same held-out test set (pipeline/settings.py: make_config).
"""
from pathlib import Path

from ..prompts import CHAT_TEMPLATES, INSTRUCTION_STYLES, PROMPT_STYLES
from ..tokenizer import TOKENIZERS, VOCAB_SIZES
from .fileio import BadFileError, parse_json
from .weights import (HF_CARD_KEY, HF_CONFIG_NAME, load_hf_gpt2, read_npz_card, read_npz_config,
                      weights_format)

CARD_FORMAT = "minigpt-card-1"
RUN_MODEL_FILE = "model-final.npz"  # what a run folder's card and weights are read from


def make_card(tokenizer, prompt_style, data=None):
    """The card of a model trained with `tokenizer` ("byte", "gpt2") on `prompt_style`'s text; with `data`
    (a dict of JSON values: the run's data settings), on that data."""
    texts = (INSTRUCTION_STYLES.get(prompt_style) or CHAT_TEMPLATES[prompt_style])._asdict()
    card = {"format": CARD_FORMAT, "tokenizer": tokenizer, "prompt_style": prompt_style, "template": texts}
    return card if data is None else {**card, "data": data}


def check_card(card, source):
    """`card` if it is a card this minigpt can use, else a one-line BadFileError naming `source`."""
    if not (isinstance(card, dict) and card.get("format") == CARD_FORMAT):
        raise BadFileError(f"{source}: its model card is not {CARD_FORMAT}")
    for key, known in (("tokenizer", TOKENIZERS), ("prompt_style", PROMPT_STYLES)):
        if card.get(key) not in known:
            raise BadFileError(f"{source}: its model card names the {key} {card.get(key)!r}, which this "
                               f"minigpt does not know ({', '.join(known)})")
    return card


def model_file(path):
    """The weights file a path names: the file itself, or a run folder's model-final.npz."""
    path = Path(path)
    if path.is_dir() and (path / RUN_MODEL_FILE).is_file():
        return path / RUN_MODEL_FILE
    return path


def read_card(path):
    """The card of a model file (.npz, a Hugging Face folder or .safetensors file) or run folder; None
    when the file was written before cards existed, or not by minigpt (the caller then asks for the
    template with one line)."""
    path = model_file(path)
    card = read_npz_card(path) if weights_format(path) == "npz" else read_hf_card(path)
    return None if card is None else check_card(card, path)


def read_hf_card(path):
    """The model card (a dict, unchecked) in the config.json of a Hugging Face folder, or beside a
    .safetensors file; None without one (a file from before cards, or not from minigpt)."""
    path = Path(path)
    config_file = (path if path.is_dir() else path.parent) / HF_CONFIG_NAME
    if not config_file.is_file():
        return None
    hf_config = parse_json(config_file.read_bytes(), config_file, BadFileError)
    return hf_config.get(HF_CARD_KEY) if isinstance(hf_config, dict) else None


def implied_tokenizer(path):
    """The tokenizer a model file's vocabulary implies (byte: 257 rows, gpt2: 50,257), read without the
    weights where possible; None for a vocabulary of another size."""
    if weights_format(path) == "npz":
        vocab_size = read_npz_config(path).vocab_size
    else:
        vocab_size = load_hf_gpt2(path).cfg.vocab_size
    return {size: name for name, size in VOCAB_SIZES.items()}.get(vocab_size)
